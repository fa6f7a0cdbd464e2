"""The `minigpt` command: parse and dispatch. Each command module of minigpt/commands/ adds its subcommands
(flags and the function each runs); the functions turn flags into calls of the library, where the work is.

User mistakes (UserError) print one line, `error: ...`, and exit 2; bugs keep their traceback.
torch is imported by the commands that run a model, never at import time: `minigpt extrapolate`,
`minigpt memory --params` and every `--help` stay torch-free (a test checks it).
"""

from __future__ import annotations

import argparse
import os
import sys

from minigpt.commands import cost, generate, measure, run, serve
from minigpt.core.errors import UserError, os_error


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (`error: ...`, exit 2), like every other input."""

    def error(self, message: str):
        sys.stderr.write(f"error: {self.prog}: {message}; see '{self.prog} --help'\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    from minigpt import __version__

    parser = Parser(prog="minigpt", description="Train, run and measure small GPTs.")
    parser.add_argument("--version", action="version", version=f"minigpt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for commands in (run, generate, serve, measure, cost):  # each module adds its subcommands and their functions
        commands.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # every line reaches a pipe or a file as it is printed
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)
    args = build_parser().parse_args(argv)
    func = getattr(args, "subfunc", None) or args.func  # a nested subcommand (flops sweep, extrapolate plot) wins
    try:
        return func(args) or 0
    except UserError as e:
        return _user_error(e)
    except OSError as e:  # disk full, read-only, permissions...: the user's to fix, in one line
        if os_error(e) is None:
            raise
        return _user_error(os_error(e))
    except KeyboardInterrupt:  # outside a training loop (which stops gracefully itself)
        print("interrupted; the last complete checkpoint is intact", file=sys.stderr)
        return 130


def _user_error(e: UserError) -> int:
    # under torchrun every rank sees the same error and rank 0 says it; a RankError is each rank's own
    if os.environ.get("RANK", "0") == "0" or type(e).__name__ == "RankError":
        print(f"error: {e}", file=sys.stderr, flush=True)
    return 2


if __name__ == "__main__":
    sys.exit(main())
