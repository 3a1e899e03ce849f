"""Benchmarks run at small sizes; their accounting equals the formulas (no timing asserted)."""

from __future__ import annotations

from pathlib import Path

import pytest

from speed_train.bench import eval as eval_bench
from speed_train.bench import inference, step
from speed_train.speed.flops import ModelShape, flop_ratio, step_flops
from speed_train.speed.tiny import tiny_config


@pytest.mark.parametrize("batch", [1, 2])
def test_inference_bench_kv_bytes_equal_formula(tmp_path, batch):
    out = inference.main(
        [
            "--lengths",
            "64,128",
            "--runs",
            "1",
            "--decode-steps",
            "3",
            "--k",
            "5",
            "--batch",
            str(batch),
            "--bandwidth-gbs",
            "10",
            "--json",
            str(tmp_path / "r.json"),
            "--plot",
            str(tmp_path / "p.png"),
        ]
    )
    for r in out["rows"]:
        assert r["kv_matches_formula"] and r["kv_written_matches"], r
        # cpu_small: 8 layers, 2 KV heads x 64 dims, fp32 -> 1 KiB per token per layer
        n, kept = r["length"] + 3, 3 + 3
        assert r["kv_full"] == batch * 8 * n * 1024 and r["kv_speed"] == batch * (5 * n + 3 * kept) * 1024
    assert (tmp_path / "p.png").stat().st_size > 0 and (tmp_path / "r.json").exists()
    # decode roofline: all weights but the untied input embedding table (one row read per step)
    p = inference.PRESETS["cpu_small"]
    table = p["vocab"] * p["hidden"] * 4
    assert out["decode_weight_bytes"] == out["weight_bytes"] - table + batch * p["hidden"] * 4
    r = out["rows"][0]
    kv = batch * 8 * r["length"] * 1024  # the prompt's KV, read by every decode step
    assert r["tpot_full_roofline_s"] == pytest.approx((out["decode_weight_bytes"] + kv) / 10e9)


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


def test_step_flops_count_sliding_window_pairs():
    """Gemma-3: a query in a sliding layer has at most `window` keys."""
    shape = ModelShape.from_config(
        tiny_config("gemma3", layers=3, hidden=32, heads=4, kv_heads=2, intermediate=64, vocab=96)
    )
    assert shape.windows == (8, 8, None)  # the tiny Gemma: window 8, full attention every third layer
    batch = step.synthetic_batch(batch=1, seq=16, prompt_share=0.5, vocab=96)
    P = 32 * (32 + 2 * 16) + 32 * 32 + 3 * 32 * 64
    layer = lambda pairs: 2 * 16 * P + 4 * 32 * pairs  # noqa: E731
    causal, windowed = 16 * 17 / 2, 8 * 9 / 2 + 8 * 8  # queries 8..15 see 8 keys each
    assert step_flops(shape, batch, 3, "full_hf") == 3 * (
        2 * layer(windowed) + layer(causal) + 16 * 2 * 32 * 96
    )


def test_step_bench_presets_are_real_shapes():
    args = step.parse_args(["--preset", "gemma3_270m"])
    assert (args.arch, args.layers, args.hidden, args.vocab, args.k) == ("gemma3", 18, 640, 262144, 14)
    assert step.parse_args(["--preset", "smollm2_135m", "--k", "20"]).k == 20
    import torch
    from transformers import AutoModelForCausalLM

    for preset, n_params in (("gemma3_270m", 268_098_176), ("smollm2_135m", 134_515_008)):
        a = step.parse_args(["--preset", preset])
        cfg = tiny_config(
            a.arch,
            layers=a.layers,
            hidden=a.hidden,
            heads=a.heads,
            kv_heads=a.kv_heads,
            intermediate=a.intermediate,
            vocab=a.vocab,
            **a.overrides,
        )
        with torch.device("meta"):
            assert sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters()) == n_params


def test_step_bench_runs_small(tmp_path):
    out = step.main(
        [
            "--layers",
            "2",
            "--hidden",
            "32",
            "--heads",
            "2",
            "--vocab",
            "64",
            "--seq",
            "32",
            "--batch",
            "2",
            "--k",
            "1",
            "--runs",
            "1",
            "--json",
            str(tmp_path / "s.json"),
        ]
    )
    names = [r["variant"] for r in out["rows"]]
    assert names == ["vanilla", "full_K=L", "mask", "gather"]
    assert out["rows"][0]["ratio"] == 1.0 and out["rows"][0]["flop_ratio"] == 1.0


