"""Entry point for `pulumi` (Pulumi.yaml: main: stacks/): make the checkout importable, then run the program."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stacks.program import main

main()
