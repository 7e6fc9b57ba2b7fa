"""``python -m reparam.operator [flags]``: run the operator (see :mod:`.main`)."""

import sys

from .main import run

sys.exit(run())