def _script_invocations(path: str) -> list[tuple[str, list[str]]]:
    """(module, argv) of every ``-m speed_train.bench.<module> ...`` line of a shell script."""
    import shlex
    import tempfile
    from pathlib import Path

    text = Path(path).read_text().replace("\\\n", " ")
    calls = []
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        if "-m" in words and words[words.index("-m") + 1].startswith("speed_train.bench."):
            i = words.index("-m")
            argv = []
            for w in words[i + 2 :]:
                if w.startswith(("2>", "|", ">")):
                    break
                argv.append(w.replace("$OUT", tempfile.gettempdir()))  # the script creates $OUT first
            calls.append((words[i + 1].rsplit(".", 1)[1], argv))
    return calls


def test_gpu_script_arguments_are_valid():
    """The one-shot GPU script cannot be run here: at least its every argument must parse."""
    calls = _script_invocations("scripts/gpu_checks.sh")
    assert [m for m, _ in calls] == ["inference", "step", "step"]  # 128K first
    parsed = {m: (step if m == "step" else inference).parse_args(argv) for m, argv in calls}
    paper = parsed["inference"]  # the paper's setting: Llama-3.1-8B shape, bf16, K = 24, 128K
    assert (paper.preset, paper.dtype, paper.k) == ("llama31_8b", "bfloat16", 24)
    assert paper.lengths[0] == 131072 and inference.PRESETS["llama31_8b"]["layers"] == 32  # 128K first


@pytest.mark.parametrize(
    "module,argv,message",
    [
        (
            inference,
            ["--preset", "llama31_8b", "--k", "40"],
            "--k 40 must be in 1..32 (preset llama31_8b has 32 layers)",
        ),
        (inference, ["--lengths", "8k"], "--lengths '8k' must be comma-separated integers"),
        (inference, ["--lengths", "2"], "every prompt needs at least 4 tokens"),
        (step, ["--layers", "4", "--k", "0"], "--k 0 must be in 1..4 (--layers)"),
        (step, ["--hidden", "100", "--heads", "3"], "--hidden 100 must be a multiple of --heads 3"),
        (eval_bench, ["--limit", "0"], "--limit 0: must be at least 1"),
        (eval_bench, ["--variants", "rows,fast"], "--variants fast: choose from rows, tree"),
        (eval_bench, ["--k", "1.5"], "fractional cutoff k=1.5 is outside (0, 1]"),
        (step, ["--runs", "0"], "--runs 0 must be >= 1"),  # was a StatisticsError traceback
        (step, ["--prompt-share", "1.5"], "--prompt-share 1.5 must be in (0, 1) and leave room"),
        # was: the folder created at the filesystem root
        (
            step,
            ["--json", "/no/such/dir/x.json"],
            "argument --json: /no/such/dir/x.json: the folder /no/such/dir does not exist",
        ),
    ],
)
def test_bad_bench_arguments_fail_before_building_a_model(module, argv, message, capsys, monkeypatch):
    import speed_train.speed.tiny as tiny

    def no_model(*a, **kw):
        raise AssertionError("a model was built before the arguments were checked")

    monkeypatch.setattr(tiny, "tiny_model", no_model)
    monkeypatch.setattr(module, "tiny_model", no_model, raising=False)
    with pytest.raises(SystemExit) as e:
        module.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not Path("/no").exists()


def test_gpu_script_fits_its_time_box():
    """The sum of the per-check timeouts is the script's worst case: within the 10-minute limit of
    one device command, the 8B inference part within 5 minutes."""
    import re
    from pathlib import Path

    total = sum(
        int(t) for t in re.findall(r"^timeout (\d+) ", Path("scripts/gpu_checks.sh").read_text(), re.M)
    )
    assert 0 < total <= 600, total
    assert re.search(
        r"^timeout 300 \$PY -m speed_train.bench.inference", Path("scripts/gpu_checks.sh").read_text(), re.M
    )


def test_inference_bench_keeps_finished_lengths_when_cut_off(tmp_path, monkeypatch):
    import json

    real = inference.run_one

    def cut_at_second_length(model, prompts, *a, **kw):
        if len(prompts[0].input_ids) == 96:
            raise KeyboardInterrupt  # what a timeout's signal does mid-run
        return real(model, prompts, *a, **kw)

    monkeypatch.setattr(inference, "run_one", cut_at_second_length)
    with pytest.raises(KeyboardInterrupt):
        inference.main(
            [
                "--lengths",
                "64,96",
                "--runs",
                "1",
                "--decode-steps",
                "2",
                "--bandwidth-gbs",
                "10",
                "--json",
                str(tmp_path / "r.json"),
            ]
        )
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert [r["length"] for r in rows] == [64] and rows[0]["kv_matches_formula"]
