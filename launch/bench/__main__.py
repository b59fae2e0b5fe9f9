"""``python -m launch.bench``: the performance benchmarks (see :mod:`launch.bench.cli`)."""

import sys

from launch.bench.cli import main

sys.exit(main())
