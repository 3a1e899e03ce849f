"""The lm-eval model type `speed` runs a local-file task (no hub) and scores like our scorer."""

from __future__ import annotations

import json

import pytest

from speed_train.speed.config import SpeedConfig

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


@pytest.mark.slow
def test_lm_eval_local_tasks_under_speed(saved_model, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    import speed_train.eval.lm_eval_adapter  # noqa: F401  (registers "speed")
    from speed_train.eval.scoring import generate_text, score_requests

    write_tasks(tmp_path)
    out = simple_evaluate(
        model="speed",
        model_args=f"pretrained={saved_model},batch_size=2",  # by registered name
        tasks=["speed_local_mc", "speed_local_gen"],
        log_samples=True,
        task_manager=TaskManager(include_path=str(tmp_path)),
    )
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


@pytest.mark.slow
def test_lm_eval_cli_with_speed_model(saved_model, tmp_path, monkeypatch):
    """`python -m speed_train.eval.lm_eval_adapter` (= `speed-lm-eval`) is lm-eval's CLI + `speed`."""
    from speed_train.eval import lm_eval_adapter

    write_tasks(tmp_path)
    monkeypatch.setattr(
        "sys.argv",
        [
            "x",
            "--model",
            "speed",
            "--model_args",
            f"pretrained={saved_model},k=full",
            "--tasks",
            "speed_local_mc",
            "--include_path",
            str(tmp_path),
            "--output_path",
            str(tmp_path / "res"),
        ],
    )
    lm_eval_adapter.main()
    (res,) = (tmp_path / "res").rglob("results_*.json")
    data = json.loads(res.read_text())
    assert data["config"]["model"] == "speed" and "acc,none" in data["results"]["speed_local_mc"]


def test_lm_eval_unknown_model_arg(saved_model):
    from speed_train.eval.lm_eval_adapter import SpeedLMEval

    with pytest.raises(ValueError, match="unknown model_args for --model speed: kk"):
        SpeedLMEval.create_from_arg_string(f"pretrained={saved_model},kk=3")


def _loglikelihoods(out, task):
    return {(s["doc_id"], i): r[0][0] for s in out["samples"][task] for i, r in enumerate(s["resps"])}


@pytest.fixture(scope="module")
def offline_tasks(tmp_path_factory):
    import os

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from speed_train.eval.lm_eval_tasks import write_offline_tasks

    return write_offline_tasks(tmp_path_factory.mktemp("offline_tasks"))


@pytest.mark.slow
def test_full_depth_speed_reproduces_lm_evals_hf_model(saved_model, offline_tasks):
    """add_bos=false gives lm-eval hf's tokens for SmolLM2 (its tokenizer adds no BoS by
    default); the default auto puts the BoS on every arm's prompts, as training did."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    import speed_train.eval.lm_eval_adapter  # noqa: F401

    tm = TaskManager(include_path=str(offline_tasks))
    kw = dict(tasks=["arc_easy_offline"], limit=12, log_samples=True, task_manager=tm, device="cpu")
    hf = simple_evaluate(model="hf", model_args=f"pretrained={saved_model},dtype=float32", **kw)
    speed = simple_evaluate(model="speed", model_args=f"pretrained={saved_model},k=full,add_bos=false", **kw)
    a, b = _loglikelihoods(hf, "arc_easy_offline"), _loglikelihoods(speed, "arc_easy_offline")
    assert a.keys() == b.keys() and max(abs(a[x] - b[x]) for x in a) < 1e-4
    assert hf["results"]["arc_easy_offline"]["acc,none"] == speed["results"]["arc_easy_offline"]["acc,none"]
    # the default (auto: the BoS) scores something else (the measured 14/300 ARC-Easy disagreement)
    with_bos = simple_evaluate(model="speed", model_args=f"pretrained={saved_model},k=full", **kw)
    c = _loglikelihoods(with_bos, "arc_easy_offline")
    assert max(abs(a[x] - c[x]) for x in a) > 1e-3


@pytest.mark.slow
def test_hf_native_export_under_lm_evals_hf_model_equals_speed(tmp_path, offline_tasks):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    import speed_train.eval.lm_eval_adapter  # noqa: F401
    from speed_train.assets import load_smollm2_tokenizer
    from speed_train.hf.export import make_hf_native
    from speed_train.speed.tiny import tiny_model

    tok = load_smollm2_tokenizer()
    folder = tmp_path / "export"
    tiny_model("llama", layers=4, vocab=len(tok), seed=3).save_pretrained(folder)
    make_hf_native(folder, tok, SpeedConfig(k=2, anchor="bos"))
    tm = TaskManager(include_path=str(offline_tasks))
    kw = dict(tasks=["arc_easy_offline"], limit=12, log_samples=True, task_manager=tm, device="cpu")
    hf = simple_evaluate(
        model="hf", model_args=f"pretrained={folder},trust_remote_code=True,dtype=float32", **kw
    )
    speed = simple_evaluate(
        model="speed", model_args=f"pretrained={folder}", **kw
    )  # K=2, bos from config.json
    a, b = _loglikelihoods(hf, "arc_easy_offline"), _loglikelihoods(speed, "arc_easy_offline")
    assert a.keys() == b.keys() and max(abs(a[x] - b[x]) for x in a) < 1e-4
    assert hf["results"]["arc_easy_offline"]["acc,none"] == speed["results"]["arc_easy_offline"]["acc,none"]


def test_speed_lm_eval_help_documents_the_speed_model(capsys, monkeypatch):
    from speed_train.eval import lm_eval_adapter

    monkeypatch.setattr("sys.argv", ["speed-lm-eval", "--help"])
    with pytest.raises(SystemExit):
        lm_eval_adapter.main()
    out = capsys.readouterr().out
    assert "``speed`` model_args" in out and "add_bos" in out and "pretrained" in out


def test_speed_lm_eval_notes_model_hf_on_a_speed_export(tmp_path):
    from speed_train.eval.lm_eval_adapter import hf_on_speed_export

    configs = {"speed": ("speed_llama", 2), "full": ("speed_llama", None), "plain": ("llama", None)}
    for name, (model_type, k) in configs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"model_type": model_type, "speed_k": k}))

    def note(*args):
        return hf_on_speed_export(list(args))

    export = f"pretrained={tmp_path / 'speed'},trust_remote_code=True"
    said = note("--model", "hf", "--model_args", export, "--tasks", "hellaswag")
    assert (
        said and "--model hf scores this SPEED export from token ids" in said and "use --model speed" in said
    )
    assert note("--model=hf", f"--model_args={export}") == said
    assert note("--model", "speed", "--model_args", export) is None
    for other in ("full", "plain", "missing"):
        assert note("--model", "hf", "--model_args", f"pretrained={tmp_path / other}") is None


def test_apply_chat_template_marks_the_header_as_decode(saved_model):
    from lm_eval.api.registry import get_model

    from speed_train.speed.plain_roles import encode_plain
    from speed_train.speed.roles import DECODE

    lm = get_model("speed").create_from_arg_string(f"pretrained={saved_model}")
    ctx = lm.apply_chat_template([{"role": "user", "content": "Capital of France?"}])
    assert ctx.endswith("<|im_start|>assistant\n")
    ex = encode_plain(ctx, " Paris", lm.tokenizer, lm.cfg, headers=lm._headers)
    header = lm.tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    n = len(ex) - len(lm.tokenizer(" Paris", add_special_tokens=False)["input_ids"])
    assert ex.input_ids[n - len(header) : n] == header and all(
        r == DECODE for r in ex.roles[n - len(header) :]
    )
