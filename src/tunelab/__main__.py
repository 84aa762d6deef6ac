"""`python -m tunelab ...`: the CLI (what `torchrun -m tunelab train ...` starts on every rank)."""

import sys

from tunelab.cli import main

if __name__ == "__main__":
    sys.exit(main())
