"""What every command module shares: argument types checked by the parser (numbers in range, plans,
devices, spans), the common flags (--config/--set, --threads, --quantize, the training flags), and the
JSON and logging conventions (`--json` prints one object on stdout; progress goes to stderr)."""

from __future__ import annotations

import argparse
import re
import sys

from minigpt.core.errors import UserError

STOP_EXIT = {"SIGTERM": 128 + 15, "SIGINT": 128 + 2}


MAX_NEW_TOKENS = 1 << 20  # tokens one generate call may ask for (past block_size a RoPE model recomputes a window each)


MAX_ROWS = 4096  # sequences decoded together by one generate call (prompts x --num-samples)  # a run stopped by a signal exits like the signal would


def span_arg(text: str) -> tuple[int, int]:
    """LO:HI (or one number N for N:N), positive integers with LO <= HI."""
    lo, _, hi = text.partition(":")
    try:
        span = (int(lo), int(hi or lo))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not LO:HI (two integers)") from None
    if not 1 <= span[0] <= span[1]:
        raise argparse.ArgumentTypeError(f"{text}: give 1 <= LO <= HI")
    return span


def number(kind=float, lo=None, hi=None, lo_open=False):
    """An argparse type: a finite number within [lo, hi] (lo excluded with lo_open)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        low_bad = lo is not None and (value <= lo if lo_open else value < lo)
        if value != value or value in (float("inf"), float("-inf")) or low_bad or (hi is not None and value > hi):
            span = f"{'(' if lo_open else '['}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
            raise argparse.ArgumentTypeError(f"{text} must be a finite number in {span}")
        return value
    return parse


def plan_arg(text: str) -> str:
    """--plan: checked by the parser (keys and values), torch-free. `published` (extrapolate): the target's."""
    from minigpt.core.plan import parse_keys

    if text == "published":
        return text
    try:
        parse_keys(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--plan ")) from None
    return text


DEVICE = re.compile(r"auto|cpu|meta|mps|cuda(:\d{1,3})?")


def device_arg(text: str) -> str:
    """--device: a device name torch knows, checked by the parser (torch-free)."""
    if not DEVICE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: use auto, cpu, cuda or cuda:N (meta where counting)")
    return text


def tokens_arg(text: str):
    return text if text == "chinchilla" else number(float, 0, lo_open=True)(text)


def apply_threads(args) -> str:
    """Apply --threads (or the default rule) before a command runs torch; what was chosen, for its output."""
    from minigpt.core.device import use_threads

    return use_threads(args.threads, "--threads")


def log_for(args):
    """Where a long command's lines go: stdout, or with --json stderr (stdout then holds the one summary object).
    Not wrapped: a run's lines hold commands to paste whole (`resume with: minigpt train --resume DIR`)."""
    if getattr(args, "json", False):
        return lambda *a, **k: print(*a, **{**k, "file": sys.stderr})
    return print


def quantize_loaded(model, args) -> None:
    """--quantize int8|int4: the run's Linears swapped for weight-only quantized ones (nn/quantize.py)."""
    if getattr(args, "quantize", None):
        from minigpt.nn.quantize import quantize_model

        quantize_model(model, args.quantize)


def quantize_flag() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--quantize", choices=("int8", "int4"),
                   help="weight-only quantization of the Linears and LM head (int8 per channel, int4 in groups of 32; CPU)")
    return p


def load_cli_config(args):
    from minigpt.core.resolve import model_config

    return model_config(args.config, args.set)


def threads_flag() -> argparse.ArgumentParser:
    """--threads, on every command that runs torch on the CPU: one rule (core/device.default_threads)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--threads", type=number(int, 0, 4096), default=0,
                        help="CPU threads for torch (default 0: OMP_NUM_THREADS if set, else the cores the load "
                             "average says are idle; train and quickstart also take train.threads)")
    return parent


def config_flags(p: argparse.ArgumentParser, any_model: bool = False) -> None:
    more = "; or a run directory, or a Hugging Face config.json (or its folder)" if any_model else ""
    p.add_argument("--config", help=f"TOML preset: a path, or a preset name shipped with minigpt (default: tiny){more}")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value; repeatable (e.g. --set train.max_steps=100)")


def add_train_flags(p: argparse.ArgumentParser) -> None:
    config_flags(p)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint")
    p.add_argument("--stop-at", type=number(int, 1), metavar="STEP", help="stop and checkpoint after STEP (schedule unchanged)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in train.out_dir")
    p.add_argument("--plan", type=plan_arg, metavar="SPEC",
                   help="the parallel layout, e.g. dp=2,zero=3 or tp=2 (keys dp tp pp zero backend offload); sets "
                        "train.backend, tensor_parallel, pipeline_parallel, zero_stage and offload_*")
    p.add_argument("--json", action="store_true", help="the run's lines on stderr; stdout holds only the final summary "
                                                       "object")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # passed by `deepspeed`
