"""Resume guards: a checkpoint records what defines the run that wrote it, and only that run
continues from it.

The fingerprint (:func:`run_fingerprint`) is a flat mapping, ``"<config key>": value``: the model,
the SPEED settings, the data recipe and what selects its examples, the LoRA settings, the
optimiser and schedule, the objective, the step plan's global batch and seed, plus three values
known once the data is built: ``data.content`` (a hash of every training example's length and
supervised token count, independent of paths and file dates), ``tokenizer`` (a hash of the
tokenizer's vocabulary size, chat template and special tokens) and ``model.architecture`` (the
base model's type and shape from its config, whatever name or path it has). Left out on purpose:
``trainer.max_steps`` and ``trainer.epochs`` (a run may be extended), and what does not change the
trained weights (devices, precision, executors, logging, checkpointing, evaluation).

It travels in the checkpoint (``speed_run``, checked when Lightning loads it) and in its
completion record (``<name>.complete`` / ``COMPLETE``, read as JSON before any data or weight is
loaded). A difference is refused in one line naming the keys; the message says how to train with
the new settings from the checkpoint's weights instead: ``init_from=<checkpoint>`` in a new run
folder, which loads the trained weights only (:func:`load_initial_weights`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from speed_train.train.build import ConfigError, model_config_or_none
from speed_train.train.checkpointing import ResumeError, checkpoint_step, saved_run, verify

log = logging.getLogger(__name__)

# The config keys that define a run, by section.
RUN_KEYS = {
    "model": (
        "name",
        "source",
        "pretrained",
        "tokenizer",
        "chat_template",
        "arch",
        "num_layers",
        "tiny",
        "dtype",
    ),
    "speed": ("k", "anchor", "loss_scope", "add_bos"),
    "data": (
        "recipe",
        "max_length",
        "truncate",
        "pack",
        "held_out",
        "held_out_recipe",
        "max_train_examples",
    ),
    "lora": ("enabled", "r", "alpha", "dropout", "target_modules", "layers_to_transform"),
    "optim": (
        "lr",
        "weight_decay",
        "betas",
        "eps",
        "schedule",
        "warmup_ratio",
        "min_lr_ratio",
        "decay_ratio",
        "gradient_clip",
    ),
    "objective": ("kind", "reduce", "temperature", "ce_weight"),
    "trainer": ("global_batch_size", "seed"),
}
# Keys recorded under another name by earlier versions: old name -> current name.
RENAMED = {"data.add_bos": "speed.add_bos"}
# What identifies a base model's architecture in its HF config.
ARCHITECTURE = (
    "model_type",
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)
# Differences in these leave the checkpoint's weights unusable for this run's model.
SHAPE_KEYS = ("model.", "lora.", "tokenizer")


def _plain(value: Any) -> Any:
    """A config value as JSON has it (enums as strings, tuples as lists), to compare with a record."""
    if isinstance(value, DictConfig) or OmegaConf.is_list(value):
        value = OmegaConf.to_container(value, resolve=True, enum_to_str=True)
    return json.loads(json.dumps(value, default=str))


def run_fingerprint(cfg: DictConfig, data=None) -> dict[str, Any]:
    """What defines the run (see the module doc); ``data``: the run's ``TrainData``, for the
    entries known once the data is built (left out before)."""
    fp = {f"{section}.{key}": _plain(cfg[section][key]) for section, keys in RUN_KEYS.items() for key in keys}
    if data is not None:
        fp["data.content"] = _digest([data.train.lengths.tolist(), data.train.supervised_counts().tolist()])
        from speed_train.data.pipeline import tokenizer_fingerprint

        tok = tokenizer_fingerprint(data.tokenizer)
        for where in ("name_or_path", "class"):  # where it was read from, and how: not what it is
            tok.pop(where)
        fp["tokenizer"] = _digest(tok)
        config = model_config_or_none(cfg)
        if config is not None:  # the base model's shape, behind whatever name or path
            fp["model.architecture"] = _plain({k: getattr(config, k, None) for k in ARCHITECTURE})
    return fp


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key saved -> current`` for every key both know and that differs."""
    saved = {RENAMED.get(k, k): v for k, v in saved.items()}
    return [
        f"{k} {json.dumps(saved[k])} -> {json.dumps(v)}"
        for k, v in current.items()
        if k in saved and saved[k] != v
    ]


