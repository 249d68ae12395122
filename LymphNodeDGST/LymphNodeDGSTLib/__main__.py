"""`python -m LymphNodeDGSTLib` runs the `lndgst` command line."""

import sys

from LymphNodeDGSTLib.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
