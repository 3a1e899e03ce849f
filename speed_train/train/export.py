"""Export after training: an HF-native SPEED model folder (``speed_train.hf.export``) with a
model card and ``speed_config.json``, plus the LoRA adapter when LoRA was trained.

Under ZeRO-3 every rank holds a shard of each parameter and the module's tensors are empty
(size 0): ``save_pretrained`` on it writes empty tensors. ``consolidate`` gathers the
parameters one at a time (all ranks take part; rank 0 keeps a CPU copy) and loads them into a
freshly built model on rank 0, which is then exported (the held-out table was computed on the
ranks before, see validation.HeldoutTable).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch
from omegaconf import DictConfig

from speed_train.atomic import atomic_dir, remove_orphans, write_json, write_text
from speed_train.speed.adapters import unwrap
from speed_train.speed.config import SPEED_CONFIG_FILE
from speed_train.train.build import load_model, speed_config
from speed_train.train.module import DivergenceError, non_finite

log = logging.getLogger(__name__)


def is_zero3(cfg: DictConfig) -> bool:
    return cfg.strategy.name == "deepspeed" and cfg.strategy.zero_stage == 3


def gather_full_state(model: torch.nn.Module, keep: bool) -> dict[str, torch.Tensor] | None:
    """Full parameters (and persistent buffers) of a ZeRO-3 model, gathered one parameter at a
    time; every rank must call this (the gathers are collectives); ``keep`` on rank 0 only."""
    import deepspeed

    persistent = set(model.state_dict().keys())
    state: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():  # tied parameters appear once
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            if keep:
                state[name] = p.detach().to("cpu", copy=True)
    if keep:
        for name, b in model.named_buffers():  # buffers are not partitioned
            if name in persistent:
                state[name] = b.detach().to("cpu", copy=True)
    return state if keep else None


def materialize(cfg: DictConfig, tokenizer, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A fresh (non-partitioned) model of the config with ``state`` loaded; every unique
    parameter must come from ``state``."""
    fresh = load_model(cfg, tokenizer)
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    loaded = set(state)
    not_loaded = [n for n, _ in fresh.named_parameters() if n not in loaded]
    if unexpected or not_loaded:
        raise RuntimeError(
            f"consolidating the ZeRO-3 model: unexpected keys {unexpected[:5]}, "
            f"parameters not gathered {not_loaded[:5]}"
        )
    return fresh


def consolidate(
    model: torch.nn.Module, cfg: DictConfig, tokenizer, is_global_zero: bool
) -> torch.nn.Module | None:
    """The trained model as one full in-memory model on rank 0 (None on other ranks under
    ZeRO-3; the model itself otherwise: with DDP and ZeRO-1/2 every rank holds full weights)."""
    if not is_zero3(cfg):
        return model if is_global_zero else None
    state = gather_full_state(model, keep=is_global_zero)
    return materialize(cfg, tokenizer, state) if is_global_zero else None


def check_not_empty(model: torch.nn.Module, what: str) -> None:
    empty = [n for n, t in model.state_dict().items() if t.numel() == 0]
    if empty:
        raise RuntimeError(
            f"refusing to export {what}: {len(empty)} empty (size-0) tensors, e.g. {empty[0]!r}; "
            "a ZeRO-3 model must be consolidated first (export.consolidate)"
        )


def os_error_of(e: BaseException) -> OSError | None:
    """The OS failure behind ``e``: an OSError itself, or safetensors' own error type, whose message
    carries the OS error number (``... No space left on device (os error 28)``)."""
    if isinstance(e, OSError):
        return e
    m = (
        re.search(r"\(os error (\d+)\)|code: (\d+)", str(e))
        if type(e).__name__ == "SafetensorError"
        else None
    )
    if m is None:
        return None
    number = int(m.group(1) or m.group(2))
    return OSError(number, os.strerror(number))


