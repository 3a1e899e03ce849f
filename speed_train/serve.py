"""``python -m speed_train.serve``: see :mod:`speed_train.tools.serve`."""

import sys

from speed_train.tools.serve import main

if __name__ == "__main__":
    sys.exit(main())
