"""``python -m kvprobe ...`` is the ``kvprobe`` command."""

import sys

from kvprobe.cli import main

sys.exit(main())
