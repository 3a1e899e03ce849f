"""Validate the config, then build the tokenizer and the model (+ LoRA), before anything heavy.

``validate`` runs before any data or weight is read: every error names the key and what to do.
"""

from __future__ import annotations

import os
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import DictConfig

from speed_train.speed.config import SpeedConfig, SpeedConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PACKAGED_SOURCES = ("smollm2", "gemma3")  # model.source values naming a packaged model (loading.py)


class ConfigError(ValueError):
    """The training config is inconsistent; raised before any model or data is loaded."""


def speed_config(cfg: DictConfig) -> SpeedConfig:
    try:
        s = cfg.speed
        return SpeedConfig(k=s.k, anchor=s.anchor, loss_scope=s.loss_scope, add_bos=s.add_bos)
    except SpeedConfigError as e:
        raise ConfigError(f"speed.{e}" if str(e).startswith("add_bos=") else f"speed: {e}") from None


def _check(ok: bool, key: str, value, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: {rule}")


def validate(cfg: DictConfig, world_size: int = 1) -> None:
    """Checks that need arithmetic, ranges or cross-field knowledge (types, unknown keys and enum
    values: the schema, at composition). Reads the model's config (not its weights) to check K
    and the attention window against the data."""
    sc = speed_config(cfg)
    m, d, o, t, obj = cfg.model, cfg.data, cfg.optim, cfg.trainer, cfg.objective
    if m.source == "hub" and not m.pretrained:
        raise ConfigError("model.source=hub needs model.pretrained (a Hub id or a local directory)")
    # numbers a user can get wrong, checked here rather than deep inside torch after loading
    _check(o.lr > 0, "optim.lr", o.lr, "must be > 0")
    _check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
    _check(
        len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
        "optim.betas",
        list(o.betas),
        "must be two numbers in [0, 1)",
    )
    _check(o.eps > 0, "optim.eps", o.eps, "must be > 0")
    _check(0 <= o.warmup_ratio <= 1, "optim.warmup_ratio", o.warmup_ratio, "must be in [0, 1]")
    _check(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", o.min_lr_ratio, "must be in [0, 1]")
    _check(0 <= o.decay_ratio <= 1, "optim.decay_ratio", o.decay_ratio, "must be in [0, 1]")
    _check(o.gradient_clip >= 0, "optim.gradient_clip", o.gradient_clip, "must be >= 0 (0: no clipping)")
    _check(obj.temperature > 0, "objective.temperature", obj.temperature, "must be > 0")
    _check(obj.ce_weight >= 0, "objective.ce_weight", obj.ce_weight, "must be >= 0")
    _check(d.max_length >= 2, "data.max_length", d.max_length, "must be >= 2 tokens")
    _check(
        d.num_proc is None or d.num_proc >= 1, "data.num_proc", d.num_proc, "must be >= 1 (null: every core)"
    )
    _check(d.num_workers >= 0, "data.num_workers", d.num_workers, "must be >= 0")
    _check(
        d.max_bad_fraction is None or 0 <= d.max_bad_fraction <= 1,
        "data.max_bad_fraction",
        d.max_bad_fraction,
        "must be in [0, 1] (null: the recipe's)",
    )
    # 0 training examples is no run (and must not mean "all"); 0 held-out ones: no evaluation
    v = d.max_train_examples
    _check(v is None or v >= 1, "data.max_train_examples", v, "must be >= 1 (null: all)")
    v = d.max_eval_examples
    _check(v is None or v >= 0, "data.max_eval_examples", v, "must be >= 0 (null: all)")
    speed_config(cfg)
    if d.held_out is not None:
        from speed_train.data.recipes import parse_held_out

        parse_held_out(d.held_out, "data.held_out", ConfigError)
    if cfg.lora.enabled:
        _check(cfg.lora.r >= 1, "lora.r", cfg.lora.r, "must be >= 1")
        _check(cfg.lora.alpha > 0, "lora.alpha", cfg.lora.alpha, "must be > 0")
        _check(0 <= cfg.lora.dropout < 1, "lora.dropout", cfg.lora.dropout, "must be in [0, 1)")
    if t.micro_batch_size < 1 or t.global_batch_size < 1:
        raise ConfigError("trainer.micro_batch_size and trainer.global_batch_size must be >= 1")
    per_step = t.micro_batch_size * world_size
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"trainer.global_batch_size={t.global_batch_size} is not divisible by micro_batch_size "
            f"({t.micro_batch_size}) x data-parallel ranks ({world_size}) = {per_step}"
        )
    if t.eval_every_n_steps is not None and t.eval_every_n_steps < 1:
        raise ConfigError(
            f"trainer.eval_every_n_steps={t.eval_every_n_steps}: >= 1, or null for no validation"
        )
    _check(
        t.checkpoint_every_n_steps is None or t.checkpoint_every_n_steps >= 1,
        "trainer.checkpoint_every_n_steps",
        t.checkpoint_every_n_steps,
        "must be >= 1 (null: at the end only)",
    )
    _check(t.keep_checkpoints >= 1, "trainer.keep_checkpoints", t.keep_checkpoints, "must be >= 1")
    _check(t.log_every_n_steps >= 1, "trainer.log_every_n_steps", t.log_every_n_steps, "must be >= 1")
    if t.max_steps == 0 or (t.max_steps < 0 and t.epochs < 1):
        raise ConfigError("set trainer.max_steps > 0 or trainer.epochs >= 1")
    if obj.kind == "distill" and not cfg.lora.enabled:
        raise ConfigError(
            "objective.kind=distill needs lora.enabled=true (teacher = adapters disabled, K = L)"
        )
    if cfg.strategy.name == "deepspeed" and cfg.strategy.zero_stage not in (1, 2, 3):
        raise ConfigError(f"strategy.zero_stage={cfg.strategy.zero_stage}: 1, 2 or 3 with deepspeed")
    if cfg.export.enabled and cfg.export.push_to_hub:
        check_hub_upload(cfg.export.push_to_hub)
    config = model_config_or_none(cfg)
    layers = config.num_hidden_layers if config is not None else m.num_layers
    if layers is not None:
        if m.num_layers is not None and m.num_layers != layers:
            raise ConfigError(
                f"model.num_layers={m.num_layers} but {m.name} has {layers} layers; fix the config"
            )
        try:
            sc.resolve_k(layers)
        except SpeedConfigError as e:
            raise ConfigError(f"speed.k: {e}") from None
    if config is not None:
        check_window(config, d.max_length, m.name)


def model_config_or_none(cfg: DictConfig):
    """The model's config when it can be read without weights or network (else None: the
    checks then run on the loaded model, still before training)."""
    try:
        return model_config(cfg)
    except (OSError, ValueError):
        return None


def model_config(cfg: DictConfig):
    """The HF config of the model the run will build."""
    from transformers import AutoConfig

    m = cfg.model
    if m.source in PACKAGED_SOURCES:
        from speed_train.loading import packaged_path

        return AutoConfig.from_pretrained(packaged_path(str(m.source)))
    if m.source == "tiny":
        from speed_train.speed.tiny import tiny_config

        return tiny_config(m.arch, layers=m.num_layers or 4, **dict(m.tiny))
    # local folders and the HF cache only: validation must not wait on the network
    return AutoConfig.from_pretrained(m.pretrained, local_files_only=True)


def check_window(config, max_length: int, name: str) -> None:
    """Refuse a model whose sliding window is shorter than the data when the SPEED masks do not
    implement that architecture's window (Gemma-3's they do: speed.visibility)."""
    from speed_train.speed.adapters import WINDOWED_ARCHITECTURES, unsupported_window

    window = unsupported_window(config)
    if window is not None and window < max_length:
        raise ConfigError(
            f"model {name} attends within a sliding window of {window} tokens, shorter than data.max_length="
            f"{max_length}: SPEED masks implement sliding windows for {', '.join(WINDOWED_ARCHITECTURES)} "
            f"only; set data.max_length<={window}"
        )


def check_output_dir(path: str | os.PathLike, key: str = "output_dir") -> Path:
    """Create the run folder and prove it is writable, or say why not (before any work); ``key``:
    the setting that names it."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ConfigError(
            f"output folder {out} is not writable ({e.strerror or e}): choose another {key}"
        ) from None
    return out


def check_hub_upload(repo: str) -> None:
    """export.push_to_hub needs a reachable Hub: fail now, not after training."""
    from speed_train.data.sources import hub_reachable

    if not hub_reachable():
        raise ConfigError(
            f"export.push_to_hub={repo!r}: the Hugging Face Hub is unreachable (offline or HF_HUB_OFFLINE=1); "
            "unset export.push_to_hub and upload the export folder later with `hf upload`"
        )


def load_tokenizer(cfg: DictConfig):
    """The run's tokenizer: ``model.tokenizer`` (or the model's own), with ``model.chat_template``."""
    from speed_train.loading import load_tokenizer as load

    m = cfg.model
    name = m.tokenizer or (
        str(m.source) if m.source in PACKAGED_SOURCES else "smollm2" if m.source == "tiny" else m.pretrained
    )
    return load(name, chat_template=m.chat_template)


def load_model(cfg: DictConfig, tokenizer):
    m = cfg.model
    dtype = DTYPES[str(m.dtype)]
    if m.source in (*PACKAGED_SOURCES, "hub"):
        from speed_train.loading import load_weights

        model = load_weights(str(m.source) if m.source in PACKAGED_SOURCES else m.pretrained, dtype=dtype)
    elif m.source == "tiny":
        from speed_train.speed.tiny import tiny_model

        kw = dict(m.tiny)
        kw.setdefault("vocab", len(tokenizer))
        model = tiny_model(m.arch, layers=m.num_layers or 4, seed=cfg.trainer.seed, dtype=dtype, **kw)
        model.config.pad_token_id = tokenizer.pad_token_id
        seeded_init(model, cfg.trainer.seed)  # the same weights whether partitioned (ZeRO-3) or not
    if m.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora.enabled:
        # seeded here so the adapters' init does not depend on what construction drew from the RNG
        # (ZeRO-3 construction initialises on rank 0 only; DeepSpeed broadcasts rank 0's adapters)
        torch.manual_seed(cfg.trainer.seed)
        model = apply_lora(model, cfg.lora)
    return model


@contextmanager
def zero3_construction(ds_config: dict) -> Iterator[object]:
    """Inside, transformers builds models (``from_config``/``from_pretrained``) partitioned at
    construction under ZeRO-3: every module's parameters are split over the ranks as soon as the
    module exists, and checkpoints are loaded shard by shard, so no rank ever holds the full model.

    transformers finds the DeepSpeed config through a *weak* reference to a live
    ``HfDeepSpeedConfig``; this context keeps it alive (keep the context open for as long as the
    model is used: fit included) and drops it on exit, so that models built afterwards (the
    consolidated rank-0 copy for export) are ordinary full models. torch.distributed must already
    be initialised (``run.train`` lets the Lightning strategy do it first)."""
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    live = HfDeepSpeedConfig(ds_config)
    if not live.is_zero3():
        raise ValueError("zero3_construction needs a ZeRO stage 3 DeepSpeed config")
    try:
        yield live
    finally:
        unset_hf_deepspeed_config()
        del live


def is_partitioned(p: torch.nn.Parameter) -> bool:
    """A ZeRO-3 parameter (its full tensor lives in shards; ``p.ds_numel`` elements in all)."""
    return hasattr(p, "ds_id")


def full_shape(p: torch.nn.Parameter) -> tuple[int, ...]:
    """The parameter's shape, also when ZeRO-3 holds only a shard of it here."""
    return tuple(p.ds_shape) if is_partitioned(p) else tuple(p.shape)


