"""``python -m launch``: the default job (see :mod:`launch.default_job`)."""

import sys

from launch.default_job import main

sys.exit(main())
