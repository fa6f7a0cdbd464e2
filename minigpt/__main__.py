"""`python -m minigpt ...` and `torchrun ... -m minigpt train ...`: the `minigpt` command."""

import sys

from minigpt.cli import main

sys.exit(main())
