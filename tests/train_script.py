"""`python -m tests.train_script OVERRIDES...` (or under torchrun): compose the config like
`python -m speed_train` does, add the test probes named in $SPEED_TEST_PROBES, and train."""

from __future__ import annotations

import sys

from speed_train.train.run import train
from tests.train_helpers import compose_cfg, probes_from_env

if __name__ == "__main__":
    train(compose_cfg(sys.argv[1:]), callbacks=probes_from_env())
