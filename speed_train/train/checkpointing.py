"""Atomic checkpoints, newest-complete-checkpoint resume, and pre-emption signals.

A checkpoint file is written as ``<name>.tmp`` and renamed into place (``os.replace`` is
atomic on POSIX), so a crash mid-write leaves the previous checkpoints intact and no file that
resume could mistake for complete. DeepSpeed checkpoints are directories written by the
engine; they count as complete once ``COMPLETE`` is written inside them after the save.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import lightning as L
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

COMPLETE = "COMPLETE"
_STEP = re.compile(r"step=(\d+)")


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        os.replace(tmp, path)


def mark_complete(path: str | os.PathLike) -> None:
    p = Path(path)
    if p.is_dir():
        (p / COMPLETE).write_text("ok\n")


def is_complete(path: Path) -> bool:
    if path.name.endswith(".tmp"):
        return False
    if path.is_dir():
        return (path / COMPLETE).exists()
    return path.is_file() and path.suffix == ".ckpt"


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The optimizer step in a checkpoint's name (``step=N``), None if the name has none."""
    m = _STEP.search(Path(path).name)
    return int(m.group(1)) if m else None


def newest_checkpoint(ckpt_dir: str | os.PathLike) -> str | None:
    """The complete checkpoint with the highest step in ``ckpt_dir`` (None if there is none)."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return None
    best: tuple[int, float, Path] | None = None
    for p in d.iterdir():
        m = _STEP.search(p.name)
        if not m or not is_complete(p):
            continue
        key = (int(m.group(1)), p.stat().st_mtime, p)
        if best is None or key[:2] > best[:2]:
            best = key
    return str(best[2]) if best else None


def resolve_resume(resume: str, ckpt_dir: str | os.PathLike) -> str | None:
    if resume == "never":
        return None
    if resume == "auto":
        return newest_checkpoint(ckpt_dir)
    if not Path(resume).exists():
        raise FileNotFoundError(f"resume={resume!r}: no such checkpoint; use resume=auto, never or a path")
    return resume


class CompleteCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that marks a DeepSpeed checkpoint directory complete after its save."""

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            mark_complete(filepath)


class PreemptionCheckpoint(L.Callback):
    """SIGTERM / SIGUSR1 (SLURM pre-emption): finish the current optimizer step, save a
    checkpoint, stop. With ``requeue`` (SLURM), the job is requeued and resumes with resume=auto.

    The handler only records the signal. At each optimizer-step boundary the ranks agree
    (one tiny all-reduce) on whether any of them got one, so all of them save the same step
    and stop together, even when the signal reached only some ranks or at different times.
    Installed at train start, it replaces Lightning's own SIGTERM handler for the fit (which
    would stop without a checkpoint) and restores it at train end."""

    def __init__(
        self, ckpt_dir: str | os.PathLike, signals=(signal.SIGTERM, signal.SIGUSR1), requeue: bool = False
    ):
        self.ckpt_dir, self.signals, self.requeue = Path(ckpt_dir), signals, requeue
        self.received: int | None = None
        self.saved: str | None = None
        self._previous: dict = {}

    def _handler(self, signum, frame) -> None:
        self.received = signum

    def on_train_start(self, trainer, pl_module) -> None:
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handler)

    def on_train_end(self, trainer, pl_module) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches:  # finish the optimizer step first
            return
        signum = self.received or 0
        if trainer.world_size > 1:
            import torch

            agreed = trainer.strategy.reduce(torch.tensor(float(signum), device=trainer.strategy.root_device),
                                             reduce_op="max")  # fmt: skip
            signum = int(agreed.item())
        if not signum:
            return
        self.received = signum
        path = self.ckpt_dir / f"preempt-step={trainer.global_step}.ckpt"
        trainer.save_checkpoint(path)
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            mark_complete(path)
        self.saved = str(path)
        trainer.should_stop = True
        if self.requeue and trainer.is_global_zero and os.environ.get("SLURM_JOB_ID"):
            os.system(f"scontrol requeue {os.environ['SLURM_JOB_ID']}")
