"""`python -m minigpt.train ...`, `torchrun -m minigpt.train ...` and DeepSpeed's `--module minigpt.train`: the
`minigpt train` command."""

import sys

from minigpt.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
