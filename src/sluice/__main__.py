"""`python -m sluice` is the `sluice` command (the guard matters: vLLM spawns processes)."""

import sys

from sluice.cli import main

if __name__ == "__main__":
    sys.exit(main())
