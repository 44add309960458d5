"""``python -m fsg``: the ``fsg`` command line (see :mod:`fsg.cli`)."""

import sys

from fsg.cli import main

if __name__ == "__main__":
    sys.exit(main())
