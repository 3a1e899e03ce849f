"""Atomic file writes: a crash or a full disk mid-write never leaves a truncated result.

Every file a user keeps (result JSON/markdown, tokenised caches, exported configs) is written to
a temporary file in the same folder, fsync-ed, then ``os.replace``-d over the target, which
POSIX makes atomic: readers see the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def atomic_write(path: str | os.PathLike, write: Callable[[IO], None], binary: bool = False) -> Path:
    """Call ``write(fh)`` on a temp file beside ``path`` and move it into place."""
    path = Path(path)
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
    """JSON with indent 2 and a trailing newline; serialised before the file is touched."""
    text = json.dumps(obj, indent=2, **dumps_kw) + "\n"
    return write_text(path, text)


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 110) -> Path:
    """A matplotlib figure as PNG, written atomically; the figure is closed (no leak in loops)."""
    import matplotlib.pyplot as plt

    try:
        return atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=dpi), binary=True)
    finally:
        plt.close(fig)
