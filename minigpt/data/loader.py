"""Batches: deterministic windows keyed by (seed, step, micro-batch, rank), prefetched."""

from __future__ import annotations

import queue
import threading
from typing import Iterator

import numpy as np
import torch

from minigpt.core.errors import UserError


def check_split_length(tokens: np.ndarray, split: str, seq_len: int) -> None:
    if len(tokens) < seq_len + 2:
        raise UserError(
            f"the {split} split has {len(tokens):,} tokens, too few for windows of {seq_len + 1}: "
            f"use a larger corpus, a larger data.val_fraction, or a smaller model.block_size"
        )


def window_starts(num_tokens: int, batch_size: int, seq_len: int, key: tuple[int, ...],
                  allowed: np.ndarray | None = None) -> np.ndarray:
    """Random window starts, a pure function of `key` (seed, split, step, rank, micro-step): anywhere, or drawn
    from `allowed` (document starts: data.align = "document")."""
    rng = np.random.default_rng(key)
    if allowed is not None:
        return allowed[rng.integers(0, len(allowed), size=batch_size)]
    return rng.integers(0, num_tokens - seq_len - 1, size=batch_size)


def document_starts(tokens: np.ndarray, eot_id: int | None, seq_len: int) -> np.ndarray:
    """Where each document begins (the token after an <|endoftext|>, and the first) with a whole window after it."""
    if eot_id is None:
        raise UserError('data.align = "document" needs a tokenizer with <|endoftext|> between documents')
    starts = np.concatenate([[0], np.flatnonzero(np.asarray(tokens[:-1]) == eot_id) + 1])
    starts = starts[starts <= len(tokens) - seq_len - 2]
    if len(starts) == 0:
        raise UserError(f'data.align = "document": no document starts a window of {seq_len + 1} tokens; use "none"')
    return starts


def get_batch(tokens: np.ndarray, batch_size: int, seq_len: int, key: tuple[int, ...], allowed: np.ndarray | None = None):
    """Inputs and next-token targets, each (batch_size, seq_len) int64 torch tensors on CPU."""
    starts = window_starts(len(tokens), batch_size, seq_len, key, allowed)
    windows = np.stack([np.asarray(tokens[s : s + seq_len + 1], dtype=np.int64) for s in starts])
    w = torch.from_numpy(windows)
    return w[:, :-1], w[:, 1:]


def iter_train_keys(seed: int, step: int, rank: int, accum: int) -> Iterator[tuple[int, ...]]:
    """Batch keys of one optimizer step on one rank: different on each rank and micro-step.

    Keys number the micro-batches of the whole global batch (rank * accum + micro), so the
    same global batch is drawn whatever the split between ranks and accumulation: 2 ranks x 1
    micro-batch see exactly the data of 1 rank x 2 accumulated micro-batches.
    """
    for micro in range(accum):
        yield (seed, 0, step, rank * accum + micro)


class BatchLoader:
    """The micro-batches of every step, built one step ahead in a background thread.

    While step s runs, the thread draws step s+1's windows (a pure function of seed, step, rank
    and micro-step, so prefetching changes nothing) and, on CUDA, pins them; the loop copies them
    with non_blocking=True. Iterate to get each step's list of (x, y) on `device`, in step order.
    """

    def __init__(self, tokens: np.ndarray, micro_batch: int, seq_len: int, seed: int, rank: int, accum: int,
                 steps: range, device: torch.device, depth: int = 2, allowed: np.ndarray | None = None) -> None:
        self.tokens, self.micro_batch, self.seq_len, self.allowed = tokens, micro_batch, seq_len, allowed
        self.seed, self.rank, self.accum, self.steps, self.device = seed, rank, accum, steps, device
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._produce, name="minigpt-batches", daemon=True)
        self.thread.start()

    def _produce(self) -> None:
        pin = self.device.type == "cuda"
        try:
            for step in self.steps:
                batch = [get_batch(self.tokens, self.micro_batch, self.seq_len, key, self.allowed)
                         for key in iter_train_keys(self.seed, step, self.rank, self.accum)]
                if pin:
                    batch = [(x.pin_memory(), y.pin_memory()) for x, y in batch]
                while not self.stop.is_set():
                    try:
                        self.queue.put(batch, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self.stop.is_set():
                    return
        except BaseException as e:  # handed to the loop, which raises it
            self.queue.put(e)

    def __iter__(self):
        for _ in self.steps:
            item = self.queue.get()
            if isinstance(item, BaseException):
                raise item
            yield [(x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)) for x, y in item]

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)

    def __enter__(self) -> "BatchLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
