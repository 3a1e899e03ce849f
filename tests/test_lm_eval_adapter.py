"""The lm-eval model type `speed` runs a local-file task (no hub) and scores like our scorer."""

from __future__ import annotations

import json

import pytest

lm_eval = pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    from speed_train.assets import load_smollm2_tokenizer
    from speed_train.speed.tiny import tiny_model

    d = tmp_path_factory.mktemp("tiny")
    tok = load_smollm2_tokenizer()
    tiny_model("llama", layers=4, vocab=len(tok)).save_pretrained(d)
    tok.save_pretrained(d)
    (d / "speed_config.json").write_text(json.dumps({"k": 2, "anchor": "bos"}))
    return d


DOCS = [
    {
        "question": "What is the capital of France?",
        "choices": ["Paris", "Berlin", "Rome"],
        "gold": 0,
        "answer": "Paris",
    },
    {"question": "What color is the sky?", "choices": ["green", "blue"], "gold": 1, "answer": "blue"},
    {
        "question": "How many legs does a cat have?",
        "choices": ["four", "two", "six"],
        "gold": 0,
        "answer": "four",
    },
]


def write_tasks(d):
    data = d / "qa.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in DOCS))
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (d / "mc.yaml").write_text(
        "task: speed_local_mc\n" + common + "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{gold}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    (d / "gen.yaml").write_text(
        "task: speed_local_gen\n" + common + "output_type: generate_until\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_target: "{{answer}}"\n'
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 4\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n"
    )


def test_lm_eval_local_tasks_under_speed(saved_model, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    import speed_train.eval.lm_eval_adapter  # noqa: F401  (registers "speed")
    from speed_train.eval.scoring import generate_text, score_requests

    write_tasks(tmp_path)
    out = simple_evaluate(model="speed", model_args=f"pretrained={saved_model},batch_size=2",  # by registered name
                          tasks=["speed_local_mc", "speed_local_gen"], log_samples=True,
                          task_manager=TaskManager(include_path=str(tmp_path)))  # fmt: skip
    from lm_eval.api.registry import get_model

    lm = get_model("speed").create_from_arg_string(f"pretrained={saved_model}")
    assert lm.cfg.k == 2 and lm.cfg.anchor == "bos"  # from speed_config.json
    for full in ("k=full", "k=None"):  # explicit full depth wins over the saved K, string or parsed
        assert get_model("speed").create_from_arg_string(f"pretrained={saved_model},{full}").cfg.k is None
    assert get_model("speed").create_from_arg_obj({"pretrained": str(saved_model), "k": None}).cfg.k is None
    acc = out["results"]["speed_local_mc"]["acc,none"]
    # independent: our scorer on the same contexts and " choice" continuations
    ctxs = [f"Question: {d['question']}\nAnswer:" for d in DOCS]
    scores = score_requests(
        lm.model, lm.tokenizer, lm.cfg, [(c, [" " + x for x in d["choices"]]) for c, d in zip(ctxs, DOCS)]
    )
    picks = [max(range(len(s)), key=lambda j: s[j].logprob) for s in scores]
    assert acc == pytest.approx(sum(p == d["gold"] for p, d in zip(picks, DOCS)) / len(DOCS))
    # generate_until: lm-eval's responses are exactly our SPEED generation, cut at "\n"
    gens = generate_text(lm.model, lm.tokenizer, lm.cfg, ctxs, max_new_tokens=4, stop_sequences=("\n",))
    samples = sorted(out["samples"]["speed_local_gen"], key=lambda x: x["doc_id"])
    assert [x["resps"][0][0] for x in samples] == gens
    em = sum(g.strip() == d["answer"] for g, d in zip(gens, DOCS)) / len(DOCS)
    assert out["results"]["speed_local_gen"]["exact_match,none"] == pytest.approx(em)


def test_lm_eval_cli_with_speed_model(saved_model, tmp_path, monkeypatch):
    """`python -m speed_train.eval.lm_eval_adapter` (= `speed-lm-eval`) is lm-eval's CLI + `speed`."""
    from speed_train.eval import lm_eval_adapter

    write_tasks(tmp_path)
    monkeypatch.setattr("sys.argv", ["x", "--model", "speed", "--model_args", f"pretrained={saved_model},k=full",
                                     "--tasks", "speed_local_mc", "--include_path", str(tmp_path),
                                     "--output_path", str(tmp_path / "res")])  # fmt: skip
    lm_eval_adapter.main()
    (res,) = (tmp_path / "res").rglob("results_*.json")
    data = json.loads(res.read_text())
    assert data["config"]["model"] == "speed" and "acc,none" in data["results"]["speed_local_mc"]


def test_lm_eval_unknown_model_arg(saved_model):
    from speed_train.eval.lm_eval_adapter import SpeedLMEval

    with pytest.raises(ValueError, match="unknown model_args for --model speed: kk"):
        SpeedLMEval.create_from_arg_string(f"pretrained={saved_model},kk=3")
