"""``python3 -m fdboxd``: the daemon, runnable from a checkout with no install step."""

import sys

from .daemon import main

sys.exit(main())
