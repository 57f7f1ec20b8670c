"""``python -m sasoftmax ...`` = the ``sasoftmax`` command line."""

import sys

from .cli import main

sys.exit(main())
