"""``python -m manualbp``: the ``manualbp`` command line (see :mod:`manualbp.cli`)."""

import sys

from manualbp.cli import main

if __name__ == "__main__":
    sys.exit(main())
