"""``python -m speed_train.chat``: see :mod:`speed_train.tools.chat`."""

import sys

from speed_train.tools.chat import main

if __name__ == "__main__":
    sys.exit(main())
