"""The paged KV cache's blocks: which are free, how many rows use each, and which hold a known prompt prefix.

A block is free, used (by a count of rows: the n samples of a prompt, or prompts that share a prefix, use the same
blocks), or cached: no row uses it, but it still holds a named prompt block and is kept until its memory is wanted,
least recently released first (vLLM's block pool with automatic prefix caching; Kwon et al. 2023).

A prompt is cut into full blocks of BLOCK tokens; block i is named by a hash of every token up to its end (a chain:
two prompts share block i's name only when they share all of blocks 0..i). A row that has prefilled blocks names
them; a prompt whose first chunk comes later and starts with named blocks takes those blocks into its table (no copy,
no compute) and prefills only the rest. Hits, lookups and the prompt tokens they saved are counted for /metrics.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

from minigpt.nn.ragged import BLOCK


def block_names(tokens: list[int]) -> list[bytes]:
    """The chained name of each full block of tokens (a block's name depends on every token before it)."""
    names, h = [], hashlib.blake2b(digest_size=16)
    for end in range(BLOCK, len(tokens) + 1, BLOCK):
        h.update(b"".join(t.to_bytes(4, "little") for t in tokens[end - BLOCK:end]))
        names.append(h.copy().digest())
    return names


class BlockPool:
    def __init__(self, n_blocks: int, prefix_cache: bool = True) -> None:
        self.n_blocks, self.prefix_cache = n_blocks, prefix_cache
        self._free = list(range(n_blocks - 1, -1, -1))  # pop() gives the lowest first
        self.refs = [0] * n_blocks  # rows using each block
        self._cached: OrderedDict[int, None] = OrderedDict()  # used by no row but named: least recently released first
        self._name_of: dict[int, bytes] = {}
        self._where: dict[bytes, int] = {}
        self.lookups = self.hits = self.prompt_tokens = self.hit_tokens = 0

    @property
    def available(self) -> int:
        """Blocks a row could take now (free ones, then cached ones, forgetting their prefix)."""
        return len(self._free) + len(self._cached)

    def take(self) -> int | None:
        """A block for one row (None when every block is in use)."""
        if self._free:
            b = self._free.pop()
        elif self._cached:
            b, _ = self._cached.popitem(last=False)
            del self._where[self._name_of.pop(b)]
        else:
            return None
        self.refs[b] = 1
        return b

    def share(self, b: int) -> None:
        """One more row uses block b."""
        if self.refs[b] == 0:
            del self._cached[b]
        self.refs[b] += 1

    def release(self, blocks: list[int]) -> None:
        """A row lets go of its blocks: the unused ones are freed, or kept as cached prefix blocks when named."""
        for b in blocks:
            self.refs[b] -= 1
            if self.refs[b] == 0:
                if b in self._name_of:
                    self._cached[b] = None
                else:
                    self._free.append(b)

    def name(self, tokens: list[int], table: list[int]) -> None:
        """The full blocks of tokens, held in table's blocks in order, are known now: a later prompt may share them."""
        if not self.prefix_cache:
            return
        for name, b in zip(block_names(tokens), table):
            if name not in self._where and b not in self._name_of:
                self._name_of[b], self._where[name] = name, b

    def lookup(self, tokens: list[int]) -> tuple[list[int], int]:
        """(blocks, tokens they hold) of the longest named prefix of tokens in whole blocks, not reaching the last token
        (its logits give the next token: when every block is named, the last one is computed again): the caller
        shares the blocks. ([], 0) when none."""
        if not self.prefix_cache:
            return [], 0
        self.lookups += 1
        self.prompt_tokens += len(tokens)
        blocks = []
        for name in block_names(tokens):
            if name not in self._where:
                break
            blocks.append(self._where[name])
        blocks = blocks[:(len(tokens) - 1) // BLOCK]  # whole blocks only: a row never writes into a shared block
        hit = len(blocks) * BLOCK
        if not hit:
            return [], 0
        self.hits += 1
        self.hit_tokens += hit
        return blocks, hit

    def stats(self) -> dict:
        return {"lookups": self.lookups, "hits": self.hits, "prompt_tokens": self.prompt_tokens,
                "hit_tokens": self.hit_tokens,
                "hit_rate": round(self.hit_tokens / self.prompt_tokens, 4) if self.prompt_tokens else None}
