"""The small-scale controlled study: Full-IT vs SPEED-K vs SPEED-K+BoS, and the LoRA pilot over K.

    python -m speed_train -m +experiment=small_study                           # train the three arms
    python -m speed_train -m +experiment=small_study speed=speed_k_bos speed.k=16,20,25,28   # the pilot
    python -m speed_train.eval.study multirun/small_study/<arms> --pilot multirun/small_study/<pilot> \\
        --limit 125 --out docs/reproduction

Per arm: the held-out decode-token loss before and after training, as it will be served (Full-IT
at full depth, SPEED arms with the shallow prefill) and, for SPEED arms, the same adapter at full
depth; the OLMES-style suite on its exported adapter, as served. Paired comparisons over the same
questions: McNemar's exact test (per task and pooled) and a bootstrap 95% interval of the
difference of the task-averaged accuracies; a difference is "beyond noise" when the interval
excludes 0. The pilot: held-out loss against K, with the Full-IT arm's line and auto-K's
recommendation (docs/reproduction/diagnostics.json). Writes small_study.json, small_study.md and
small_study_pilot.png into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

from speed_train.atomic import save_figure, write_json, write_text
from speed_train.cli import ArgumentParser
from speed_train.eval.olmes import MC_TASKS, load_task

HELDOUT_ROWS = ("heldout_full_depth", "heldout_speed_zero_shot", "heldout_after", "heldout_after_full_depth")


def arm_name(r: dict) -> str:
    if r["k"] >= r["num_layers"]:
        return "Full-IT"
    return f"SPEED-{r['k']}" + ("+BoS" if r["anchor"] == "bos" else "")


def read_runs(sweep: str | Path) -> list[dict]:
    """Every finished job of a multirun folder: its results.json (+ the job folder)."""
    runs = []
    for job in sorted(
        (p for p in Path(sweep).iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)
    ):
        f = job / "results.json"
        if f.is_file():
            r = json.loads(f.read_text(encoding="utf-8"))
            if r.get("preempted_by_signal"):  # stopped early: resume it first
                continue
            r["dir"], r["name"] = str(job), arm_name(r)
            runs.append(r)
    if not runs:
        raise SystemExit(f"{sweep}: no finished job (no <n>/results.json)")
    return runs


# -- statistics ---------------------------------------------------------------------------------


def mcnemar_p(a: list[bool], b: list[bool]) -> float:
    """Two-sided exact McNemar test of paired correctness (binomial on the discordant pairs)."""
    only_a = sum(x and not y for x, y in zip(a, b))
    only_b = sum(y and not x for x, y in zip(a, b))
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2**n
    return min(1.0, 2 * tail)


def bootstrap_diff(
    a: dict[str, list[bool]], b: dict[str, list[bool]], reps: int = 2000, seed: int = 0
) -> dict:
    """Difference of task-averaged accuracy (a - b, in points) with a paired bootstrap over the
    questions of each task: mean, standard error and the 2.5/97.5 percentiles."""
    rng = random.Random(seed)
    tasks = sorted(a)

    def avg(ix: dict[str, list[int]]) -> float:
        return 100 * sum(sum(a[t][i] - b[t][i] for i in ix[t]) / len(ix[t]) for t in tasks) / len(tasks)

    point = avg({t: list(range(len(a[t]))) for t in tasks})
    draws = sorted(avg({t: [rng.randrange(len(a[t])) for _ in a[t]] for t in tasks}) for _ in range(reps))
    mean = sum(draws) / reps
    se = math.sqrt(sum((d - mean) ** 2 for d in draws) / (reps - 1))
    return {"diff": point, "se": se, "ci95": [draws[int(0.025 * reps)], draws[int(0.975 * reps) - 1]]}


def compare(name_a: str, name_b: str, correct: dict[str, dict[str, list[bool]]]) -> dict:
    a, b = correct[name_a], correct[name_b]
    pooled_a = [x for t in sorted(a) for x in a[t]]
    pooled_b = [x for t in sorted(b) for x in b[t]]
    boot = bootstrap_diff(a, b)
    lo, hi = boot["ci95"]
    return {
        "a": name_a,
        "b": name_b,
        **boot,
        "beyond_noise": not lo <= 0.0 <= hi,
        "mcnemar_p_pooled": mcnemar_p(pooled_a, pooled_b),
        "mcnemar_p_per_task": {t: mcnemar_p(a[t], b[t]) for t in sorted(a)},
        "discordant": sum(x != y for x, y in zip(pooled_a, pooled_b)),
        "questions": len(pooled_a),
    }


# -- the study ----------------------------------------------------------------------------------


def evaluate_arm(r: dict, tasks, base: str, batch_size: int) -> tuple[list[dict], dict[str, list[bool]]]:
    from speed_train.eval.run import evaluate_task, load_eval_model
    from speed_train.speed.config import SpeedConfig

    adapter = (r.get("export") or {}).get("adapter")
    if adapter is None:
        raise SystemExit(
            f"{r['dir']}: no exported LoRA adapter (the study trains LoRA arms with export.enabled)"
        )
    model, tok, saved = load_eval_model(base, adapter, "float32", "cpu")
    k = None if r["k"] >= r["num_layers"] else r["k"]
    cfg = SpeedConfig(k=k, anchor=r["anchor"])
    results, correct = [], {}
    for task in tasks:
        res = evaluate_task(
            model, tok, cfg, task, batch_size=batch_size, add_bos=saved.get("add_bos", "auto")
        )
        metric = res["primary_metric"]
        correct[task.name] = [q["predictions"][metric] == q["gold"] for q in res.pop("samples")]
        results.append(res)
        print(
            f"{r['name']:14} {task.name:14} {metric:13} {100 * res['primary']:5.1f} ({res['seconds']:.0f}s)",
            flush=True,
        )
    return results, correct


def main(argv=None) -> dict:
    ap = ArgumentParser(
        prog="python -m speed_train.eval.study",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("arms", help="the multirun folder of `+experiment=small_study`")
    ap.add_argument("--pilot", default=None, help="the multirun folder of the pilot over K")
    ap.add_argument("--base", default="smollm2", help="the base model the adapters were trained on")
    ap.add_argument("--tasks", default=",".join(MC_TASKS))
    ap.add_argument("--variant", default="rc_0shot")
    ap.add_argument("--limit", type=int, default=125, help="questions per task")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", default="docs/reproduction")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    arms = read_runs(args.arms)
    tasks = [load_task(t, args.variant, limit=args.limit) for t in args.tasks.split(",")]
    olmes, correct = {}, {}
    study: dict = {"args": vars(args), "arms": [], "olmes": olmes}
    for r in arms:
        study["arms"].append(
            {
                k: r.get(k)
                for k in (
                    "name",
                    "k",
                    "num_layers",
                    "anchor",
                    "global_step",
                    "fit_seconds",
                    "steps_per_s",
                    "dir",
                    *HELDOUT_ROWS,
                )
            }
        )
        olmes[r["name"]], correct[r["name"]] = evaluate_arm(r, tasks, args.base, args.batch_size)
        study["minutes"] = (time.perf_counter() - t0) / 60
        write_json(out_dir / "small_study.json", study)  # after every arm: a long run keeps what it did
    names = [r["name"] for r in arms]
    full = next((n for n in names if n == "Full-IT"), None)
    pairs = [(a, full) for a in names if a != full and full] + [
        (a, b) for a in names for b in names if a.endswith("+BoS") and b == a.removesuffix("+BoS")
    ]
    study["comparisons"] = [compare(a, b, correct) for a, b in pairs]
    study["correct"] = correct
    if args.pilot:
        study["pilot"] = pilot_rows(read_runs(args.pilot), arms)
        plot_pilot(study["pilot"], arms, out_dir / "small_study_pilot.png")
    study["minutes"] = (time.perf_counter() - t0) / 60
    write_json(out_dir / "small_study.json", study)
    write_text(out_dir / "small_study.md", markdown(study))
    print(markdown(study))
    return study


def pilot_rows(pilot: list[dict], arms: list[dict]) -> list[dict]:
    rows = {r["k"]: r for r in [*pilot, *(a for a in arms if a["name"].endswith("+BoS"))]}
    return [{"k": k, **{h: rows[k].get(h) for h in HELDOUT_ROWS}} for k in sorted(rows)]


def plot_pilot(rows: list[dict], arms: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    ks = [r["k"] for r in rows]
    ax.plot(ks, [r["heldout_after"] for r in rows], "o-", label="SPEED-K+BoS after LoRA (served)")
    ax.plot(ks, [r["heldout_speed_zero_shot"] for r in rows], "s--", label="SPEED-K+BoS zero-shot")
    full = next((a for a in arms if a["name"] == "Full-IT"), None)
    if full is not None:
        ax.axhline(full["heldout_after"], color="k", lw=1, label="Full-IT after LoRA")
        ax.axhline(full["heldout_full_depth"], color="gray", lw=1, ls=":", label="full depth, before")
    diag = Path(__file__).resolve().parents[2] / "docs" / "reproduction" / "diagnostics.json"
    if diag.is_file():
        auto_k = json.loads(diag.read_text()).get("auto_k")
        if auto_k:
            ax.axvline(auto_k, color="tab:red", lw=1, ls="--", label=f"auto-K = {auto_k}")
    ax.set_xlabel("cutoff K (of 30 layers)")
    ax.set_ylabel("held-out decode-token loss")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def markdown(study: dict) -> str:
    lines = [
        "| arm | before: full depth | before: SPEED zero-shot | after: as served | after: same weights, full depth |",
        "|---|---|---|---|---|",
    ]
    fmt = lambda v: "" if v is None else f"{v:.4f}"  # noqa: E731
    for a in study["arms"]:
        lines.append(
            f"| {a['name']} | {fmt(a['heldout_full_depth'])} | {fmt(a.get('heldout_speed_zero_shot'))} | "
            f"{fmt(a['heldout_after'])} | {fmt(a.get('heldout_after_full_depth'))} |"
        )
    names = list(study["olmes"])
    tasks = [r["task"] for r in study["olmes"][names[0]]]
    lines += ["", "| task | n | metric | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    for i, t in enumerate(tasks):
        r0 = study["olmes"][names[0]][i]
        cells = " | ".join(f"{100 * study['olmes'][n][i]['primary']:.1f}" for n in names)
        lines.append(f"| {t} | {r0['n']} | {r0['primary_metric']} | {cells} |")
    avgs = " | ".join(
        f"**{100 * sum(r['primary'] for r in study['olmes'][n]) / len(tasks):.1f}**" for n in names
    )
    lines.append(f"| **average** | | | {avgs} |")
    if study.get("comparisons"):
        lines += [
            "",
            "| comparison | difference (points) | 95% CI | SE | McNemar p (pooled) | beyond noise |",
            "|---|---|---|---|---|---|",
        ]
        for c in study["comparisons"]:
            lo, hi = c["ci95"]
            lines.append(
                f"| {c['a']} - {c['b']} | {c['diff']:+.2f} | [{lo:+.2f}, {hi:+.2f}] | {c['se']:.2f} | "
                f"{c['mcnemar_p_pooled']:.3f} | {'yes' if c['beyond_noise'] else 'no'} |"
            )
    if study.get("pilot"):
        lines += ["", "| K | held-out after (served) | zero-shot | after, full depth |", "|---|---|---|---|"]
        for r in study["pilot"]:
            lines.append(
                f"| {r['k']} | {fmt(r['heldout_after'])} | {fmt(r['heldout_speed_zero_shot'])} | "
                f"{fmt(r['heldout_after_full_depth'])} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
