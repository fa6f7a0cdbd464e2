"""A prefix cache: the keys and values of prompts' leading blocks, kept after their rows move on, found by hash.

A prompt is cut into full blocks of BLOCK tokens; block i is named by a hash of every token up to its end (a chain:
two prompts share block i's name only when they share all of blocks 0..i, vLLM's automatic prefix caching). When a
row has prefilled its prompt, or a chunk of a long one, its full blocks so far are copied into a row of this pool
(the least recently used one) and their names point there. A prompt whose first chunk comes after that (the engine
asks at the first chunk, not at admission, so prompts admitted together share what the first of them prefilled)
and that starts with named blocks gets their slots copied from the pool into its own row and prefills only the
rest: the copy is a memory move, the prefill a forward pass.

Rows of the engine's cache are whole contexts (not pages), so the pool holds its own copies; its size is
`rows` contexts. Hits, lookups and the prompt tokens they saved are counted for /metrics.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

BLOCK = 16  # tokens per block: a prompt shares its cache in whole blocks


def block_names(prompt: list[int]) -> list[bytes]:
    """The chained name of each full block of the prompt (a block's name depends on every token before it)."""
    names, h = [], hashlib.blake2b(digest_size=16)
    for end in range(BLOCK, len(prompt) + 1, BLOCK):
        h.update(b"".join(t.to_bytes(4, "little") for t in prompt[end - BLOCK:end]))
        names.append(h.copy().digest())
    return names


class PrefixCache:
    def __init__(self, model, rows: int, max_len: int) -> None:
        self.cache = model.make_cache(rows, max_len)
        self.where: dict[bytes, int] = {}  # block name -> pool row
        self.held: OrderedDict[int, list[bytes]] = OrderedDict((r, []) for r in range(rows))  # row -> its names, LRU first
        self.lookups = self.hits = self.prompt_tokens = self.hit_tokens = 0

    def lookup(self, prompt: list[int]) -> tuple[int, int]:
        """(pool row, tokens) of the longest cached prefix of the prompt in whole blocks, less the prompt's last
        token when every token is cached (its logits give the first new token); (-1, 0) when none."""
        self.lookups += 1
        self.prompt_tokens += len(prompt)
        row, n = -1, 0
        for i, name in enumerate(block_names(prompt)):
            if name not in self.where:
                break
            row, n = self.where[name], min((i + 1) * BLOCK, len(prompt) - 1)  # that row holds blocks 0..i too
        if n:
            self.hits += 1
            self.hit_tokens += n
            self.held.move_to_end(row)
        return row, n

    def store(self, prompt: list[int], src, src_row: int) -> None:
        """Keep the full blocks of a prefilled prompt (row src_row of cache src), unless they are all kept already."""
        names = block_names(prompt)
        if not names or all(n in self.where for n in names):
            return
        row, old = next(iter(self.held.items()))  # the least recently used pool row
        for name in old:
            if self.where.get(name) == row:
                del self.where[name]
        length = len(names) * BLOCK
        for dst, s in zip(self.cache.k + self.cache.v, src.k + src.v):
            dst[row, :, :length] = s[src_row, :, :length]
        self.held[row] = names
        self.held.move_to_end(row)
        for name in names:
            self.where[name] = row

    def load(self, row: int, tokens: int, dst, dst_row: int) -> None:
        """Copy the first `tokens` slots of pool row `row` into row dst_row of cache dst."""
        for d, s in zip(dst.k + dst.v, self.cache.k + self.cache.v):
            d[dst_row, :, :tokens] = s[row, :, :tokens]

    def stats(self) -> dict:
        return {"lookups": self.lookups, "hits": self.hits, "prompt_tokens": self.prompt_tokens,
                "hit_tokens": self.hit_tokens,
                "hit_rate": round(self.hit_tokens / self.prompt_tokens, 4) if self.prompt_tokens else None}
