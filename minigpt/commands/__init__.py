"""The CLI's subcommands, one module per job; minigpt/cli.py assembles and dispatches them."""
