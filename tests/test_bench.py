"""Benchmarks run at small sizes; their accounting equals the formulas (no timing asserted)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from speed_train.bench import eval as eval_bench
from speed_train.bench import hf_generate, inference, step
from speed_train.bench.measure import SavedForBackward, TokenTimes, kv_tensor_bytes
from speed_train.speed.config import SpeedConfig
from speed_train.speed.flops import ModelShape, flop_ratio, step_flops
from speed_train.speed.tiny import tiny_config


@pytest.mark.slow
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


@pytest.mark.slow
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
    for r in out["rows"]:  # memory beside time: the step's peak RSS and what autograd keeps
        assert r["saved_bytes"] > 0 and "peak_rss_delta_bytes" in r
    # T = 32 is one conversation per row: the lower layers run the causal kernel (no mask) and
    # the mask path's upper layer keeps the one [B, 1, T, T] mask
    assert [r["mask_storages"] for r in out["rows"]] == [0, 0, 1, 0]


def test_step_bench_smollm2_preset_and_variants():
    args = step.parse_args(["--preset", "smollm2", "--variants", "gather,vanilla,mask", "--threads", "1"])
    shape = (args.layers, args.hidden, args.heads, args.kv_heads, args.intermediate, args.vocab, args.k)
    assert shape == (30, 576, 9, 3, 1536, 49152, 22)
    assert args.variants == ["vanilla", "mask", "gather"]  # always in the table's order
    small = step.parse_args(["--hidden", "96", "--heads", "3"])  # the issue-2 defaults as before
    got = (small.layers, small.kv_heads, small.intermediate, small.k, small.warmup_seq)
    assert got == (8, 3, 256, 6, 1024)
    out = step.main(
        ["--layers", "2", "--hidden", "32", "--heads", "4", "--kv-heads", "2", "--intermediate", "48"]
        + ["--vocab", "64", "--seq", "24", "--batch", "1", "--k", "1", "--runs", "1"]
        + ["--variants", "vanilla,gather", "--warmup-seq", "0", "--grad-checkpointing"]
    )
    assert [r["variant"] for r in out["rows"]] == ["vanilla", "gather"]


@pytest.mark.parametrize("executor", ["mask", "gather"])
def test_one_mask_per_depth_is_kept_for_backward_whatever_the_layer_count(executor):
    """A dense mask serves all the layers of its depth: autograd keeps that one tensor, never a
    copy per layer (O(layers x T^2)). Packed rows make the lower layers' mask dense too."""
    from speed_train.speed.batch import collate, pack_first_fit
    from speed_train.speed.executors import speed_loss
    from speed_train.speed.roles import EncodedExample
    from speed_train.speed.tiny import tiny_model

    T, layers, k = 40, 5, 2  # T differs from the head dim (8), so RoPE tables are not counted
    model = tiny_model("llama", layers=layers, hidden=32, heads=4, kv_heads=2, vocab=64).train()
    rows = [step.synthetic_batch(1, n, 0.5, 64, seed=n) for n in (16, 24)]
    exs = [
        EncodedExample(
            r.input_ids[0].tolist(), r.roles[0].tolist(), r.turns[0].tolist(), r.labels[0].tolist()
        )
        for r in rows
    ]
    packed = collate(pack_first_fit(exs, T), pad_id=0, pack_to=T)
    assert packed.input_ids.shape == (1, T) and int(packed.seq_ids.max()) == 1
    with SavedForBackward(T) as probe:
        speed_loss(model, packed, k, executor=executor).mean.backward()
    if executor == "mask":  # lower and upper masks, each kept once, saved by every layer
        assert (probe.mask_storages, probe.mask_saves) == (2, layers)
        assert probe.mask_bytes == 2 * T * T * 4
    else:  # the lower layers' block-diagonal mask; the gather rows are plain causal
        assert (probe.mask_storages, probe.mask_saves) == (1, k)


@pytest.fixture(scope="module")
def tiny_paths(tmp_path_factory):
    """A tiny Llama, its HF-native export at K = 2 of 4, and a chat prompt for it."""
    from transformers import AutoModelForCausalLM

    from speed_train.assets import load_smollm2_tokenizer
    from speed_train.hf.export import make_hf_native
    from speed_train.speed.tiny import tiny_model

    tok = load_smollm2_tokenizer()
    model = tiny_model("llama", layers=4, vocab=len(tok), max_position_embeddings=512)
    folder = tmp_path_factory.mktemp("bench") / "export"
    model.save_pretrained(folder)
    make_hf_native(folder, tok, SpeedConfig(k=2, anchor="bos"))
    native = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    return model, native, hf_generate.chat_prompt(tok, 60), tok.pad_token_id


