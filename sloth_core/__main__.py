"""``python -m sloth_core``: the ``sloth`` command line."""

import sys

from sloth_core.cli import main

sys.exit(main())
