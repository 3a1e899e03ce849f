"""Benchmarks run at small sizes; their accounting equals the formulas (no timing asserted)."""

from __future__ import annotations

import pytest

from speed_train.bench import inference, step
from speed_train.speed.flops import ModelShape, flop_ratio, step_flops
from speed_train.speed.tiny import tiny_config


def test_inference_bench_kv_bytes_equal_formula(tmp_path):
    out = inference.main(["--lengths", "64,128", "--runs", "1", "--decode-steps", "3", "--k", "5",
                          "--bandwidth-gbs", "10", "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "p.png")])  # fmt: skip
    for r in out["rows"]:
        assert r["kv_matches_formula"], r
        # cpu_small: 8 layers, 2 KV heads x 64 dims, fp32 -> 1 KiB per token per layer
        n, kept = r["length"] + 3, 3 + 3
        assert r["kv_full"] == 8 * n * 1024 and r["kv_speed"] == (5 * n + 3 * kept) * 1024
    assert (tmp_path / "p.png").stat().st_size > 0 and (tmp_path / "r.json").exists()


def test_step_flops_by_hand():
    shape = ModelShape.from_config(
        tiny_config("llama", layers=4, hidden=32, heads=4, kv_heads=2, intermediate=64, vocab=96)
    )
    batch = step.synthetic_batch(batch=1, seq=16, prompt_share=0.5, vocab=96)
    # one conversation: 1 anchor + 7 prompt + 2 header + 6 response; targets = 6 response tokens
    P = 32 * (32 + 2 * 16) + 32 * 32 + 3 * 32 * 64  # layer weights
    layer = lambda n: 2 * n * P + 4 * 32 * n * (n + 1) / 2  # noqa: E731
    head = 2 * 32 * 96
    assert step_flops(shape, batch, 4, "full_hf") == 3 * (4 * layer(16) + 16 * head)
    assert step_flops(shape, batch, 2, "mask") == 3 * (4 * layer(16) + 6 * head)
    # gather: upper rows = anchor + header + response = 9 tokens
    assert step_flops(shape, batch, 2, "gather") == 3 * (2 * layer(16) + 2 * layer(9) + 6 * head)
    assert flop_ratio(shape, batch, 2) == pytest.approx(
        (2 * layer(16) + 2 * layer(9) + 6 * head) / (4 * layer(16) + 16 * head)
    )


def test_step_bench_runs_small(tmp_path):
    out = step.main(["--layers", "2", "--hidden", "32", "--heads", "2", "--vocab", "64", "--seq", "32", "--batch", "2",
                     "--k", "1", "--runs", "1", "--json", str(tmp_path / "s.json")])  # fmt: skip
    names = [r["variant"] for r in out["rows"]]
    assert names == ["vanilla", "full_K=L", "mask", "gather"]
    assert out["rows"][0]["ratio"] == 1.0 and out["rows"][0]["flop_ratio"] == 1.0
