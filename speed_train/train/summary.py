"""The short table printed at the end of a training run."""

from __future__ import annotations

import math

from rich.console import Console
from rich.table import Table

from speed_train.hf.card import heldout_rows
from speed_train.train.run import RunResult, resume_command


def source_table(r: RunResult) -> Table | None:
    """The held-out loss per source (rows) for each row of the main table (columns)."""
    rows = [(label, key) for label, key in heldout_rows(r) if key in r.heldout_by_source]
    if not rows or len(r.heldout_examples) < 2:
        return None
    t = Table(title="held-out decode-token loss by source")
    t.add_column("source")
    t.add_column("n", justify="right")
    for label, _ in rows:
        t.add_column(label.split(" (")[0], justify="right")
    for source, n in r.heldout_examples.items():
        cells = [r.heldout_by_source[key].get(source, float("nan")) for _, key in rows]
        t.add_row(source, str(n), *(f"{v:.4f}" for v in cells))
    return t


def print_summary(result: RunResult, cfg=None, console: Console | None = None) -> None:
    if result.rank != 0:
        return  # one table per run, from rank 0
    console = console or Console()
    what = (
        f"Full-IT ({result.num_layers} layers)"
        if result.full_it
        else (f"SPEED-{result.k}/{result.num_layers}, anchor={result.anchor}")
    )
    t = Table(title=f"held-out decode-token loss: {what}")
    t.add_column("model")
    t.add_column("loss", justify="right")
    t.add_column("ppl", justify="right")
    for label, key in heldout_rows(result):
        if key in result.heldout:
            v = result.heldout[key]
            t.add_row(label, f"{v:.4f}", f"{math.exp(v):.2f}" if v == v else "nan")
    if t.row_count:
        console.print(t)
    by_source = source_table(result)
    if by_source is not None:
        console.print(by_source)
    if result.steps_per_s:
        console.print(
            f"training: {result.steps_per_s:.2f} optimizer steps/s ({result.fit_seconds:.0f} s in fit, "
            f"{result.heldout_seconds:.0f} s of it on the held-out table)"
        )
    resumed = f" (resumed from {result.resumed_from})" if result.resumed_from else ""
    console.print(f"steps: {result.global_step}{resumed}")
    if result.preempted_by_signal:
        console.print(
            f"stopped by signal {result.preempted_by_signal} at step {result.global_step}: checkpoint "
            f"{result.preempt_checkpoint}"
        )
        if cfg is not None:
            console.print(f"to resume:\n  {resume_command(cfg.output_dir)}", soft_wrap=True)
    for what, path in result.export.items():
        console.print(f"{what}: {path}")
    if cfg is not None:
        console.print(f"run folder: {cfg.output_dir}")
