"""The package's layering, as CI checks it: the import-linter contracts in pyproject.toml and no
import cycle between modules (imports inside functions included)."""

from __future__ import annotations

import pytest

grimp = pytest.importorskip("grimp")


def test_import_contracts_are_kept():
    from importlinter.cli import lint_imports

    assert lint_imports() == 0  # its report names the broken contract and the import chain


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
