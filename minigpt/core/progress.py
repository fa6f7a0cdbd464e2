"""Progress of long phases, on stderr: a tqdm bar on a terminal, plain periodic lines otherwise.

A bar's carriage returns make a mess of a log file or a pipe, so when stderr is not a terminal
the same progress becomes a line every few seconds (MINIGPT_PROGRESS_EVERY_S, default 10):

    tokenize: 1,234/5,678 documents (21.7%), 812.4 documents/s, ETA 0m05s

Torch-free.
"""

from __future__ import annotations

import os
import sys
import time


class Progress:
    """with Progress(total, "tokenize", "documents") as p: ... p.update(n)"""

    def __init__(self, total: float, desc: str, unit: str = "it", enabled: bool = True) -> None:
        self.total, self.desc, self.unit, self.done = total, desc, unit, 0
        self.enabled = enabled
        self.bar = None
        self.start = self.last = time.monotonic()
        self.every = float(os.environ.get("MINIGPT_PROGRESS_EVERY_S", "10"))
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=f" {unit}", unit_scale=True, file=sys.stderr, leave=False)

    def update(self, n: float = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and time.monotonic() - self.last >= self.every:
            self.last = time.monotonic()
            sys.stderr.write(self.line() + "\n")
            sys.stderr.flush()

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.done / elapsed
        share = f" ({self.done / self.total:.1%})" if self.total else ""
        eta = (self.total - self.done) / rate if rate and self.total else 0.0
        return (f"{self.desc}: {self.done:,.0f}/{self.total:,.0f} {self.unit}{share}, {rate:,.1f} {self.unit}/s, "
                f"ETA {int(eta // 60)}m{int(eta % 60):02d}s")

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.done and time.monotonic() - self.start >= self.every:
            sys.stderr.write(f"{self.desc}: {self.done:,.0f} {self.unit} in {time.monotonic() - self.start:.1f} s\n")
            sys.stderr.flush()


def note(what: str) -> None:
    """One progress line on stderr (a benchmark's stdout holds its one JSON line)."""
    sys.stderr.write(what + "\n")
    sys.stderr.flush()
