"""One live run per run folder.

Two runs writing one folder delete each other's temporary files and leave contradicting results.
The run that starts first holds an exclusive lock on ``<run folder>/.run.lock`` (an OS file lock,
through ``filelock``) until its process ends; the kernel drops the lock of a process that dies, even
by kill -9, so a stale lock cannot block the next run. A second run on the folder is refused in one
line, naming the holder recorded in ``.run.owner``.

``python -m speed_train`` takes the lock in a Hydra callback (:class:`RunFolderCallback`), before
Hydra writes ``.hydra/`` and its log into the folder; :func:`speed_train.train.run.train` takes it
again (a no-op in the same process) for runs started from Python. Only global rank 0 locks: the
other ranks of a run share its folder.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from speed_train.atomic import write_json
from speed_train.train.build import ConfigError, check_output_dir

log = logging.getLogger(__name__)

LOCK = ".run.lock"
OWNER = ".run.owner"
_held: dict[Path, Any] = {}  # folder -> lock held by this process


class RunFolderBusy(ConfigError):
    """Another live run holds the run folder."""


def _rank() -> int:
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0)


def lock_run_folder(folder: str | os.PathLike) -> bool:
    """Hold ``folder``'s run lock for the life of this process (rank 0 only). True when taken now;
    False when this process holds it already, or on another rank. Raises :class:`RunFolderBusy`."""
    from filelock import FileLock, Timeout

    path = Path(folder).resolve()
    if _rank() != 0 or path in _held:
        return False
    lock = FileLock(str(path / LOCK))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise RunFolderBusy(
            f"run folder {path} is in use by another run ({_owner(path)}): wait for it to end, "
            "or choose another hydra.run.dir"
        ) from None
    except (OSError, NotImplementedError) as e:  # a file system without locks (some network mounts)
        log.warning("cannot lock the run folder %s (%s): a second run on it would not be refused", path, e)
        return False
    _held[path] = lock
    atexit.register(release_run_folder, path)  # tidy at a normal exit; the OS drops the lock anyway
    write_json(
        path / OWNER,
        {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")},
    )
    return True


def release_run_folder(folder: str | os.PathLike) -> None:
    lock = _held.pop(Path(folder).resolve(), None)
    if lock is not None:
        (Path(folder) / OWNER).unlink(missing_ok=True)
        lock.release()


@contextmanager
def run_folder_lock(folder: str | os.PathLike) -> Iterator[None]:
    """Hold the run lock inside (released after, when taken here)."""
    taken = lock_run_folder(folder)
    try:
        yield
    finally:
        if taken:
            release_run_folder(folder)


def _owner(path: Path) -> str:
    try:
        o = json.loads((path / OWNER).read_text())
        return f"pid {o['pid']} on {o['host']}, started {o['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "owner unknown"


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover  (hydra is a dependency; this keeps the module importable)
    Callback = object  # type: ignore[misc,assignment]


class RunFolderCallback(Callback):
    """``hydra.callbacks``: before Hydra creates the run folder and writes ``.hydra/`` into it,
    check that the folder can be written (else Hydra stops with an OSError traceback), take its run
    lock, and refuse a resume from another run's checkpoint (else the refused settings would
    already stand in ``.hydra/config.yaml``). Errors print one line and exit 1, as the entry
    point's do; :func:`speed_train.train.run.train` checks all of it again."""

    def on_run_start(self, config, **kwargs) -> None:
        if _rank() != 0:
            return
        try:  # ${now:...} is cached: the folder run_job will use
            folder = str(config.hydra.run.dir)
            out = Path(folder if OmegaConf.is_interpolation(config, "output_dir") else config.output_dir)
        except Exception:  # an interpolation that needs the job's runtime: train() checks it
            return
        from speed_train.train.checkpointing import resolve_resume
        from speed_train.train.resume import check_resume, check_steps, run_fingerprint

        try:
            check_output_dir(folder, key="hydra.run.dir")
            lock_run_folder(folder)
            ckpt = resolve_resume(str(config.resume), out.absolute() / "checkpoints")
            check_resume(ckpt, run_fingerprint(config))
            if config.trainer.max_steps > 0:
                check_steps(ckpt, config.trainer.max_steps)
        except ConfigError as e:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
