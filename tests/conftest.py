"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tok():
    """SmolLM2's real tokenizer (the packaged GGUF converted once into the cache, then loaded), one
    for the session: tests read it and never edit it (one that needs another template copies it)."""
    from speed_train.assets import load_smollm2_tokenizer

    return load_smollm2_tokenizer()
