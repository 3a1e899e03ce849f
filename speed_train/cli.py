"""What the command-line tools share: argument errors as one line, and checked argument types."""

from __future__ import annotations

import argparse
from pathlib import Path


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with errors in the project's format: one line, ``error: ...``, exit status 2
    (argparse's own), instead of the usage text followed by ``prog: error: ...``."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {message}\n")


def output_file(text: str) -> str:
    """A file to write (``--json``, ``--plot``): its folder must exist already; a mistyped path
    must not create folders (at the filesystem root, say)."""
    folder = Path(text).expanduser().parent
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: the folder {folder} does not exist; create it first")
    return text


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value
