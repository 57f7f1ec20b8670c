"""``python -m sasoftmax ...`` = the ``sasoftmax`` command line (:mod:`sasoftmax.lm.cli`)."""

import sys

from .lm.cli import main

sys.exit(main())
