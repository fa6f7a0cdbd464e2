"""Thin launcher for torchrun: `torchrun --nproc_per_node 2 scripts/train.py --config tiny`."""

import sys

from minigpt.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
