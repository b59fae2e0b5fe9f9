"""``python -m launch.equivalence``: the equivalence command (see :mod:`launch.cli.equivalence`)."""

import sys

if __name__ == "__main__":
    from launch.cli.equivalence import main

    sys.exit(main())
