"""The package's layering, as CI checks it: the import-linter contracts in pyproject.toml and no
import cycle between modules (imports inside functions included)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

grimp = pytest.importorskip("grimp")
ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    # in a process of its own: import-linter configures logging (it would disable the package's
    # loggers for the tests that run after it)
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports())",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:]  # its report names the broken contract and the import chain
    assert "0 broken" in r.stdout


def test_no_import_cycles():
    graph = grimp.build_graph("speed_train")
    cycles = sorted(
        {
            tuple(sorted((m, imported)))
            for m in graph.modules
            for imported in graph.find_modules_directly_imported_by(m)
            if imported != m and graph.chain_exists(importer=imported, imported=m)
        }
    )
    assert cycles == []
