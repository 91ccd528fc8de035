"""``python -m craft_runner.bench``: the speed ratios (``make bench``)."""

import sys

from craft_runner.bench.speed import main

sys.exit(main())
