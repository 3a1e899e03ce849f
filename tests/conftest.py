"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest
import torch

# The models here are tiny: intra-op threads only add synchronisation, and on a loaded 2-core
# machine a spinning thread pool made each exactness test ~15x slower (0.25 s -> 4 s). The runs
# the tests start as subprocesses use OMP_NUM_THREADS=1 too, so in-process and subprocess runs
# compute alike.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tok():
    """SmolLM2's real tokenizer (the packaged GGUF converted once into the cache, then loaded), one
    for the session: tests read it and never edit it (one that needs another template copies it)."""
    from speed_train.assets import load_smollm2_tokenizer

    return load_smollm2_tokenizer()
