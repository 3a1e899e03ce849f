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

    from speed_train.eval.lm_eval_adapter import SpeedLMEval
    from speed_train.eval.scoring import score_requests

    write_tasks(tmp_path)
    lm = SpeedLMEval.create_from_arg_string(f"pretrained={saved_model},batch_size=2")
    assert lm.cfg.k == 2 and lm.cfg.anchor == "bos"  # from speed_config.json
    out = simple_evaluate(model=lm, tasks=["speed_local_mc", "speed_local_gen"],
                          task_manager=TaskManager(include_path=str(tmp_path)))  # fmt: skip
    acc = out["results"]["speed_local_mc"]["acc,none"]
    # independent: our scorer on the same contexts and " choice" continuations
    reqs = [(f"Question: {d['question']}\nAnswer:", [" " + c for c in d["choices"]]) for d in DOCS]
    scores = score_requests(lm.model, lm.tokenizer, lm.cfg, reqs)
    expect = sum(
        max(range(len(s)), key=lambda j: s[j].logprob) == d["gold"] for s, d in zip(scores, DOCS)
    ) / len(DOCS)
    assert acc == pytest.approx(expect)
    assert "exact_match,none" in out["results"]["speed_local_gen"]
