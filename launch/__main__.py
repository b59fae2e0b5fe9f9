"""``python -m launch``: the hydra application (see :mod:`launch.app`)."""

import sys

from launch.app import main

sys.exit(main())
