"""``python -m cluster``: the ``eventray`` command line."""

import sys

from cluster.cli import main

sys.exit(main())
