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

With a draft model (speculative decoding, Leviathan et al. 2023; Chen et al. 2023) a step is a round for
every running row at once: the draft, on its own cache of the same rows, proposes k tokens per row from each
row's own distribution q; the target scores all k + 1 positions of every row in one forward pass; each row
accepts draft d_i with probability min(1, p_i(d_i) / q_i(d_i)) (its own generator), at the first rejection
draws from norm(max(0, p_i - q_i)), and after k acceptances draws one more from p_{k+1}: every token is
distributed as the target's own sampling, and at temperature 0 it is the target's greedy token. Rows accept
different counts and go on at their own positions; rejected slots need no undo (a row never attends past its
length, and the next round writes over them).

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
    def __init__(self, model: GPT, max_batch: int, max_len: int | None = None, draft: GPT | None = None,
                 k: int = 4) -> None:
        self.model = model.eval()
        self.max_batch = max_batch
        blocks = [model.config.block_size] + ([draft.config.block_size] if draft is not None else [])
        self.max_len = min([max_len or min(blocks), *blocks])
        self.cache = model.make_cache(max_batch, self.max_len)
        self.device = model.wte.weight.device
        self.running: list[Sequence] = []  # row i of the cache is running[i]
        self._len: list[int] = []  # tokens held in each row's cache: its context less the last token
        self._gen: list[torch.Generator] = []  # each row's sampler
        self.steps = self.prefills = 0
        self.draft, self.k = (draft.eval() if draft is not None else None), k
        if draft is not None:
            if k < 1 or draft.config.vocab_size != model.config.vocab_size:
                raise UserError(f"speculative decoding needs k >= 1 (got {k}) and a draft with the target's vocab_size")
            self.draft_cache = draft.make_cache(max_batch, self.max_len)
        self.drafted = self.accepted = 0  # speculative: draft tokens proposed and accepted, over every row

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
        if self.draft is not None:
            self.draft(ids, input_pos=torch.arange(T, device=self.device), cache=self.draft_cache.rows(row, row + 1),
                       last_only=True)
        self.prefills += 1
        seed = seqs[0].seed if seqs[0].seed is not None else random.getrandbits(62)
        for i, s in enumerate(seqs):  # sample i uses seed + i: alone with that seed it would draw the same
            if i:
                self._copy_row(row, row + i, T)
            self.running.append(s)
            self._len.append(T)
            self._gen.append(torch.Generator(device=self.device).manual_seed(seed + i))
        tokens = self._sample(logits.expand(len(seqs), -1), seqs, self._gen[row:])
        return self._emit([(s, [t]) for s, t in zip(seqs, tokens)])

    @torch.no_grad()
    def step(self) -> list[tuple[Sequence, int | None]]:
        """One decode step for every running row: each writes its last token at its own next slot and samples
        the next. Returns (sequence, token) for each row, token None when it was a stop token; finished
        sequences (finish_reason set) have left their rows."""
        n = len(self.running)
        if n == 0:
            return []
        if self.draft is not None:
            return self._speculate()
        last = torch.tensor([[s.tokens[-1]] for s in self.running], device=self.device)  # (n, 1)
        pos = torch.tensor(self._len, device=self.device).unsqueeze(1)  # (n, 1): each row's next slot
        logits = self.model(last, input_pos=pos, positions=pos, cache=self.cache.rows(0, n),
                            attn_mask=self._visible(pos)).logits[:, -1]  # a row sees its own slots only
        self._len = [x + 1 for x in self._len]
        self.steps += 1
        seqs = list(self.running)
        return self._emit([(s, [t]) for s, t in zip(seqs, self._sample(logits, seqs, self._gen))])

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a running sequence now (a stop string, a client gone) and free its row."""
        if not seq.done:
            seq.finish_reason = reason
        if seq in self.running:
            self._remove(self.running.index(seq))

    def _emit(self, gained: list[tuple[Sequence, list[int]]]) -> list[tuple[Sequence, int | None]]:
        """Each row's new tokens in order (one from a plain step, several from a speculative round), up to the one that
        finishes it: a stop token (given as None) or its max_tokens or context; finished rows leave."""
        out = []
        for s, tokens in gained:
            for token in tokens:
                if token in s.stop_ids:
                    s.finish_reason, token = "stop", None
                else:
                    s.tokens.append(token)
                    if len(s.tokens) >= s.max_tokens or len(s.prompt) + len(s.tokens) >= self.max_len:
                        s.finish_reason = "length"
                out.append((s, token))
                if s.done:
                    break
        for s, _ in gained:
            if s.done:
                self._remove(self.running.index(s))
        return out

    def _remove(self, i: int) -> None:
        """Free row i: the last running row moves into it (its cache slots copied), so rows stay 0..n-1."""
        last = len(self.running) - 1
        if i != last:
            self._copy_row(last, i, min(self._len[last] + 1, self.max_len))
            self.running[i], self._len[i], self._gen[i] = self.running[last], self._len[last], self._gen[last]
        self.running.pop()
        self._len.pop()
        self._gen.pop()

    def _copy_row(self, src: int, dst: int, length: int) -> None:
        self.cache.copy_row(src, dst, length)
        if self.draft is not None:
            self.draft_cache.copy_row(src, dst, length)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence], gens: list[torch.Generator]) -> list[int]:
        return self._draw(self._probs(logits, seqs), seqs, gens).tolist()

    @staticmethod
    def _probs(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Each row's distribution (n, ..., V) under its own settings (one-hot at temperature 0); rows that share
        settings are filtered together."""
        groups: dict[Sampling, list[int]] = {}
        for i, s in enumerate(seqs):
            groups.setdefault(s.sampling, []).append(i)
        out = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
        for sampling, rows in groups.items():
            out[rows] = filtered_probs(logits[rows], sampling.temperature, sampling.top_k, sampling.top_p)
        return out

    @staticmethod
    def _draw(probs: torch.Tensor, seqs: list[Sequence], gens: list[torch.Generator]) -> torch.Tensor:
        """One token per row (n, V) -> (n,): greedy rows by argmax, the others by the exponential race (argmax p / E,
        E ~ Exp(1)) drawn from the row's own generator."""
        out = probs.argmax(dim=-1)
        for i, s in enumerate(seqs):
            if s.sampling.temperature > 0:
                out[i] = _race(probs[i], gens[i])
        return out

    @torch.no_grad()
    def _speculate(self) -> list[tuple[Sequence, int | None]]:
        """One speculative round for every running row (see the module doc); the tokens each row gained."""
        seqs = list(self.running)
        L = torch.tensor([len(s.prompt) + len(s.tokens) for s in seqs], device=self.device)  # each row's context
        k = min(self.k, int((self.max_len - L).min()))  # no row writes past its context
        drafts, q = self._propose(seqs, L, k)  # (n, k), (n, k, V)
        last = torch.tensor([[s.tokens[-1]] for s in seqs], device=self.device)
        pos = (L - 1).unsqueeze(1) + torch.arange(k + 1, device=self.device)  # (n, k + 1)
        logits = self.model(torch.cat([last, drafts], 1), input_pos=pos, positions=pos, cache=self.cache.rows(0, len(seqs)),
                            attn_mask=self._visible(pos)).logits
        p = self._probs(logits, seqs)  # (n, k + 1, V)
        self.steps += 1
        gained = []
        for i, s in enumerate(seqs):
            j, new = _accept(drafts[i], q[i], p[i], self._gen[i], s.sampling.temperature == 0)
            self._len[i] = int(L[i]) + j  # the verified slots: the last token and the j accepted drafts
            self.drafted, self.accepted = self.drafted + k, self.accepted + j
            gained.append((s, drafts[i, :j].tolist() + [new]))
        return self._emit(gained)

    def _propose(self, seqs: list[Sequence], L: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """k draft tokens per row and the draft distributions they were drawn from. The draft first (re)writes its
        last two context tokens: after a round that accepted every draft it has not seen the last one."""
        n, cache = len(seqs), self.draft_cache.rows(0, len(seqs))
        ids = torch.tensor([(s.prompt + s.tokens)[-2:] for s in seqs], device=self.device)
        pos = (L - 2).unsqueeze(1) + torch.arange(2, device=self.device)
        drafts, qs = [], []
        for j in range(k):
            logits = self.draft(ids, input_pos=pos, positions=pos, cache=cache, attn_mask=self._visible(pos)).logits[:, -1]
            qs.append(self._probs(logits, seqs))
            drafts.append(self._draw(qs[-1], seqs, self._gen[:n]))
            ids, pos = drafts[-1].unsqueeze(1), (L + j).unsqueeze(1)
        return torch.stack(drafts, 1), torch.stack(qs, 1)

    def _visible(self, pos: torch.Tensor) -> torch.Tensor:
        """(n, 1, T, S): query t of row i sees the slots up to its own position pos[i, t]."""
        slots = torch.arange(self.max_len, device=self.device)
        return (slots.view(1, 1, -1) <= pos.unsqueeze(-1)).unsqueeze(1)


def _race(probs: torch.Tensor, gen: torch.Generator) -> int:
    """A draw from probs (V,) by the exponential race, argmax p / E with E ~ Exp(1) from gen."""
    return int((probs / torch.empty_like(probs).exponential_(1.0, generator=gen)).argmax())


def _accept(drafts: torch.Tensor, q: torch.Tensor, p: torch.Tensor, gen: torch.Generator, greedy: bool) -> tuple[int, int]:
    """(accepted count j, the token after them) for one row: drafts (k,), draft distributions q (k, V), target
    distributions p (k + 1, V). Greedy: the drafts that equal the target's argmax, then the target's own token."""
    k = drafts.numel()
    if greedy:
        best = p.argmax(dim=-1).tolist()
        j = next((i for i in range(k) if int(drafts[i]) != best[i]), k)
        return j, best[j]
    for i in range(k):
        d = int(drafts[i])
        if torch.rand((), generator=gen, device=p.device).item() < min(1.0, (p[i, d] / q[i, d]).item()):
            continue
        residual = (p[i] - q[i]).clamp(min=0)
        return i, _race(residual / residual.sum() if residual.sum() > 0 else p[i], gen)
    return k, _race(p[k], gen)


def generate_all(engine: Engine, seqs: list[Sequence]) -> list[Sequence]:
    """Run sequences to the end on the engine, admitting each as soon as a row is free (continuous batching
    without a server: tests and benchmarks)."""
    waiting = list(seqs)
    while waiting or engine.running:
        while waiting and engine.free:
            engine.add([waiting.pop(0)])
        engine.step()
    return seqs
