"""Numbers and JSON for people and programs: byte, FLOP and dollar formatting; JSON that survives
NaN, infinities and numpy scalars. Torch-free."""

from __future__ import annotations

import json
import math


def json_safe(obj):
    """obj with every non-finite float (NaN, inf) replaced by None, so that json.dumps writes valid JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def to_json(obj, **kw) -> str:
    """Valid JSON always: non-finite numbers become null (json.dumps would write NaN/Infinity)."""
    return json.dumps(json_safe(obj), allow_nan=False, **kw)


def fmt_bytes(n: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def fmt_flops(n: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if abs(n) >= scale:
            return f"{n / scale:.4g} {unit}"
    return f"{n:.4g} FLOP"


def fmt_usd(x: float) -> str:
    return f"${x / 1e6:,.2f}M" if x >= 1e6 else f"${x:,.0f}"


TERMINAL_COLUMNS = 120


def fit(lines: list[str] | str, width: int = TERMINAL_COLUMNS) -> str:
    """Human-readable lines wrapped at `width` columns, at spaces, each continuation indented: what a terminal
    holds. Table rows already under the width stay as they are."""
    import textwrap

    out = []
    for line in (lines.split("\n") if isinstance(lines, str) else lines):
        if len(line) <= width:
            out.append(line)
            continue
        lead = len(line) - len(line.lstrip(" "))
        out += textwrap.wrap(line, width, initial_indent="", subsequent_indent=" " * (lead + 4),
                             break_long_words=False, break_on_hyphens=False) or [line]
    return "\n".join(out)
