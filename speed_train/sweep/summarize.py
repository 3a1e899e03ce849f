"""Summarise a Hydra multirun folder: one row per job, failed/unfinished jobs named, a plot.

    python -m speed_train.sweep.summarize multirun/2026-11-26/12-00-00 [--metric heldout_after]

A job is ``ok`` when it wrote results.json; ``failed`` when it wrote failed.json (the entry point
does on any exception); ``unfinished`` otherwise (still running, killed, or pre-empted before finishing). Writes
summary.md and summary.png (metric vs K, with the full-depth reference as a horizontal line)
into the multirun folder.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from speed_train.atomic import save_figure, write_text
from speed_train.cli import ArgumentParser

METRICS = ("heldout_after", "heldout_after_full_depth", "heldout_speed_zero_shot", "heldout_full_depth")


def _overrides(job: Path) -> list[str]:
    p = job / ".hydra" / "overrides.yaml"
    return yaml.safe_load(p.read_text()) or [] if p.exists() else []


def _job_status(job: Path) -> tuple[str, dict, str]:
    res = job / "results.json"
    if res.exists():
        results = json.loads(res.read_text())
        if results.get("preempted_by_signal"):  # stopped early with a checkpoint: resume it
            return "unfinished", results, f"pre-empted at step {results.get('global_step')}"
        return "ok", results, ""
    failed = job / "failed.json"
    if failed.exists():
        return "failed", {}, json.loads(failed.read_text()).get("error", "")[:300]
    return "unfinished", {}, ""


def _k_of(overrides: list[str], results: dict):
    if "k" in results:
        return results["k"]
    for o in overrides:
        if o.startswith("speed.k="):
            return o.split("=", 1)[1]
    return None


def summarize(sweep_dir: str | Path, metric: str = "heldout_after") -> dict:
    d = Path(sweep_dir)
    jobs = sorted(
        (p for p in d.iterdir() if p.is_dir() and (p / ".hydra").exists()),
        key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else p.name),
    )
    if not jobs:
        raise SystemExit(f"no Hydra jobs (folders with .hydra/) under {d}")
    rows = []
    for job in jobs:
        status, res, why = _job_status(job)
        ov = _overrides(job)
        rows.append(
            {
                "job": job.name,
                "status": status,
                "overrides": " ".join(ov),
                "k": _k_of(ov, res),
                "final_train_loss": (res.get("step_losses") or [None])[-1],
                **{m: res.get(m) for m in METRICS},
                "error": why,
            }
        )
    fmt = lambda v: "" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = [
        "| job | status | K | final train loss | " + " | ".join(METRICS) + " | overrides |",
        "|---|---|---|---|" + "---|" * len(METRICS) + "---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['job']} | {r['status']} | {fmt(r['k'])} | {fmt(r['final_train_loss'])} | "
            + " | ".join(fmt(r[m]) for m in METRICS)
            + f" | `{r['overrides']}` |"
        )
    bad = [r for r in rows if r["status"] != "ok"]
    if bad:
        lines += ["", "Not finished:"] + [
            f"- job {r['job']} ({r['overrides']}): {r['status']}" + (f" — {r['error']}" if r["error"] else "")
            for r in bad
        ]
    md = "\n".join(lines) + "\n"
    write_text(d / "summary.md", md)
    _plot(rows, metric, d / "summary.png")
    print(md)
    return {"rows": rows, "markdown": md}


def _plot(rows, metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sorted((float(r["k"]), r[metric]) for r in rows if r["status"] == "ok" and r[metric] is not None)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=metric)
    refs = [
        r["heldout_full_depth"] for r in rows if r["status"] == "ok" and r["heldout_full_depth"] is not None
    ]
    if refs:
        ax.axhline(sum(refs) / len(refs), color="gray", linestyle="--", label="full depth")
    ax.set_xlabel("cutoff K")
    ax.set_ylabel(metric)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def main(argv=None) -> None:
    ap = ArgumentParser(
        prog="python -m speed_train.sweep.summarize",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("sweep_dir")
    ap.add_argument("--metric", default="heldout_after", choices=METRICS)
    args = ap.parse_args(argv)
    summarize(args.sweep_dir, args.metric)


if __name__ == "__main__":
    main()
