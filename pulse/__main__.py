"""``python -m pulse``: the command line (see ``pulse.cli``)."""

import sys

from pulse.cli import main

if __name__ == "__main__":
    sys.exit(main())
