"""The serving engine: the rows of one static KV cache, batched continuously.

Each running sequence owns one row of a preallocated cache (max_batch rows x max_len slots). A new
sequence joins between two decode steps: its prompt is prefilled alone into a free row (its slots
written, its first token sampled), and from the next step on it decodes with the others: one forward
pass per step over every running row, each row writing its own slot at its own position and attending
to its own slots only (iteration-level scheduling, Yu et al. 2022 "Orca"; vLLM and nanochat schedule
the same way). A row that finishes (a stop token, its max_tokens, the end of its context, or `finish`
from outside) leaves at once: the last running row moves into its place, so the running rows are always
0..n-1 and a step computes only them. The n samples of one prompt are prefilled once and the row copied.
Each sequence samples with its own settings and its own generator (seeded per sequence), so a request
gets the same tokens whatever else runs beside it.

Not thread-safe: one thread (the server's decode thread) calls `add`, `step` and `finish`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from minigpt.core.errors import UserError
from minigpt.infer.generate import filtered_probs
from minigpt.nn.model import GPT


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.8  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off


@dataclass(eq=False)
class Sequence:
    prompt: list[int]
    max_tokens: int
    sampling: Sampling = Sampling()
    seed: int | None = None  # None: a fresh random seed
    stop_ids: frozenset[int] = frozenset()  # tokens that end the sequence (not returned)
    tag: object = None  # the caller's (the server's job)
    tokens: list[int] = field(default_factory=list)  # generated so far
    finish_reason: str | None = None  # "stop", "length", or what `finish` was told

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class Engine:
    def __init__(self, model: GPT, max_batch: int, max_len: int | None = None) -> None:
        self.model = model.eval()
        self.max_batch = max_batch
        self.max_len = min(max_len or model.config.block_size, model.config.block_size)
        self.cache = model.make_cache(max_batch, self.max_len)
        self.device = model.wte.weight.device
        self.running: list[Sequence] = []  # row i of the cache is running[i]
        self._len: list[int] = []  # tokens held in each row's cache
        self._gen: list[torch.Generator] = []  # each row's sampler
        self.steps = self.prefills = 0

    @property
    def free(self) -> int:
        return self.max_batch - len(self.running)

    def check(self, prompt: list[int]) -> None:
        if not 1 <= len(prompt) < self.max_len:
            raise UserError(f"a prompt of {len(prompt)} tokens: this engine takes 1 to {self.max_len - 1} "
                            f"(its context is {self.max_len})")

    @torch.no_grad()
    def add(self, seqs: list[Sequence]) -> list[tuple[Sequence, int | None]]:
        """Start sequences that share one prompt (the n samples of a request): one prefill into a free row, the
        row copied to the others, each samples its first token. Returns the tokens emitted, as `step` does."""
        prompt = seqs[0].prompt
        if any(s.prompt != prompt for s in seqs) or len(seqs) > self.free:
            raise ValueError(f"add takes 1 to {self.free} sequences of one prompt")
        self.check(prompt)
        row, T = len(self.running), len(prompt)
        ids = torch.tensor([prompt], device=self.device)
        logits = self.model(ids, input_pos=torch.arange(T, device=self.device), cache=self.cache.rows(row, row + 1),
                            last_only=True).logits[:, -1]
        self.prefills += 1
        seed = seqs[0].seed if seqs[0].seed is not None else random.getrandbits(62)
        for i, s in enumerate(seqs):  # sample i uses seed + i: alone with that seed it would draw the same
            if i:
                self.cache.copy_row(row, row + i, T)
            self.running.append(s)
            self._len.append(T)
            self._gen.append(torch.Generator(device=self.device).manual_seed(seed + i))
        tokens = self._sample(logits.expand(len(seqs), -1), seqs, self._gen[row:])
        return self._emit(list(zip(seqs, tokens)))

    @torch.no_grad()
    def step(self) -> list[tuple[Sequence, int | None]]:
        """One decode step for every running row: each writes its last token at its own next slot and samples
        the next. Returns (sequence, token) for each row, token None when it was a stop token; finished
        sequences (finish_reason set) have left their rows."""
        n = len(self.running)
        if n == 0:
            return []
        last = torch.tensor([[s.tokens[-1]] for s in self.running], device=self.device)  # (n, 1)
        pos = torch.tensor(self._len, device=self.device).unsqueeze(1)  # (n, 1): each row's next slot
        slots = torch.arange(self.max_len, device=self.device)
        visible = (slots.unsqueeze(0) <= pos)[:, None, None, :]  # (n, 1, 1, S): a row sees its own slots only
        logits = self.model(last, input_pos=pos, positions=pos, cache=self.cache.rows(0, n), attn_mask=visible).logits[:, -1]
        self._len = [x + 1 for x in self._len]
        self.steps += 1
        seqs = list(self.running)
        return self._emit(list(zip(seqs, self._sample(logits, seqs, self._gen))))

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a running sequence now (a stop string, a client gone) and free its row."""
        if not seq.done:
            seq.finish_reason = reason
        if seq in self.running:
            self._remove(self.running.index(seq))

    def _emit(self, drawn: list[tuple[Sequence, int]]) -> list[tuple[Sequence, int | None]]:
        out = []
        for s, token in drawn:
            if token in s.stop_ids:
                s.finish_reason, token = "stop", None
            else:
                s.tokens.append(token)
                if len(s.tokens) >= s.max_tokens or len(s.prompt) + len(s.tokens) >= self.max_len:
                    s.finish_reason = "length"
            out.append((s, token))
        for s, _ in out:
            if s.done:
                self._remove(self.running.index(s))
        return out

    def _remove(self, i: int) -> None:
        """Free row i: the last running row moves into it (its cache slots copied), so rows stay 0..n-1."""
        last = len(self.running) - 1
        if i != last:
            self.cache.copy_row(last, i, self._len[last])
            self.running[i], self._len[i], self._gen[i] = self.running[last], self._len[last], self._gen[last]
        self.running.pop()
        self._len.pop()
        self._gen.pop()

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence], gens: list[torch.Generator]) -> list[int]:
        """Each row's next token with its own settings and generator: greedy rows by argmax, the others by the
        exponential race (argmax p / E, E ~ Exp(1), drawn from the row's own generator), rows that share settings
        filtered together."""
        out = logits.argmax(dim=-1)
        groups: dict[Sampling, list[int]] = {}
        for i, s in enumerate(seqs):
            if s.sampling.temperature > 0:
                groups.setdefault(s.sampling, []).append(i)
        for sampling, rows in groups.items():
            probs = filtered_probs(logits[rows], sampling.temperature, sampling.top_k, sampling.top_p)
            race = torch.stack([torch.empty_like(probs[0]).exponential_(1.0, generator=gens[i]) for i in rows])
            out[rows] = (probs / race).argmax(dim=-1)
        return out.tolist()


def generate_all(engine: Engine, seqs: list[Sequence]) -> list[Sequence]:
    """Run sequences to the end on the engine, admitting each as soon as a row is free (continuous batching
    without a server: tests and benchmarks)."""
    waiting = list(seqs)
    while waiting or engine.running:
        while waiting and engine.free:
            engine.add([waiting.pop(0)])
        engine.step()
    return seqs
