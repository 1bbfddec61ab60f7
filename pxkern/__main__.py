"""``python -m pxkern``: the command line of :mod:`pxkern.cli`."""

import sys

from pxkern.cli import main

sys.exit(main())
