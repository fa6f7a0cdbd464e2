"""Thin launcher for torchrun: `torchrun --nproc_per_node 2 scripts/train.py --config configs/tiny.toml`."""

import sys

from minigpt.train import main

if __name__ == "__main__":
    sys.exit(main())