def write_gemma_terms(d: Path) -> None:
    """Gemma's terms go with every copy of the model (Gemma Terms of Use, section 3.1): the notice,
    and the terms themselves from the installed asset package when it is there."""
    import shutil

    from speed_train.assets import GEMMA_NOTICE, gemma_terms_file

    write_text(d / "NOTICE", GEMMA_NOTICE + "\n")
    terms = gemma_terms_file()
    if terms is not None:
        shutil.copyfile(terms, d / terms.name)


def export(model, tokenizer, cfg: DictConfig, out: Path, result=None) -> dict[str, str]:
    """``_export``; a failure to write (a full disk, a read-only folder) is raised as an OSError."""
    try:
        return _export(model, tokenizer, cfg, out, result)
    except Exception as e:
        err = os_error_of(e)
        if err is None or err is e:
            raise
        raise err from e


def _export(model, tokenizer, cfg: DictConfig, out: Path, result=None) -> dict[str, str]:
    """The trained model, written atomically under ``out``:

    - ``model/``: an HF-native SPEED model (``speed_train.hf.export``: loads with transformers alone,
      ``trust_remote_code=True``, and ``generate()`` runs it as trained), its tokenizer, a model
      card (README.md) and ``speed_config.json``; with LoRA, the adapters merged in;
    - ``adapter/``: the LoRA adapter (peft format) with ``speed_config.json``, when LoRA was trained.

    ``model`` must be a full (consolidated) model; with LoRA it is merged in place. With
    ``export.push_to_hub`` the model folder is uploaded to that Hub repository."""
    from speed_train.hf.card import is_gemma, model_card
    from speed_train.hf.export import make_hf_native

    check_not_empty(model, "the model")
    bad = non_finite(model.state_dict().items())
    if bad:
        raise DivergenceError(
            f"refusing to export: {len(bad)} weight tensors hold NaN or infinite values (e.g. {bad[0]}); "
            "the run diverged"
        )
    config = unwrap(model).config
    num_layers = config.num_hidden_layers
    settings = speed_config(cfg).with_k(num_layers)
    # speed_config.json (a LoRA adapter's settings; beside config.json's speed_* keys, from the
    # same object): K as the layer count, plus the model's depth
    speed = {**settings.to_dict(), "k_layers": settings.k, "num_layers": num_layers}
    paths: dict[str, str] = {}
    for name in ("adapter", "model"):  # left by an export that was killed (the run folder is locked)
        remove_orphans(out, name)

    def write_speed(d: Path) -> None:
        write_json(d / SPEED_CONFIG_FILE, speed)

    if hasattr(model, "peft_config"):

        def write_adapter(d: Path) -> None:
            model.save_pretrained(d)
            write_speed(d)

        atomic_dir(out / "adapter", write_adapter)
        paths["adapter"] = str(out / "adapter")
        merged = model.merge_and_unload()  # last use of the model: merging in place is fine
    else:
        merged = model
    repo = cfg.export.push_to_hub

    # the system anchor needs message boundaries that token ids do not show: a plain folder then
    hf_native = str(cfg.speed.anchor) != "system"

    def write_model(d: Path) -> None:
        merged.save_pretrained(d)
        tokenizer.save_pretrained(d)
        if hf_native:
            make_hf_native(d, tokenizer, settings)
        else:
            log.warning(
                "anchor=system: the export is a plain HF checkpoint (run it with speed_train.chat / eval)"
            )
        write_speed(d)
        write_text(d / "README.md", model_card(cfg, config, settings, result, repo, hf_native=hf_native))
        if is_gemma(cfg, config):
            write_gemma_terms(d)

    atomic_dir(out / "model", write_model)
    paths["model"] = str(out / "model")
    if repo:
        from huggingface_hub import upload_folder

        upload_folder(repo_id=repo, folder_path=paths["model"], commit_message="speed-train export")
        paths["hub"] = f"https://huggingface.co/{repo}"
    return paths
