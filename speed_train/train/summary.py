"""The short table printed at the end of a training run."""

from __future__ import annotations

import math

from rich.console import Console
from rich.table import Table


def print_summary(results: dict, cfg=None, console: Console | None = None) -> None:
    if not results or "global_step" not in results or results.get("rank", 0) != 0:
        return  # one table per run, from rank 0
    console = console or Console()
    k, n = results["k"], results["num_layers"]
    t = Table(title=f"held-out decode-token loss (SPEED-{k}/{n}, anchor={results['anchor']})")
    t.add_column("model")
    t.add_column("loss", justify="right")
    t.add_column("ppl", justify="right")
    rows = [("full depth (before training)", "heldout_full_depth"),
            (f"SPEED-{k} zero-shot (before training)", "heldout_speed_zero_shot"),
            (f"SPEED-{k} after training", "heldout_speed_adapted")]  # fmt: skip
    for label, key in rows:
        if key in results:
            v = results[key]
            t.add_row(label, f"{v:.4f}", f"{math.exp(v):.2f}" if v == v else "nan")
    console.print(t)
    if results.get("steps_per_s"):
        console.print(
            f"training: {results['steps_per_s']:.2f} optimizer steps/s ({results['fit_seconds']:.0f} s in fit)"
        )
    console.print(f"steps: {results['global_step']}" + (f" (resumed from {results['resumed_from']})"
                                                         if results.get("resumed_from") else ""))  # fmt: skip
    if results.get("preempted_by_signal"):
        console.print(f"stopped by signal {results['preempted_by_signal']}: checkpoint {results.get('preempt_checkpoint')}; "
                      "run the same command again to resume (resume=auto)")  # fmt: skip
    for what, path in (results.get("export") or {}).items():
        console.print(f"{what}: {path}")
    if cfg is not None:
        console.print(f"run folder: {cfg.output_dir}")
