"""``python -m launch.plot PATH``: figures of a run, or figures and a table of a sweep (see :mod:`launch.cli.plot`)."""

import sys

if __name__ == "__main__":
    from launch.cli.plot import main

    sys.exit(main())
