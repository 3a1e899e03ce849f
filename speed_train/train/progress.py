"""One progress bar for the whole run, in optimizer steps: ETA, loss and tokens/s (rank 0).

Lightning's own bars count micro-batches per epoch (``120/60`` with accumulation 2, and
``Epoch 0/-2`` when the run is bounded by steps); this one counts what the run is sized in.
When stdout is not a terminal (a SLURM ``.out`` file, nohup, CI) a bar prints nothing until it
stops: there, a plain line is logged every ``trainer.log_every_n_steps`` optimizer steps instead.
"""

from __future__ import annotations

import datetime
import logging
import sys
import time

from lightning.pytorch.callbacks import ProgressBar
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

log = logging.getLogger("speed_train")


class StepProgressBar(ProgressBar):
    def __init__(self) -> None:
        super().__init__()
        self._enabled = True
        self._progress: Progress | None = None
        self._task = None
        self._lines = False  # plain lines instead of the bar
        self._start: tuple[float, int] = (0.0, 0)  # (time, step) at train start, for the ETA

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer, pl_module) -> None:
        if not (self._enabled and trainer.is_global_zero):
            return
        self._start = (time.perf_counter(), trainer.global_step)
        if not sys.stdout.isatty():
            self._lines = True
            return
        self._progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("steps"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[stats]}"),
            transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task(
            "train", total=trainer.max_steps, completed=trainer.global_step, stats=""
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not getattr(pl_module, "step_ended", True):
            return
        step, total = trainer.global_step, trainer.max_steps
        if self._lines and (step % trainer.log_every_n_steps == 0 or step == total):
            t0, s0 = self._start
            eta = (time.perf_counter() - t0) / max(step - s0, 1) * (total - step)
            log.info("step %d/%d  %s  eta %s", step, total, self._stats(trainer, pl_module), _hms(eta))
        if self._progress is not None:
            self._progress.update(self._task, completed=step, stats=self._stats(trainer, pl_module))

    @staticmethod
    def _stats(trainer, pl_module) -> str:
        m = getattr(pl_module, "last_metrics", {}) or {}
        stats = ""
        if m:
            stats = f"loss {m['train/loss']:.4f}  {m['train/tokens_per_s']:,.0f} tok/s"
            if "train/mfu" in m:
                stats += f"  mfu {m['train/mfu']:.1%}"
        val = trainer.callback_metrics.get("val/loss")
        if val is not None:
            stats += f"  val {float(val):.4f}"
        return stats

    def on_train_end(self, trainer, pl_module) -> None:
        self._lines = False
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.on_train_end(trainer, pl_module)


def _hms(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))