def refusal(ckpt: str, diffs: list[str]) -> str:
    changed = [d.split(" ", 1)[0] for d in diffs]
    new_run = "start a new run (another hydra.run.dir)"
    if not any(k.startswith(SHAPE_KEYS) for k in changed):
        new_run += f" with init_from={ckpt} to begin from its weights"
    return (
        f"resume: {ckpt} was saved by a run with other settings ({'; '.join(diffs)}): to continue that "
        f"run, resume without these changes; to train with them, {new_run}"
    )


def check_resume(ckpt: str | None, current: dict[str, Any]) -> None:
    """Refuse a checkpoint whose record names other settings (before any data or weight is read);
    a checkpoint without a record (an older version, a copied file) is checked at load."""
    if ckpt is None:
        return
    saved = saved_run(ckpt)
    if saved is None:
        return
    diffs = differences(saved, current)
    if diffs:
        raise ResumeError(refusal(ckpt, diffs))


def check_steps(ckpt: str | None, total_steps: int) -> None:
    """A checkpoint past the run's last step would silently stand for a shorter run."""
    step = checkpoint_step(ckpt) if ckpt is not None else None
    if step is not None and step > total_steps:
        raise ResumeError(
            f"resume: {ckpt} is at optimizer step {step}, past this run's {total_steps} steps "
            f"(trainer.max_steps / epochs): set trainer.max_steps>={step} to continue it, or start a new "
            "run (another hydra.run.dir)"
        )


def check_loaded(checkpoint: dict, current: dict[str, Any], ckpt: str | None) -> None:
    """At load (``SpeedLM.on_load_checkpoint``): the fingerprint inside the checkpoint itself."""
    saved = checkpoint.get("speed_run")
    if saved is None:
        log.warning("checkpoint %s records no run settings (an older version): not verified", ckpt)
        return
    diffs = differences(saved, current)
    if diffs:
        raise ResumeError(refusal(str(ckpt), diffs))


def _shape_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    return [d for d in differences(saved, current) if d.startswith(SHAPE_KEYS)]


def check_init_from(path: str | None, current: dict[str, Any]) -> None:
    """``init_from`` must name a complete checkpoint file of this run's model (by its record),
    before any work."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise ConfigError(
            f"init_from={path}: a DeepSpeed checkpoint folder; convert it to one file first "
            "(lightning.pytorch.utilities.deepspeed.convert_zero_checkpoint_to_fp32_state_dict)"
        )
    why = "no such file" if not p.exists() else verify(p)
    if why is not None:
        raise ConfigError(f"init_from={path}: not a usable checkpoint ({why})")
    diffs = _shape_differences(saved_run(p) or {}, current)
    if diffs:
        raise ConfigError(f"init_from={path}: its weights are for another model ({'; '.join(diffs)})")


def load_initial_weights(module, path: str, current: dict[str, Any]) -> None:
    """A new run's start from another run's trained weights (not its optimiser, schedule or step):
    the checkpoint's ``state_dict`` (the trained parameters; frozen ones stay as built), loaded
    with ``weights_only`` through Lightning. Its model and LoRA settings must be this run's.
    ZeRO-3-partitioned parameters are gathered one at a time and written by rank 0."""
    import torch
    from lightning.fabric.utilities.cloud_io import _load

    from speed_train.train.build import assign, full_shape

    checkpoint = _load(path, map_location="cpu", weights_only=True)
    diffs = _shape_differences(checkpoint.get("speed_run") or {}, current)
    if diffs:
        raise ConfigError(f"init_from={path}: its weights are for another model ({'; '.join(diffs)})")
    state = checkpoint.get("state_dict") or {}
    params = dict(module.named_parameters())
    unexpected = [n for n in state if n not in params]
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    shapes = {n: full_shape(p) for n, p in params.items()}
    resized = [n for n, v in state.items() if n in shapes and tuple(v.shape) != shapes[n]]
    if unexpected or missing or resized or not state:
        raise ConfigError(
            f"init_from={path}: its weights do not fit this model (unexpected {unexpected[:3]}, "
            f"missing {missing[:3]}, other shapes {resized[:3]})"
        )
    with torch.no_grad():
        for name, value in state.items():
            assign(params[name], value)
    log.info("initial weights: %d tensors from %s", len(state), path)
