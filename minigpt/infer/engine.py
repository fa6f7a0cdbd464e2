"""The serving engine: the rows of one static KV cache, batched continuously, prompts prefilled in chunks.

Each running sequence owns one row of a preallocated cache (max_batch rows x max_len slots). A new sequence takes a
free row at once; its prompt is prefilled over the following steps, at most `prefill_chunk` prompt tokens a step,
riding in the same forward pass as the running rows' decodes (a flat batch, nn/ragged.py: the weights are read once
for both, and a long newcomer delays the others by one chunk a step, not by its whole prompt; Agrawal et al. 2024
"Sarathi-Serve"). The step that ends a prompt samples its first token; from the next step on it decodes with the
others: one forward pass per step over every running row, each row writing its own slot at its own position and
attending to its own slots only (iteration-level scheduling, Yu et al. 2022 "Orca"; vLLM and nanochat schedule the
same way). A row that finishes (a stop token, its max_tokens, the end of its context, or `finish` from outside)
leaves at once: the last running row moves into its place, so the running rows are always 0..n-1. The n samples
of one prompt are prefilled once and the row copied. With a prefix cache (infer/prefix.py) a prompt that starts
with blocks another prompt prefilled copies their slots instead of computing them.

A row holds a whole context, so the cache never runs out mid-sequence: admission waits for a free row (no
preemption is needed). Each sequence samples with its own settings and its own generator (seeded per sequence,
infer/sampler.py), so a request gets the same tokens whatever else runs beside it.

With a draft model (speculative decoding, Leviathan et al. 2023; Chen et al. 2023) a prompt is prefilled whole when
it is added (into both caches), and a step is a round for every running row at once: the draft, on its own cache of
the same rows, proposes k tokens per row from each row's own distribution q; the target scores all k + 1 positions
of every row in one forward pass; each row keeps the drafts the acceptance rule keeps (sampler.accept): every token
is distributed as the target's own sampling, and at temperature 0 it is the target's greedy token. Rows accept
different counts and go on at their own positions; rejected slots need no undo (a row never attends past its length,
and the next round writes over them).

Not thread-safe: one thread (the server's decode thread) calls `add`, `step` and `finish`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from minigpt.core.errors import UserError
from minigpt.infer.prefix import PrefixCache
from minigpt.infer.sampler import Sampling, accept, draw, row_probs
from minigpt.nn.model import GPT
from minigpt.nn.ragged import make_ragged

__all__ = ["Engine", "Sampling", "Sequence", "generate_all"]

PREFILL_CHUNK = 256  # prompt tokens that ride with each step's decodes, at most


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
                 k: int = 4, prefill_chunk: int = PREFILL_CHUNK, prefix_rows: int = 0) -> None:
        self.model = model.eval()
        self.max_batch = max_batch
        blocks = [model.config.block_size] + ([draft.config.block_size] if draft is not None else [])
        self.max_len = min([max_len or min(blocks), *blocks])
        self.cache = model.make_cache(max_batch, self.max_len)
        self.device = model.wte.weight.device
        self.running: list[Sequence] = []  # row i of the cache is running[i]
        self._len: list[int] = []  # tokens held in each row's cache: its context less the last token
        self._gen: list[torch.Generator] = []  # each row's sampler
        self._filling: list[list[Sequence]] = []  # groups prefilling, in order; group[0]'s row is the one filled
        if prefill_chunk < 1:
            raise UserError(f"--prefill-chunk {prefill_chunk}: give at least 1 prompt token a step")
        self.prefill_chunk = prefill_chunk
        self.steps = self.prefills = 0
        self.draft, self.k = (draft.eval() if draft is not None else None), k
        if draft is not None:
            if k < 1 or draft.config.vocab_size != model.config.vocab_size:
                raise UserError(f"speculative decoding needs k >= 1 (got {k}) and a draft with the target's vocab_size")
            self.draft_cache = draft.make_cache(max_batch, self.max_len)
        self.drafted = self.accepted = 0  # speculative: draft tokens proposed and accepted, over every row
        # a speculative row's draft cache would need the prefix too: the prefix cache serves plain decoding only
        self.prefix = PrefixCache(model, prefix_rows, self.max_len) if prefix_rows and draft is None else None
        self._unlooked: set[int] = set()  # groups whose prompt the prefix cache has not been asked about yet

    @property
    def free(self) -> int:
        return self.max_batch - len(self.running)

    def check(self, prompt: list[int]) -> None:
        if not 1 <= len(prompt) < self.max_len:
            raise UserError(f"a prompt of {len(prompt)} tokens: this engine takes 1 to {self.max_len - 1} "
                            f"(its context is {self.max_len})")

    @torch.no_grad()
    def add(self, seqs: list[Sequence]) -> list[tuple[Sequence, int | None]]:
        """Start sequences that share one prompt (the n samples of a request): each takes a row now; the prompt is
        prefilled once, into the first one's row, over the next steps (at once with a draft), then copied to the
        others. Returns the tokens emitted (none but with a draft: the first tokens), as `step` does."""
        prompt = seqs[0].prompt
        if any(s.prompt != prompt for s in seqs) or len(seqs) > self.free:
            raise ValueError(f"add takes 1 to {self.free} sequences of one prompt")
        self.check(prompt)
        row = len(self.running)
        seed = seqs[0].seed if seqs[0].seed is not None else random.getrandbits(62)
        for i, s in enumerate(seqs):  # sample i uses seed + i: alone with that seed it would draw the same
            self.running.append(s)
            self._len.append(0)
            self._gen.append(torch.Generator(device=self.device).manual_seed(seed + i))
        self._filling.append(list(seqs))
        if self.prefix is not None:
            self._unlooked.add(id(seqs[0]))  # the prefix cache is asked when its first chunk comes
        self.prefills += 1
        if self.draft is None:
            return []
        logits = self._forward([], [(row, 0, len(prompt))], [len(prompt) - 1])
        self._forward([], [(row, 0, len(prompt))], [len(prompt) - 1], self.draft, self.draft_cache)
        self._len[row] = len(prompt)
        return self._emit(self._prefilled(self._filling.pop(0), logits[0]))

    @torch.no_grad()
    def step(self) -> list[tuple[Sequence, int | None]]:
        """One step for every running row: each decoding row writes its last token at its own next slot and samples
        the next; up to prefill_chunk prompt tokens of the prefilling rows ride along, and a row whose prompt ends
        samples its first token. Returns (sequence, token) for each, token None when it was a stop token; finished
        sequences (finish_reason set) have left their rows."""
        if not self.running:
            return []
        if self.draft is not None:
            return self._speculate()
        decodes = [(i, self._len[i]) for i, s in enumerate(self.running) if s.tokens]
        chunks, ending, ends, budget, at = [], [], [], self.prefill_chunk, len(decodes)  # at: tokens laid so far
        for group in self._filling:
            if budget == 0:
                break
            row = self.running.index(group[0])
            self._look_up(group[0], row)
            start = self._len[row]
            n = min(budget, len(group[0].prompt) - start)
            chunks.append((row, start, n))
            budget, at = budget - n, at + n
            if start + n == len(group[0].prompt):  # the prompt's last token: its logits give the first new one
                ending.append(group)
                ends.append(at - 1)
        logits = self._forward(decodes, chunks, list(range(len(decodes))) + ends)
        for i, _ in decodes:
            self._len[i] += 1
        for row, start, n in chunks:
            self._len[row] = start + n
            if self.prefix is not None and start + n < len(self.running[row].prompt):  # a long prompt's blocks so far:
                self.prefix.store(self.running[row].prompt[:start + n], self.cache, row)  # a newcomer may share them
        self.steps += 1
        seqs = [self.running[i] for i, _ in decodes]
        gens, settings = [self._gen[i] for i, _ in decodes], [s.sampling for s in seqs]
        tokens = draw(row_probs(logits[:len(decodes)], settings), settings, gens)
        gained = [(s, [t]) for s, t in zip(seqs, tokens.tolist())]
        for j, group in enumerate(ending):
            self._filling.remove(group)
            gained += self._prefilled(group, logits[len(decodes) + j])
        return self._emit(gained)

    def _look_up(self, seq: Sequence, row: int) -> None:
        """Before a prompt's first chunk (not at admission: a prompt admitted with others that share its prefix finds
        the blocks the first of them has prefilled by then), copy the longest cached prefix into its row."""
        if id(seq) not in self._unlooked:
            return
        self._unlooked.discard(id(seq))
        if self.prefix is not None:
            src, hit = self.prefix.lookup(seq.prompt)
            if hit:
                self.prefix.load(src, hit, self.cache, row)
                self._len[row] = hit

    def _forward(self, decodes, chunks, wanted, model=None, cache=None) -> torch.Tensor:
        """One flat forward pass (nn/ragged.py): the decoding rows' last tokens, then the prompt chunks; the logits
        (len(wanted), V) of the wanted tokens."""
        ids = [self.running[i].tokens[-1] for i, _ in decodes]
        for row, start, n in chunks:
            ids += self.running[row].prompt[start:start + n]
        batch = make_ragged(decodes, chunks, wanted, self.device)
        x = torch.tensor([ids], device=self.device)
        return (model or self.model)(x, input_pos=batch, positions=batch.slots.unsqueeze(0),
                                     cache=cache or self.cache).logits[0]

    def _prefilled(self, group: list[Sequence], logits: torch.Tensor) -> list[tuple[Sequence, list[int]]]:
        """A prompt's prefill has ended in its first row: keep its blocks (prefix cache), copy the row to the
        group's other rows, and draw each one's first token from the prompt's last logits."""
        row, T = self.running.index(group[0]), len(group[0].prompt)
        if self.prefix is not None:
            self.prefix.store(group[0].prompt, self.cache, row)
        rows = [row] + [self.running.index(s) for s in group[1:]]
        for r in rows[1:]:
            self._copy_row(row, r, T)
            self._len[r] = T
        settings = [s.sampling for s in group]
        tokens = draw(row_probs(logits.expand(len(group), -1), settings), settings, [self._gen[r] for r in rows])
        return [(s, [t]) for s, t in zip(group, tokens.tolist())]

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a running sequence now (a stop string, a client gone) and free its row. A group still prefilling goes
        on for its other samples (the first one's slots are copied to the next)."""
        if not seq.done:
            seq.finish_reason = reason
        if seq not in self.running:
            return
        for group in [g for g in self._filling if seq in g]:
            if group[0] is seq and len(group) > 1:
                old, new = self.running.index(seq), self.running.index(group[1])
                self._copy_row(old, new, self._len[old])
                self._len[new] = self._len[old]
                if id(seq) in self._unlooked:
                    self._unlooked.add(id(group[1]))
            group.remove(seq)
            if not group:
                self._filling.remove(group)
        self._unlooked.discard(id(seq))
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

    @torch.no_grad()
    def _speculate(self) -> list[tuple[Sequence, int | None]]:
        """One speculative round for every running row (see the module doc); the tokens each row gained."""
        seqs = list(self.running)
        L = torch.tensor([len(s.prompt) + len(s.tokens) for s in seqs], device=self.device)  # each row's context
        k = min(self.k, int((self.max_len - L).min()))  # no row writes past its context
        S = min(self.max_len, int(L.max()) + k)  # the slots this round reads and writes, at most
        settings = [s.sampling for s in seqs]
        drafts, q = self._propose(seqs, L, k, S)  # (n, k), (n, k, V)
        last = torch.tensor([[s.tokens[-1]] for s in seqs], device=self.device)
        pos = (L - 1).unsqueeze(1) + torch.arange(k + 1, device=self.device)  # (n, k + 1)
        logits = self.model(torch.cat([last, drafts], 1), input_pos=pos, positions=pos,
                            cache=self.cache.rows(0, len(seqs)).slots(S), attn_mask=self._visible(pos, S)).logits
        p = row_probs(logits, settings)  # (n, k + 1, V)
        self.steps += 1
        gained = []
        for i, s in enumerate(seqs):
            j, new = accept(drafts[i], q[i], p[i], self._gen[i], s.sampling.temperature == 0)
            self._len[i] = int(L[i]) + j  # the verified slots: the last token and the j accepted drafts
            self.drafted, self.accepted = self.drafted + k, self.accepted + j
            gained.append((s, drafts[i, :j].tolist() + [new]))
        return self._emit(gained)

    def _propose(self, seqs: list[Sequence], L: torch.Tensor, k: int, S: int) -> tuple[torch.Tensor, torch.Tensor]:
        """k draft tokens per row and the draft distributions they were drawn from. The draft first (re)writes its
        last two context tokens: after a round that accepted every draft it has not seen the last one."""
        n, cache, settings = len(seqs), self.draft_cache.rows(0, len(seqs)).slots(S), [s.sampling for s in seqs]
        ids = torch.tensor([(s.prompt + s.tokens)[-2:] for s in seqs], device=self.device)
        pos = (L - 2).unsqueeze(1) + torch.arange(2, device=self.device)
        drafts, qs = [], []
        for j in range(k):
            logits = self.draft(ids, input_pos=pos, positions=pos, cache=cache, attn_mask=self._visible(pos, S)).logits[:, -1]
            qs.append(row_probs(logits, settings))
            drafts.append(draw(qs[-1], settings, self._gen[:n]))
            ids, pos = drafts[-1].unsqueeze(1), (L + j).unsqueeze(1)
        return torch.stack(drafts, 1), torch.stack(qs, 1)

    def _visible(self, pos: torch.Tensor, S: int) -> torch.Tensor:
        """(n, 1, T, S): query t of row i sees the slots up to its own position pos[i, t]."""
        slots = torch.arange(S, device=self.device)
        return (slots.view(1, 1, -1) <= pos.unsqueeze(-1)).unsqueeze(1)


def generate_all(engine: Engine, seqs: list[Sequence]) -> list[Sequence]:
    """Run sequences to the end on the engine, admitting each as soon as a row is free (continuous batching
    without a server: tests and benchmarks)."""
    waiting = list(seqs)
    while waiting or engine.running:
        while waiting and engine.free:
            engine.add([waiting.pop(0)])
        engine.step()
    return seqs
