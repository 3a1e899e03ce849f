"""Checkpoints that are verifiable, resume from the newest complete one, retention, pre-emption.

A checkpoint counts only once it is complete and checked:
- a file (``step=N.ckpt``) is written as ``<name>.tmp``, fsync-ed and renamed into place, and
  ``<name>.complete`` (its byte size) is written after it; resume checks the size and that the
  file's zip directory opens (a truncated torch checkpoint fails there, in milliseconds);
- a DeepSpeed directory gets ``COMPLETE`` (every file's byte size) after all ranks saved.
A checkpoint that fails its check is renamed ``<name>.corrupt`` and resume falls back to the
next newest, saying which it skipped, so the step is saved afresh later under its own name
(no ``-v1`` beside a corrupt file). Retention (``keep_checkpoints``) is applied by this module
after every save and at resume: the newest N complete checkpoints stay, older ones, finished
pre-emption checkpoints and stray ``*.tmp`` files go.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import sys
import zipfile
from pathlib import Path

import lightning as L
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from speed_train.atomic import atomic_write
from speed_train.train.build import ConfigError

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
_STEP = re.compile(r"step=(\d+)")
_SUFFIXES = (".tmp", ".complete", ".corrupt", ".lock")


class ResumeError(ConfigError):
    """The checkpoint to resume from cannot be used by this run (missing, damaged, another run's)."""


class CheckpointError(OSError):
    """A checkpoint could not be written (disk full, read-only folder, ...)."""

    def __str__(self) -> str:  # the message, without OSError's "[Errno N]" prefix
        return str(self.strerror)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint files through ``speed_train.atomic`` (temp file, fsync, rename), then the
    ``.complete`` record; a failed write leaves nothing behind and says what to do."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        import torch

        path = Path(path)
        try:
            atomic_write(path, lambda fh: torch.save(checkpoint, fh), binary=True)
            record = {"bytes": path.stat().st_size, "run": checkpoint.get("speed_run")}
            _write_record(path.with_name(path.name + ".complete"), record)
        except OSError as e:
            raise CheckpointError(
                e.errno,
                f"cannot write checkpoint {path}: {e.strerror or e}; free space "
                "or choose a writable output_dir, then resume (resume=auto)",
            ) from None


def _write_record(path: Path, record: dict) -> None:
    atomic_write(path, lambda fh: fh.write(json.dumps(record)))


def mark_complete(path: str | os.PathLike, run: dict | None = None) -> None:
    """Record a saved DeepSpeed directory as complete, with every file's size and ``run`` (the
    fingerprint of the run that saved it, speed_train.train.resume)."""
    p = Path(path)
    if p.is_dir():
        files = {
            str(f.relative_to(p)): f.stat().st_size
            for f in sorted(p.rglob("*"))
            if f.is_file() and f.name != COMPLETE
        }
        _write_record(p / COMPLETE, {"files": files, "run": run})


def saved_run(path: str | os.PathLike) -> dict | None:
    """The run fingerprint in a checkpoint's completion record (JSON; the checkpoint itself is not
    read), None when there is none."""
    p = Path(path)
    record = p / COMPLETE if p.is_dir() else p.with_name(p.name + ".complete")
    try:
        run = json.loads(record.read_text()).get("run")
    except (OSError, ValueError, AttributeError):
        return None
    return run if isinstance(run, dict) else None


def _run_of(trainer) -> dict | None:
    return getattr(trainer.lightning_module, "run_fingerprint", None)


def verify(path: Path) -> str | None:
    """None when the checkpoint is complete and intact, else why not."""
    if path.name.endswith(_SUFFIXES):
        return "not a checkpoint"
    if path.is_dir():
        marker = path / COMPLETE
        if not marker.is_file():
            return "no COMPLETE marker (the save was interrupted)"
        try:
            files = json.loads(marker.read_text()).get("files", {})
        except ValueError:
            return None  # a marker from an older version: presence only
        for name, size in files.items():
            f = path / name
            if not f.is_file() or f.stat().st_size != size:
                return f"{name} is missing or truncated"
        return None
    if not path.is_file() or path.suffix != ".ckpt":
        return "not a checkpoint file"
    record = path.with_name(path.name + ".complete")
    if record.is_file():
        try:
            want = json.loads(record.read_text())["bytes"]
        except (ValueError, KeyError):
            want = None
        if want is not None and path.stat().st_size != want:
            return f"{path.stat().st_size} bytes, {want} written"
    try:
        with zipfile.ZipFile(path) as z:
            z.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        return f"unreadable ({e})"
    return None


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The optimizer step in a checkpoint's name (``step=N``), None if the name has none."""
    m = _STEP.search(Path(path).name)
    return int(m.group(1)) if m else None


def _candidates(d: Path) -> list[Path]:
    """Checkpoint-like entries, newest first (by step, then modification time)."""
    found = [
        p
        for p in d.iterdir()
        if _STEP.search(p.name) and not p.name.endswith(_SUFFIXES) and not p.name.startswith(".")
    ]
    return sorted(found, key=lambda p: (checkpoint_step(p), p.stat().st_mtime), reverse=True)


def newest_checkpoint(ckpt_dir: str | os.PathLike, *, quarantine: bool = False) -> str | None:
    """The complete, intact checkpoint with the highest step in ``ckpt_dir`` (None if none).
    ``quarantine``: rename the damaged ones met on the way to ``<name>.corrupt`` (logged)."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return None
    for p in _candidates(d):
        why = verify(p)
        if why is None:
            return str(p)
        if quarantine:
            log.warning("skipping checkpoint %s: %s (renamed to %s.corrupt)", p.name, why, p.name)
            os.replace(p, p.with_name(p.name + ".corrupt"))
            p.with_name(p.name + ".complete").unlink(missing_ok=True)
    return None


def resolve_resume(resume: str, ckpt_dir: str | os.PathLike, *, quarantine: bool = False) -> str | None:
    if resume == "never":
        return None
    if resume == "auto":
        return newest_checkpoint(ckpt_dir, quarantine=quarantine)
    path = Path(resume)
    if not path.exists():
        raise ResumeError(f"resume={resume!r}: no such checkpoint; use resume=auto, never or a path")
    why = verify(path)
    if why is not None:
        raise ResumeError(f"resume={resume!r}: the checkpoint is damaged ({why}); use resume=auto")
    return resume


def _remove(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)
    p.with_name(p.name + ".complete").unlink(missing_ok=True)


def prune(ckpt_dir: str | os.PathLike, keep: int, protect: str | os.PathLike | None = None) -> list[str]:
    """Apply retention: keep the newest ``keep`` complete step checkpoints; remove older ones,
    pre-emption checkpoints older than the newest complete checkpoint, and ``*.tmp`` leftovers
    (call it when no save is in progress). ``protect`` (the checkpoint a run resumes from) is
    never removed. Returns the removed names."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    removed: list[str] = []
    for p in [*d.glob("*.tmp"), *d.glob(".*.tmp-*")]:  # interrupted writes (ours and speed_train.atomic's)
        _remove(p)
        removed.append(p.name)
    complete = [p for p in _candidates(d) if verify(p) is None]  # newest first
    regular = [p for p in complete if not p.name.startswith("preempt-")]
    stale = [p for p in complete[1:] if p.name.startswith("preempt-")]  # a newer checkpoint exists
    keep_path = Path(protect).resolve() if protect is not None else None
    for p in regular[keep:] + stale:
        if keep_path is not None and p.resolve() == keep_path:
            continue
        _remove(p)
        removed.append(p.name)
    return removed


class CompleteCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that records a save as complete (DeepSpeed directories: after every rank
    saved), cleans up a failed save, and applies this module's retention after each save."""

    def __init__(self, *, keep: int, **kw) -> None:
        super().__init__(save_top_k=-1, enable_version_counter=False, **kw)
        self.keep = keep

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        try:
            super()._save_checkpoint(trainer, filepath)
        except OSError as e:
            if trainer.is_global_zero:
                _remove(Path(filepath))
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(
                e.errno,
                f"cannot write checkpoint {filepath}: {e.strerror or e}; free space or "
                "choose a writable output_dir, then resume (resume=auto)",
            ) from None
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            mark_complete(filepath, _run_of(trainer))
            prune(self.dirpath, self.keep)

    def on_train_end(self, trainer, pl_module) -> None:
        """The end of training is always saved (the last step is rarely a multiple of
        ``every_n_train_steps``), so the export has a checkpoint behind it; a pre-emption stop has
        saved its own."""
        preempted = any(isinstance(cb, PreemptionCheckpoint) and cb.saved for cb in trainer.callbacks)
        if not preempted and not self._should_skip_saving_checkpoint(trainer):
            self._save_checkpoint(trainer, self.format_checkpoint_name(self._monitor_candidates(trainer)))
        super().on_train_end(trainer, pl_module)


class PreemptionCheckpoint(L.Callback):
    """SIGTERM / SIGUSR1 (SLURM pre-emption) / SIGINT (Ctrl-C): finish the current optimizer step,
    save a checkpoint, stop. With ``requeue`` (SLURM), the job is requeued and resumes with
    resume=auto. A second Ctrl-C stops at once, without a checkpoint.

    The handler only records the signal. At each optimizer-step boundary the ranks agree
    (one tiny all-reduce) on whether any of them got one, so all of them save the same step
    and stop together, even when the signal reached only some ranks or at different times.
    Installed at train start, it replaces Lightning's own SIGTERM handler (and its Ctrl-C
    handling) for the fit, which would stop without a checkpoint, and restores them at train end."""

    def __init__(
        self,
        ckpt_dir: str | os.PathLike,
        signals=(signal.SIGTERM, signal.SIGUSR1, signal.SIGINT),
        requeue: bool = False,
    ):
        self.ckpt_dir, self.signals, self.requeue = Path(ckpt_dir), signals, requeue
        self.received: int | None = None
        self.saved: str | None = None
        self._previous: dict = {}
        self._speak = True

    def _handler(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            if self.received == signal.SIGINT:  # pressed again: the user does not want to wait
                signal.default_int_handler(signum, frame)
            if self._speak:
                print(
                    "\nCtrl-C: stopping after this optimizer step, with a checkpoint (Ctrl-C again: "
                    "stop now, without one)",
                    file=sys.stderr,
                    flush=True,
                )
        self.received = signum

    def on_train_start(self, trainer, pl_module) -> None:
        self._speak = trainer.is_global_zero
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handler)

    def on_train_end(self, trainer, pl_module) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not pl_module.step_ended:  # finish the optimizer step first (StepBookkeeping decided)
            return
        signum = self.received or 0
        if trainer.world_size > 1:
            import torch

            agreed = trainer.strategy.reduce(
                torch.tensor(float(signum), device=trainer.strategy.root_device), reduce_op="max"
            )
            signum = int(agreed.item())
        if not signum:
            return
        self.received = signum
        path = self.ckpt_dir / f"preempt-step={trainer.global_step}.ckpt"
        trainer.save_checkpoint(path)
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            mark_complete(path, _run_of(trainer))
        self.saved = str(path)
        trainer.should_stop = True
        if self.requeue and trainer.is_global_zero and os.environ.get("SLURM_JOB_ID"):
            os.system(f"scontrol requeue {os.environ['SLURM_JOB_ID']}")
