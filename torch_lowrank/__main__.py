"""``python -m torch_lowrank``: the command line (:mod:`torch_lowrank.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
