"""Build the tokenizer, the model (+ LoRA) and validate the config before anything heavy."""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from omegaconf import DictConfig

from speed_train.speed.config import SpeedConfig, SpeedConfigError
from speed_train.speed.executors import EXECUTORS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ConfigError(ValueError):
    """The training config is inconsistent; raised before any model or data is loaded."""


def speed_config(cfg: DictConfig) -> SpeedConfig:
    try:
        return SpeedConfig(k=cfg.speed.k, anchor=cfg.speed.anchor, loss_scope=cfg.speed.loss_scope)
    except SpeedConfigError as e:
        raise ConfigError(f"speed: {e}") from None


def validate(cfg: DictConfig, world_size: int = 1) -> None:
    """Checks that need arithmetic or cross-field knowledge (types/unknown keys: the schema)."""
    sc = speed_config(cfg)
    if cfg.model.num_layers is not None:
        try:
            sc.resolve_k(cfg.model.num_layers)
        except SpeedConfigError as e:
            raise ConfigError(f"speed.k: {e}") from None
    if cfg.speed.executor not in EXECUTORS:
        raise ConfigError(f"speed.executor={cfg.speed.executor!r}: choose one of {', '.join(EXECUTORS)}")
    if cfg.model.source not in ("smollm2", "hub", "tiny"):
        raise ConfigError(f"model.source={cfg.model.source!r}: choose smollm2, hub or tiny")
    if cfg.model.source == "hub" and not cfg.model.pretrained:
        raise ConfigError("model.source=hub needs model.pretrained (a hub id or a local directory)")
    if cfg.model.dtype not in DTYPES:
        raise ConfigError(f"model.dtype={cfg.model.dtype!r}: choose one of {', '.join(DTYPES)}")
    if cfg.model.attn_backend not in ("sdpa", "flex"):
        raise ConfigError(f"model.attn_backend={cfg.model.attn_backend!r}: sdpa or flex")
    t = cfg.trainer
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
    if t.max_steps == 0 or (t.max_steps < 0 and t.epochs < 1):
        raise ConfigError("set trainer.max_steps > 0 or trainer.epochs >= 1")
    if cfg.objective.kind not in ("ce", "distill"):
        raise ConfigError(f"objective.kind={cfg.objective.kind!r}: ce or distill")
    if cfg.objective.kind == "distill" and not cfg.lora.enabled:
        raise ConfigError(
            "objective.kind=distill needs lora.enabled=true (teacher = adapters disabled, K = L)"
        )
    if cfg.optim.schedule not in ("linear", "cosine", "constant"):
        raise ConfigError(f"optim.schedule={cfg.optim.schedule!r}: linear, cosine or constant")
    if cfg.strategy.name not in ("auto", "ddp", "deepspeed"):
        raise ConfigError(f"strategy.name={cfg.strategy.name!r}: auto, ddp or deepspeed")
    if cfg.strategy.name == "deepspeed" and cfg.strategy.zero_stage not in (1, 2, 3):
        raise ConfigError(f"strategy.zero_stage={cfg.strategy.zero_stage}: 1, 2 or 3 with deepspeed")
    if cfg.data.pack and cfg.speed.executor not in EXECUTORS:
        raise ConfigError("data.pack needs a SPEED executor")


def load_tokenizer(cfg: DictConfig):
    m = cfg.model
    if m.source in ("smollm2", "tiny") and not m.tokenizer:
        from speed_train.assets import load_smollm2_tokenizer

        return load_smollm2_tokenizer()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(m.tokenizer or m.pretrained)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(cfg: DictConfig, tokenizer):
    m = cfg.model
    dtype = DTYPES[m.dtype]
    if m.source == "smollm2":
        from speed_train.assets import load_smollm2

        model, _ = load_smollm2(dtype=dtype)
    elif m.source == "tiny":
        from speed_train.speed.tiny import tiny_model

        kw = dict(m.tiny)
        kw.setdefault("vocab", len(tokenizer))
        model = tiny_model(m.arch, layers=m.num_layers or 4, seed=cfg.trainer.seed, dtype=dtype, **kw)
        model.config.pad_token_id = tokenizer.pad_token_id
        seeded_init(model, cfg.trainer.seed)  # the same weights whether partitioned (ZeRO-3) or not
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(m.pretrained, dtype=dtype)
    if m.num_layers is not None and model.config.num_hidden_layers != m.num_layers:
        raise ConfigError(
            f"model.num_layers={m.num_layers} but {m.name} has {model.config.num_hidden_layers} layers; fix the config"
        )
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


@torch.no_grad()
def seeded_init(model: torch.nn.Module, seed: int) -> None:
    """Random init that depends only on (seed, parameter name), never on the order in which
    construction drew random numbers nor on how the parameters are split over ranks: HF's init
    draws differently when it builds a model ZeRO-3-partitioned (no constructor inits, rank 0
    only), and a random-init run must start from the same weights with or without ZeRO-3.
    Same distribution as HF's ``_init_weights`` for the decoder LMs we support: linear and
    embedding weights ~ N(0, initializer_range) (padding row 0), norm weights 1, biases 0.
    ZeRO-3 parameters are gathered one at a time and written by rank 0."""
    std = float(getattr(model.config, "initializer_range", 0.02))
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            if id(p) in seen:  # tied weights: once
                continue
            seen.add(id(p))
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            shape = tuple(p.ds_shape) if is_partitioned(p) else tuple(p.shape)
            if p_name == "bias":
                value = torch.zeros(shape)
            elif isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
                value = torch.empty(shape).normal_(0.0, std, generator=g)
                pad = getattr(module, "padding_idx", None)
                if isinstance(module, torch.nn.Embedding) and pad is not None:
                    value[pad] = 0
            elif len(shape) == 1:  # RMSNorm / LayerNorm weights (OLMo2/Qwen3 q/k norms included)
                value = torch.ones(shape)
            else:
                raise ValueError(
                    f"seeded_init: no init rule for {name} ({type(module).__name__}, shape {shape})"
                )
            if is_partitioned(p):
                import deepspeed

                with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                    if deepspeed.comm.get_rank() == 0:
                        p.data.copy_(value.to(p.dtype))
            else:
                p.data.copy_(value.to(p.dtype))


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
