"""The small-scale reproduction: SmolLM2-135M-Instruct, full depth vs SPEED, on an OLMES subset.

    python -m speed_train.eval.reproduce --limit 100 --adapter outputs/<run>/export/adapter \\
        --out docs/reproduction
    python -m speed_train.eval.reproduce --model gemma3 --k 14 --out gemma/     # Gemma-3-270M
    python -m speed_train.eval.reproduce --model gemma3 --sweep-k 16 --reuse gemma/results.json --out gemma_k/

Columns: full depth; SPEED-K+BoS zero-shot; SPEED-K (no anchor) zero-shot; SPEED-K+BoS after the
LoRA adaptation of `python -m speed_train` (when --adapter is given). K defaults to the embedded
default's 0.75 x 30 = 22. Variant rc_0shot keeps a 2-core CPU run within ~30 minutes at 100
questions per task. Writes results.json and results.md. Primary metrics are OLMES-v0.1's
(``--primary olmes``) or the dumps' own (``--primary dump``); every metric is stored, so
``--rebuild-from results.json --primary ...`` rewrites the table with the other choice without
scoring again, and ``--reuse results.json`` copies the columns an earlier call already scored with
the same settings (another K's sweep does not score full depth twice).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from speed_train.atomic import write_json, write_text
from speed_train.cli import ArgumentParser
from speed_train.eval.olmes import MC_TASKS, EvalError, load_task, task_primary_metric
from speed_train.eval.run import evaluate_task, load_eval_model, markdown_table
from speed_train.speed.config import SpeedConfig, parse_k


def main(argv=None) -> dict:
    ap = ArgumentParser(
        prog="python -m speed_train.eval.reproduce",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--adapter", default=None)
    ap.add_argument("--k", default="0.75")
    ap.add_argument("--tasks", default=",".join(MC_TASKS))
    ap.add_argument("--variant", default="rc_0shot")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", default="reproduction")
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--dtype", default="float32", help="float32 (the tables in the docs), bfloat16, auto")
    ap.add_argument("--primary", default="olmes", choices=["olmes", "dump"])
    ap.add_argument(
        "--add-bos",
        default="auto",
        help="the BoS rule for the prompts, the same for every column: auto (the tokenizer's BoS when "
        "it has one; for SmolLM2 the same tokens as true, which made docs/REPRODUCTION.md sections 2-3), "
        "true, false",
    )
    ap.add_argument("--rebuild-from", default=None, help="a results.json of this command: re-table only")
    ap.add_argument(
        "--reuse",
        default=None,
        help="a results.json of this command: its columns that this call would score again (same "
        "model, tasks, variant, limit, dtype, BoS rule and primary metrics) are copied, not scored",
    )
    ap.add_argument(
        "--sweep-k",
        default=None,
        help="auto-K validation instead: full depth + SPEED-K+BoS zero-shot for each K in this list",
    )
    args = ap.parse_args(argv)
    if args.rebuild_from:
        return rebuild(args.rebuild_from, args.primary, Path(args.out))
    k = parse_k(args.k)
    reused = reusable_columns(args.reuse, args) if args.reuse else {}
    tasks = [
        load_task(t, args.variant, limit=args.limit, primary=args.primary) for t in args.tasks.split(",")
    ]
    model, tok, _ = load_eval_model(args.model, dtype=args.dtype, device=args.device)
    L = model.config.num_hidden_layers
    K = SpeedConfig(k=k).resolve_k(L)
    runs: dict[str, list[dict]] = {}
    bos = args.add_bos  # one BoS rule for every arm
    plan = [
        ("full depth", SpeedConfig(k=None, add_bos=bos), model),
        (f"SPEED-{K}+BoS zero-shot", SpeedConfig(k=k, anchor="bos", add_bos=bos), model),
        (f"SPEED-{K} zero-shot", SpeedConfig(k=k, anchor="none", add_bos=bos), model),
    ]
    if args.sweep_k:
        ks = [int(x) for x in args.sweep_k.split(",")]
        plan = [plan[0]] + [
            (f"SPEED-{kk}+BoS zero-shot", SpeedConfig(k=kk, anchor="bos", add_bos=bos), model) for kk in ks
        ]
    elif args.adapter:
        adapted, _, _ = load_eval_model(args.model, args.adapter, dtype=args.dtype, device=args.device)
        plan.append((f"SPEED-{K}+BoS LoRA-adapted", SpeedConfig(k=k, anchor="bos", add_bos=bos), adapted))
    t0 = time.perf_counter()
    d = Path(args.out)
    d.mkdir(parents=True, exist_ok=True)
    out: dict = {}
    for name, cfg, m in plan:
        if name in reused:  # scoring is deterministic (to ~1e-5 across batch groupings): the same column
            runs[name] = reused[name]
            print(f"{name:28} reused from {args.reuse}")
            continue
        runs[name] = []
        for task in tasks:
            r = evaluate_task(m, tok, cfg, task, batch_size=args.batch_size)
            r.pop("samples", None)  # per-question data: python -m speed_train.eval writes it
            runs[name].append(r)
            print(
                f"{name:28} {task.name:14} {r['primary_metric']:13} {100 * r['primary']:5.1f}  ({r['seconds']:.0f}s)"
            )
        # written after every configuration: a long CPU run keeps what it finished
        minutes = (time.perf_counter() - t0) / 60
        out = {"args": vars(args), "K": K, "num_layers": L, "minutes": minutes, "runs": runs}
        write_json(d / "results.json", out)
        write_text(d / "results.md", _header(out) + markdown_table(runs))
    print(markdown_table(runs))
    return out


# what a column's scores depend on besides its name (the name holds K and the anchor)
REUSE_KEYS = ("model", "tasks", "variant", "limit", "dtype", "add_bos", "primary")


def reusable_columns(path: str, args) -> dict[str, list[dict]]:
    """The columns of an earlier results.json that this call would score again; an earlier run with
    other settings is an EvalError naming them. A LoRA-adapted column is reused only for the same
    ``--adapter``."""
    try:
        old = json.loads(Path(path).read_text(encoding="utf-8"))
        old_args, old_runs = old["args"], old["runs"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise EvalError(f"--reuse {path}: not a results.json of this command ({e})") from None
    now = vars(args)
    differ = [
        f"{key} {old_args.get(key)!r} there, {now[key]!r} here"
        for key in REUSE_KEYS
        if old_args.get(key) != now[key]
    ]
    if differ:
        raise EvalError(f"--reuse {path}: scored with other settings ({'; '.join(differ)}); drop --reuse")
    return {
        name: results
        for name, results in old_runs.items()
        if "LoRA-adapted" not in name or old_args.get("adapter") == now["adapter"]
    }


def _header(out: dict) -> str:
    a = out["args"]
    return (
        f"{a['variant']}, {a['limit']} questions per task, K={out['K']}/{out['num_layers']}, "
        f"primary metrics: {a.get('primary', 'dump')}, {out['minutes']:.1f} min\n\n"
    )


def rebuild(path: str, primary: str, out_dir: Path) -> dict:
    """Re-derive each task's primary metric from the stored metrics of an earlier run."""
    out = json.loads(Path(path).read_text())
    for results in out["runs"].values():
        for r in results:
            # the rule of a fresh run (reads only the task's config.json)
            r["primary_metric"] = task_primary_metric(r["task"], r["variant"], primary)
            if r["primary_metric"] not in r["metrics"]:
                raise EvalError(
                    f"{path}: task {r['task']} has no {r['primary_metric']} stored ({sorted(r['metrics'])})"
                )
            r["primary"] = r["metrics"][r["primary_metric"]]
    out["args"]["primary"] = primary
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "results.json", out)
    write_text(out_dir / "results.md", _header(out) + markdown_table(out["runs"]))
    print(markdown_table(out["runs"]))
    return out


if __name__ == "__main__":
    main()