def _paths(tiny_paths):
    from speed_train.speed.generate import speed_generate

    model, native, prompt, pad = tiny_paths
    ids = torch.tensor([prompt.input_ids])

    def hf(m):
        def run(n, streamer):
            return m.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                pad_token_id=pad, streamer=streamer, return_dict_in_generate=True,
            ).cache  # fmt: skip

        return run

    def ours(n, streamer):
        return speed_generate(
            native, [prompt], 2, max_new_tokens=n, pad_token_id=pad, streamer=streamer
        ).cache

    return {"hf": hf(model), "hf_native": hf(native), "speed_generate": ours}


@pytest.mark.parametrize("path", ["hf", "hf_native", "speed_generate"])
def test_token_times_one_timestamp_per_new_token(tiny_paths, path):
    timer = TokenTimes()
    with torch.no_grad():
        _paths(tiny_paths)[path](5, timer)
    assert len(timer.times) == 5 and timer.prompt_seen and timer.ended is not None
    assert timer.times == sorted(timer.times) and timer.times[0] > timer.t0
    assert timer.tpot == pytest.approx((timer.times[-1] - timer.times[0]) / 4) and len(timer.gaps) == 4


@pytest.mark.parametrize("path", ["hf", "hf_native", "speed_generate"])
def test_kv_bytes_from_cache_tensors_equal_formula(tiny_paths, path):
    from speed_train.speed.roles import PROMPT

    model, _, prompt, _ = tiny_paths
    shape = ModelShape.from_config(model.config)
    n, kept, new = len(prompt), sum(r != PROMPT for r in prompt.roles), 6
    with torch.no_grad():
        m = hf_generate.timed_call(_paths(tiny_paths)[path], new)
    assert kept == 5  # SmolLM2's chat template: the BoS anchor <|im_start|> + <|im_start|> ass istant \n
    per_token_layer = 2 * 2 * 8 * 4  # K and V x 2 K/V heads x head dim 8 x fp32
    if path == "hf":  # DynamicCache: prompt + new - 1 tokens (the last is never fed back) at every layer
        assert m["kv_held_bytes"] == m["kv_active_bytes"] == 4 * (n + new - 1) * per_token_layer
        assert m["kv_held_bytes"] == inference.kv_bytes_formula(shape, 4, n + new - 1, kept + new - 1, 1, 4)
    else:  # SpeedCache: allocated for prompt + new; the slots written hold prompt + new - 1
        assert m["kv_active_bytes"] == inference.kv_bytes_formula(shape, 2, n + new - 1, kept + new - 1, 1, 4)
        assert m["kv_active_bytes"] == (2 * (n + new - 1) + 2 * (kept + new - 1)) * per_token_layer
        assert m["kv_held_bytes"] == inference.kv_bytes_formula(shape, 2, n + new, kept + new, 1, 4)
    assert m["ttft_s"] > 0 and m["tpot_s"] > 0


def test_kv_tensor_bytes_reads_hf_and_speed_caches():
    from transformers import DynamicCache

    from speed_train.speed.adapters import model_parts
    from speed_train.speed.generate import SpeedCache
    from speed_train.speed.tiny import tiny_model

    model = tiny_model("llama", layers=3)
    cache = DynamicCache(config=model.config)
    for i in range(3):
        cache.update(torch.zeros(1, 2, 7, 8), torch.zeros(1, 2, 7, 8), i)
    assert kv_tensor_bytes(cache) == 3 * 2 * (2 * 7 * 8 * 4)
    speed = SpeedCache(model_parts(model), 2, 1, 10, 3, torch.float32, "cpu")
    assert kv_tensor_bytes(speed) == (2 * 10 + 1 * 3) * 2 * (2 * 8 * 4)
    assert kv_tensor_bytes(speed) == sum(speed.allocated_bytes_per_layer())


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
        (step, ["--preset", "smollm2", "--k", "31"], "--k 31 must be in 1..30 (--layers)"),
        (step, ["--kv-heads", "3"], "--kv-heads 3 must divide --heads 4"),
        (step, ["--variants", "mask,gather"], "that includes vanilla (the baseline)"),
        (step, ["--variants", "vanilla,fast"], "--variants vanilla,fast: a comma list"),
        (step, ["--threads", "0"], "--threads 0 must be >= 1"),
        (step, ["--warmup-seq", "4"], "--warmup-seq must be 0 (no warm-up) or >= 8"),
        (hf_generate, ["--k", "31"], "--k 31 must be in 1..30 (SmolLM2-135M has 30 layers)"),
        (
            hf_generate,
            ["--lengths", "8192"],
            "8192 + --decode-steps 16 = 8208 tokens exceeds the model's 8192",
        ),
        (hf_generate, ["--decode-steps", "1"], "--decode-steps 1: at least 2"),
        (hf_generate, ["--lengths", "4k"], "--lengths '4k': a comma list of token counts"),
        (hf_generate, ["--threads", "0"], "--threads 0 must be >= 1"),
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

    import speed_train.assets as assets

    monkeypatch.setattr(tiny, "tiny_model", no_model)
    monkeypatch.setattr(module, "tiny_model", no_model, raising=False)
    monkeypatch.setattr(assets, "load_smollm2", no_model)
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
