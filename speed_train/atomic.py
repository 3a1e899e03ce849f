"""Atomic writes: a crash or a full disk mid-write never leaves a truncated result.

The one place for it. Every file a user keeps (result JSON/markdown, checkpoints, logs, exported
models, caches) is written to a temporary file (or folder) beside the target, fsync-ed, then
``os.replace``-d over it, which POSIX makes atomic: readers see the old version or the new one,
never half of one. A failed write removes its temporary and leaves the old version in place.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def atomic_write(path: str | os.PathLike, write: Callable[[IO], None], binary: bool = False) -> Path:
    """Call ``write(fh)`` on a temp file beside ``path`` and move it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; results and caches are shared files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda fh: fh.write(text))


def write_json(path: str | os.PathLike, obj: Any, **dumps_kw: Any) -> Path:
    """JSON with indent 2 and a trailing newline; serialised before the file is touched. NaN and
    infinities are written as null: json.dumps would write bare ``NaN``, which is not JSON."""
    text = json.dumps(_finite(obj), indent=2, allow_nan=False, **dumps_kw) + "\n"
    return write_text(path, text)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 110) -> Path:
    """A matplotlib figure as PNG, written atomically; the figure is closed (no leak in loops)."""
    import matplotlib.pyplot as plt

    try:
        return atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=dpi), binary=True)
    finally:
        plt.close(fig)


def atomic_dir(final: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_dir)`` on an empty temporary folder beside ``final``, then swap it into
    place (an existing ``final`` is moved aside first and removed after the swap)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        write(tmp)
        _share_like_umask(tmp)
        old = None
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent)) / "old"
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old.parent, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _share_like_umask(folder: Path) -> None:
    """mkdtemp (and some writers) use owner-only modes; give the folder the usual umask modes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for f in folder.rglob("*"):
        os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~umask)


def remove_orphans(folder: str | os.PathLike, name: str) -> None:
    """Remove temporaries of ``name`` left in ``folder`` by a killed writer (call under a lock)."""
    folder = Path(folder)
    for orphan in [*folder.glob(f".{name}.tmp-*"), *folder.glob(f".{name}.old-*")]:
        if orphan.is_dir():
            shutil.rmtree(orphan, ignore_errors=True)
        else:
            orphan.unlink(missing_ok=True)
