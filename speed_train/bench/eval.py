"""Evaluation throughput: how continuations share their context, and the evaluation precision.

    python -m speed_train.bench.eval                                   # the study's 10 tasks, 48 questions each
    python -m speed_train.bench.eval --adapter outputs/<run>/export/adapter --limit 64 --runs 3

Variants, each the whole OLMES-style task (``eval.run.evaluate_task``):

- ``rows`` (the baseline, the layout of earlier releases): the context's cache copied once per
  choice, every choice padded to the longest, the LM head over every position, batches grouped
  by characters; every OLMES metric (the unconditional requests scored wherever the task has
  them); a LoRA adapter through peft's layers;
- ``tree``: a context's choices side by side in one row, as branches of one decode chunk, each
  without its last token, the LM head only where a token is scored, batches grouped by tokens
  (``scoring.batch_order``); an adapter merged into the weights; every metric;
- ``tree-primary``: the same, scoring only what the primary metric needs (the study's setting:
  no unconditional requests for ARC-Easy, HellaSwag, PIQA, Social IQa);
- ``tree-primary-chars``: ``tree-primary`` with the baseline's grouping by characters (what the
  grouping alone is worth);
- ``tree-bf16``: ``tree-primary`` in bfloat16 (fast only where the CPU multiplies bf16 natively).

Rounds are interleaved (each variant once per round, after a short warm-up round) and the median
per task is reported, as questions/s and as a ratio to the baseline. Agreement is printed
beside the speed: the largest log-likelihood difference to the baseline and how many questions'
primary-metric predictions differ (bf16 against fp32 is the tolerance documented in
docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time
from dataclasses import dataclass, replace

import torch

from speed_train.atomic import write_json
from speed_train.cli import ArgumentParser, output_file
from speed_train.eval.olmes import MC_TASKS, EvalError, Task, load_task
from speed_train.eval.run import evaluate_task, load_eval_model
from speed_train.speed.config import SpeedConfig, SpeedConfigError, parse_k


@dataclass(frozen=True)
class Variant:
    layout: str
    dtype: str
    merge: bool  # merge a LoRA adapter into the weights
    metrics: str  # "all" | "primary"
    order: str = "tokens"  # how requests are grouped into batches: "tokens" | "chars"
    processes: int = 1  # >1: that many worker processes of one thread each, the questions split


VARIANTS = {
    "rows": Variant("rows", "float32", False, "all", order="chars"),
    "tree": Variant("tree", "float32", True, "all"),
    "tree-primary": Variant("tree", "float32", True, "primary"),
    "tree-primary-chars": Variant("tree", "float32", True, "primary", order="chars"),
    "tree-primary-2p": Variant("tree", "float32", True, "primary", processes=2),
    "tree-bf16": Variant("tree", "bfloat16", True, "primary"),
}


def build_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(
        prog="python -m speed_train.bench.eval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--adapter", default=None, help="a LoRA adapter folder (as the study evaluates)")
    ap.add_argument("--k", default="22", help="cutoff: layers, a fraction, or 'full'")
    ap.add_argument("--anchor", default="bos", choices=["none", "bos", "system"])
    ap.add_argument("--tasks", default=",".join(MC_TASKS))
    ap.add_argument("--variant", default="rc_0shot")
    ap.add_argument("--limit", type=int, default=48, help="questions per task")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3, help="timed rounds (after one warm-up round)")
    ap.add_argument(
        "--variants", default="rows,tree-primary,tree-primary-2p", help="comma list of " + ", ".join(VARIANTS)
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads of the one-process variants (default: torch's, every core)",
    )
    ap.add_argument("--json", default=None, type=output_file, help="also write the results here")
    return ap


def parse_args(argv=None) -> argparse.Namespace:
    """Arguments, checked before any model loads."""
    ap = build_parser()
    args = ap.parse_args(argv)
    for name, value in (
        ("--limit", args.limit),
        ("--batch-size", args.batch_size),
        ("--runs", args.runs),
        ("--threads", args.threads or 1),
    ):
        if value < 1:
            ap.error(f"{name} {value}: must be at least 1")
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or not args.variants:
        ap.error(f"--variants {','.join(unknown) or '(none)'}: choose from {', '.join(VARIANTS)}")
    try:
        args.cfg = SpeedConfig(k=parse_k(args.k), anchor=args.anchor)
    except SpeedConfigError as e:
        ap.error(str(e))
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        tasks = [load_task(t, args.variant, limit=args.limit) for t in args.tasks.split(",") if t]
    except EvalError as e:
        raise SystemExit(f"error: {e}") from None
    warm = [load_task(t.name, args.variant, limit=4) for t in tasks]
    runners = {name: _Runner(VARIANTS[name], args) for name in args.variants}
    times: dict[str, list[float]] = {v: [] for v in runners}
    task_times: dict[str, dict[str, list[float]]] = {v: {t.name: [] for t in tasks} for v in runners}
    results: dict[str, dict[str, dict]] = {}
    try:
        for rnd in range(args.runs + 1):  # round 0 is the warm-up, on 4 questions per task
            for name, runner in runners.items():
                t0 = time.perf_counter()
                out, per_task = runner.run(warm if rnd == 0 else tasks)
                if rnd > 0:
                    times[name].append(time.perf_counter() - t0)
                    for t, sec in per_task.items():
                        task_times[name][t].append(sec)
                    results[name] = out
    finally:
        for runner in runners.values():
            runner.close()
    base = args.variants[0]
    questions = len(tasks) * args.limit
    rows = []
    for name, runner in runners.items():
        rows.append(
            {
                "variant": name,
                "processes": runner.variant.processes,
                "threads": runner.threads,
                "questions_per_s": questions / statistics.median(times[name]),
                "per_task_questions_per_s": {
                    t: args.limit / statistics.median(ts) for t, ts in task_times[name].items() if ts
                },
                **agreement(results[base], results[name]),
            }
        )
    for r in rows:
        r["ratio"] = r["questions_per_s"] / rows[0]["questions_per_s"]
    print(
        f"evaluation benchmark: {args.model}{' + ' + args.adapter if args.adapter else ''}, "
        f"K={args.cfg.k}, anchor {args.anchor}, {len(tasks)} tasks x {args.limit} questions ({args.variant}), "
        f"batch {args.batch_size}, median of {args.runs} interleaved rounds"
    )
    print(
        f"{'variant':16} {'procs x threads':>15} {'q/s':>7} {'ratio':>7} {'max |dlogp|':>12} {'pred. differ':>13}"
    )
    for r in rows:
        print(
            f"{r['variant']:16} {r['processes']:>7} x {r['threads']:<5} {r['questions_per_s']:7.2f} "
            f"{r['ratio']:7.2f} {r['max_abs_logprob_diff']:12.2e} {r['predictions_differ']:>6}/{r['questions']}"
        )
    single = [r for r in rows if r["per_task_questions_per_s"]]
    print(
        "per task (q/s, "
        + " / ".join(r["variant"] for r in single)
        + "): "
        + "; ".join(
            f"{t.name}: " + " / ".join(f"{r['per_task_questions_per_s'][t.name]:.2f}" for r in single)
            for t in tasks
        )
    )
    out = {"args": {k: v for k, v in vars(args).items() if k != "cfg"}, "rows": rows, "times": times}
    if args.json:
        write_json(args.json, out)
    return out


class _Runner:
    """One variant: its model in this process, or a pool of one-thread workers each holding it."""

    def __init__(self, variant: Variant, args: argparse.Namespace) -> None:
        self.variant, self.args = variant, args
        load = (args.model, args.adapter, variant.dtype, variant.merge)
        if variant.processes == 1:
            self.pool, self.threads = None, torch.get_num_threads()
            self.model, self.tok, _ = load_eval_model(*load[:3], "cpu", merge_adapter=variant.merge)
        else:
            self.threads = 1
            ctx = multiprocessing.get_context("spawn")
            self.pool = ctx.Pool(variant.processes, initializer=_worker_init, initargs=load)

    def run(self, tasks: list[Task]) -> tuple[dict[str, dict], dict[str, float]]:
        """({task: evaluate_task result}, {task: seconds} when tasks ran one after the other)."""
        v, a = self.variant, self.args
        if self.pool is None:
            out, secs = {}, {}
            for task in tasks:
                t0 = time.perf_counter()
                out[task.name] = _evaluate(self.model, self.tok, a.cfg, task, a.batch_size, v)
                secs[task.name] = time.perf_counter() - t0
            return out, secs
        n = v.processes  # every task split into n contiguous parts, all parts on the pool
        parts = [
            (
                replace(t, docs=t.docs[i * len(t.docs) // n : (i + 1) * len(t.docs) // n]),
                a.cfg,
                a.batch_size,
                v,
            )
            for t in tasks
            for i in range(n)
        ]
        done = self.pool.map(_worker_eval, parts, chunksize=1)
        out = {}
        for i, task in enumerate(tasks):
            pieces = done[i * n : (i + 1) * n]
            out[task.name] = {**pieces[0], "samples": [q for p in pieces for q in p["samples"]]}
        return out, {}

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool.join()


def _evaluate(model, tok, cfg, task: Task, batch_size: int, v: Variant) -> dict:
    return evaluate_task(
        model, tok, cfg, task, batch_size=batch_size, layout=v.layout, metrics=v.metrics, order=v.order
    )


_WORKER: dict = {}


def _worker_init(model: str, adapter: str | None, dtype: str, merge: bool) -> None:
    torch.set_num_threads(1)
    _WORKER["model"], _WORKER["tok"], _ = load_eval_model(model, adapter, dtype, "cpu", merge_adapter=merge)


def _worker_eval(job) -> dict:
    task, cfg, batch_size, variant = job
    return _evaluate(_WORKER["model"], _WORKER["tok"], cfg, task, batch_size, variant)


def agreement(base: dict[str, dict], other: dict[str, dict]) -> dict:
    """Largest |log-likelihood difference| over every scored choice, and the number of questions
    whose primary-metric prediction differs."""
    diff, differ, n = 0.0, 0, 0
    for task, r in base.items():
        o = other[task]
        metric = r["primary_metric"]
        for a, b in zip(r["samples"], o["samples"]):
            diff = max([diff, *(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"]))])
            differ += a["predictions"][metric] != b["predictions"][metric]
            n += 1
    return {"max_abs_logprob_diff": diff, "predictions_differ": differ, "questions": n}


if __name__ == "__main__":
    main()
