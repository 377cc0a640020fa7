"""``python -m qmpshutdown``: the command line of :mod:`qmpshutdown._cli`."""

import sys

from ._cli import main

if __name__ == "__main__":
    sys.exit(main())
