"""``python -m launch``: the hydra application (see :mod:`launch.cli.app`)."""

import sys

from launch.cli.app import main

sys.exit(main())