def assign(p: torch.nn.Parameter, value: torch.Tensor) -> None:
    """``p.data = value`` (in p's dtype), also for a ZeRO-3 partitioned parameter: gathered, written
    on rank 0 and re-partitioned from it. Call under ``torch.no_grad()``."""
    if is_partitioned(p):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            if deepspeed.comm.get_rank() == 0:
                p.data.copy_(value.to(p.dtype))
    else:
        p.data.copy_(value.to(p.dtype))


@torch.no_grad()
def seeded_init(model: torch.nn.Module, seed: int) -> None:
    """Random init that depends only on (seed, parameter name), never on the order in which
    construction drew random numbers nor on how the parameters are split over ranks: HF's init
    draws differently when it builds a model ZeRO-3-partitioned (no constructor inits, rank 0
    only), and a random-init run must start from the same weights with or without ZeRO-3.
    Same distribution as HF's ``_init_weights`` for the decoder LMs we support: linear and
    embedding weights ~ N(0, initializer_range) (padding row 0), norm weights 1 (Gemma's: 0, as
    its norms scale by 1 + weight), biases 0.
    ZeRO-3 parameters are gathered one at a time and written by rank 0."""
    std = float(getattr(model.config, "initializer_range", 0.02))
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            if id(p) in seen:  # tied weights: once
                continue
            seen.add(id(p))
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            shape = full_shape(p)
            if p_name == "bias":
                value = torch.zeros(shape)
            elif isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
                value = torch.empty(shape).normal_(0.0, std, generator=g)
                pad = getattr(module, "padding_idx", None)
                if isinstance(module, torch.nn.Embedding) and pad is not None:
                    value[pad] = 0
            elif len(shape) == 1 and type(module).__name__ == "Gemma3RMSNorm":
                value = torch.zeros(shape)  # Gemma's norms scale by (1 + weight)
            elif len(shape) == 1:  # RMSNorm / LayerNorm weights (OLMo2/Qwen3 q/k norms included)
                value = torch.ones(shape)
            else:
                raise ValueError(
                    f"seeded_init: no init rule for {name} ({type(module).__name__}, shape {shape})"
                )
            assign(p, value)


def apply_lora(model, lora_cfg):
    from peft import LoraConfig, get_peft_model

    lc = LoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=list(lora_cfg.target_modules),
        layers_to_transform=list(lora_cfg.layers_to_transform) if lora_cfg.layers_to_transform else None,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lc)
