"""``python -m launch.compare RUN_A RUN_B``: the largest relative deviation between two recorded runs
(see :mod:`launch.cli.compare`)."""

import sys

if __name__ == "__main__":
    from launch.cli.compare import main

    sys.exit(main())
