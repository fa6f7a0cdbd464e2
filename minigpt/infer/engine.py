"""The serving engine: running sequences batched continuously over a paged KV cache, prompts prefilled in chunks.

Each running sequence has a row: its place in the step's batch, and a table of the cache blocks that hold its keys
and values (nn/ragged.py's PagedKVCache; infer/blocks.py hands out the blocks). A row takes blocks as its tokens fill
them, so the cache holds as many sequences as their tokens fit, not as many whole contexts (Kwon et al. 2023, vLLM).
A new sequence takes a free row when the pool has blocks for its prompt; its prompt is prefilled over the following
steps, at most `prefill_chunk` prompt tokens a step, riding in the same forward pass as the running rows' decodes (a
flat batch, nn/ragged.py: the weights are read once for both, and a long newcomer delays the others by one chunk a
step, not by its whole prompt; Agrawal et al. 2024 "Sarathi-Serve"). The step that ends a prompt samples its first
token; from the next step on it decodes with the others: one forward pass per step over every running row, each row
writing its own slot at its own position and attending to its own slots only (iteration-level scheduling, Yu et al.
2022 "Orca"; vLLM and nanochat schedule the same way). A row that finishes (a stop token, its max_tokens, the end of
its context, or `finish` from outside) leaves at once and releases its blocks. The n samples of one prompt are
prefilled once and share the prompt's blocks. With prefix caching (infer/blocks.py) a prompt that starts with
blocks another prompt prefilled takes them into its table instead of computing them.

When a decoding row needs a block and the pool has none, the newest sequence is preempted: its blocks are released
and it waits, first in line, to be prefilled again from its prompt and the tokens it had (vLLM's recompute
preemption; its named blocks usually are still cached). Each sequence samples with its own settings and its own
generator (seeded per sequence, infer/sampler.py), so a request gets the same tokens whatever else runs beside it,
preempted or not.

With a draft model, `SpeculativeEngine` (below) holds rows of whole contexts instead and a step is a speculative round.

Not thread-safe: one thread (the server's decode thread) calls `add`, `step` and `finish`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from minigpt.core.errors import UserError
from minigpt.infer.blocks import BlockPool
from minigpt.infer.sampler import Sampling, accept, draw, row_probs
from minigpt.nn.model import GPT
from minigpt.nn.ragged import BLOCK, blocks_for, make_ragged

__all__ = ["Engine", "Sampling", "Sequence", "SpeculativeEngine", "generate_all"]

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

    @property
    def context(self) -> list[int]:
        return self.prompt + self.tokens


def _group_blocks(n: int, tokens: int) -> int:
    """Blocks n samples of one prompt of `tokens` tokens hold once prefilled: the prompt's, shared, and a copy of its
    last, partly filled one for each sample but the first."""
    return blocks_for(tokens) + n - 1


class Engine:
    def __init__(self, model: GPT, max_batch: int, max_len: int | None = None, prefill_chunk: int = PREFILL_CHUNK,
                 kv_tokens: int | None = None, prefix_cache: bool = True) -> None:
        """max_batch: rows (sequences running at once); kv_tokens: the cache's size in tokens (default max_batch whole
        contexts: no row is ever preempted)."""
        self.model = model.eval()
        self.max_batch = max_batch
        self.max_len = min(max_len or model.config.block_size, model.config.block_size)
        self.device = model.wte.weight.device
        self.running: list[Sequence] = []  # the rows, 0..n-1
        self._len: list[int] = []  # tokens held in each row's cache: its context less the last token
        self._gen: list[torch.Generator] = []  # each row's sampler
        self._table: list[list[int]] = []  # each row's cache blocks, in order
        self._filling: list[list[Sequence]] = []  # groups prefilling, in order; group[0]'s row is the one filled
        self._unlooked: set[int] = set()  # groups whose prompt the prefix cache has not been asked about yet
        self.preempted: list[tuple[list[Sequence], list[torch.Generator]]] = []  # waiting to start again, oldest first
        self._ticket: dict[int, int] = {}  # id(sequence) -> its admission order (preemption takes the newest)
        self._tickets = 0
        if prefill_chunk < 1:
            raise UserError(f"--prefill-chunk {prefill_chunk}: give at least 1 prompt token a step")
        self.prefill_chunk = prefill_chunk
        self.steps = self.prefills = self.preemptions = 0
        self._make_cache(kv_tokens, prefix_cache)

    def _make_cache(self, kv_tokens: int | None, prefix_cache: bool) -> None:
        n_blocks = blocks_for(kv_tokens or self.max_batch * self.max_len)
        if n_blocks * BLOCK < self.max_len:
            raise UserError(f"--kv-cache-tokens {kv_tokens} holds less than one context ({self.max_len} tokens): give "
                            f"at least {self.max_len}")
        self.cache = self.model.make_paged_cache(n_blocks)
        self.blocks = BlockPool(n_blocks, prefix_cache)
        self.prefix = self.blocks if prefix_cache else None  # its hit counts, for /metrics

    @property
    def free(self) -> int:
        return self.max_batch - len(self.running)

    @property
    def kv_tokens(self) -> int:
        return self.blocks.n_blocks * BLOCK

    def sequences(self) -> list[Sequence]:
        """Every sequence started and not finished: running, and preempted ones waiting to start again."""
        return self.running + [s for group, _ in self.preempted for s in group]

    def check(self, prompt: list[int]) -> None:
        if not 1 <= len(prompt) < self.max_len:
            raise UserError(f"a prompt of {len(prompt)} tokens: this engine takes 1 to {self.max_len - 1} "
                            f"(its context is {self.max_len})")

    def holds(self, n: int, tokens: int) -> bool:
        """Whether n samples of one prompt of `tokens` tokens could ever start: rows, and blocks when nothing else runs."""
        return n <= self.max_batch and _group_blocks(n, tokens) <= self.blocks.n_blocks

    def fits(self, n: int, tokens: int) -> bool:
        """Whether n samples of one prompt of `tokens` tokens can start now: none preempted waits, n rows are free,
        and the pool has blocks for the prompt (and one each for the other samples' last one) beside what the
        prompts prefilling now still need. Decodes grow into the rest."""
        return not self.preempted and self._could_start(n, tokens)

    def _could_start(self, n: int, tokens: int) -> bool:
        owed = sum(_group_blocks(len(g), len(g[0].context)) - len(self._table[self.running.index(g[0])])
                   for g in self._filling)
        return n <= self.free and self.blocks.available - owed >= _group_blocks(n, tokens)

    @torch.no_grad()
    def add(self, seqs: list[Sequence]) -> list[tuple[Sequence, int | None]]:
        """Start sequences that share one prompt (the n samples of a request): each takes a row now; the prompt is
        prefilled once, into the first one's row, over the next steps, then shared with the others. Returns the
        tokens emitted (none here), as `step` does."""
        gens = self._generators(seqs)
        for s in seqs:
            self._ticket[id(s)], self._tickets = self._tickets, self._tickets + 1
        self._start(list(seqs), gens)
        self.prefills += 1
        return []

    def _generators(self, seqs: list[Sequence]) -> list[torch.Generator]:
        """A group's samplers, once it is checked (one prompt the context holds, rows for all): sample i uses the
        group's seed + i, so alone with that seed it would draw the same."""
        prompt = seqs[0].prompt
        if any(s.prompt != prompt for s in seqs) or len(seqs) > self.free:
            raise ValueError(f"add takes 1 to {self.free} sequences of one prompt")
        self.check(prompt)
        seed = seqs[0].seed if seqs[0].seed is not None else random.getrandbits(62)
        return [torch.Generator(device=self.device).manual_seed(seed + i) for i in range(len(seqs))]

    def _start(self, group: list[Sequence], gens: list[torch.Generator]) -> None:
        for s, g in zip(group, gens):
            self.running.append(s)
            self._len.append(0)
            self._gen.append(g)
            self._table.append([])
        self._filling.append(group)
        self._unlooked.add(id(group[0]))  # the prefix cache is asked when its first chunk comes

    @torch.no_grad()
    def step(self) -> list[tuple[Sequence, int | None]]:
        """One step for every running row: each decoding row writes its last token at its own next slot and samples
        the next; up to prefill_chunk prompt tokens of the prefilling rows ride along, and a row whose prompt ends
        samples its first token. Returns (sequence, token) for each, token None when it was a stop token; finished
        sequences (finish_reason set) have left their rows."""
        self._resume()
        self._grow_decodes()
        planned = self._plan_chunks()  # (group, first slot, tokens) each; rows are read after every preemption
        filling = self._filling_ids()
        decodes = [(i, self._len[i]) for i, s in enumerate(self.running) if id(s) not in filling]
        chunks = [(self.running.index(g[0]), start, n) for g, start, n in planned]
        ending = [(g, j) for j, (g, start, n) in enumerate(planned) if start + n == len(g[0].context)]
        if not decodes and not chunks:
            return []
        ends = [len(decodes) + sum(n for _, _, n in chunks[:j + 1]) - 1 for _, j in ending]
        logits = self._forward(decodes, chunks, list(range(len(decodes))) + ends)
        for i, _ in decodes:
            self._len[i] += 1
        for row, start, n in chunks:
            self._len[row] = start + n
            self.blocks.name(self.running[row].context[:start + n], self._table[row])  # its full blocks, shareable
        self.steps += 1
        seqs = [self.running[i] for i, _ in decodes]
        gens, settings = [self._gen[i] for i, _ in decodes], [s.sampling for s in seqs]
        tokens = draw(row_probs(logits[:len(decodes)], settings), settings, gens)
        gained = [(s, [t]) for s, t in zip(seqs, tokens.tolist())]
        for j, (group, _) in enumerate(ending):
            self._filling.remove(group)
            gained += self._prefilled(group, logits[len(decodes) + j])
        return self._emit(gained)

    def _grow_decodes(self) -> None:
        """Each decoding row gets the block its next slot needs, oldest sequence first; when the pool has none, the
        newest sequences are preempted, the one asking last of all."""
        filling = self._filling_ids()
        for s in sorted((s for s in self.running if id(s) not in filling), key=self._order):
            if s in self.running and not self._room(s, self._len[self.running.index(s)] + 1):
                self._preempt(s)

    def _filling_ids(self) -> set[int]:
        """The sequences whose prompt is still being prefilled (the first of each group, and the samples waiting on it)."""
        return {id(s) for g in self._filling for s in g}

    def _plan_chunks(self) -> list[tuple[list[Sequence], int, int]]:
        """This step's prompt chunks, oldest prompt first, within prefill_chunk tokens and the blocks the pool can
        give (a prompt may preempt newer sequences for them)."""
        planned, budget = [], self.prefill_chunk
        for group in sorted(self._filling, key=lambda g: self._order(g[0])):  # a prompt preempts only newer ones
            if budget == 0:
                break
            if group not in self._filling:  # preempted for an older prompt's blocks
                continue
            seq = group[0]
            self._look_up(seq, self.running.index(seq))
            start = self._len[self.running.index(seq)]
            n = min(budget, len(seq.context) - start)
            self._room(seq, start + n)
            n = min(n, len(self._table[self.running.index(seq)]) * BLOCK - start)
            if n <= 0:
                break
            planned.append((group, start, n))
            budget -= n
        return planned

    def _order(self, seq: Sequence) -> int:
        return self._ticket[id(seq)]

    def _room(self, seq: Sequence, slots: int) -> bool:
        """Give seq's row blocks for `slots` slots, preempting newer sequences while the pool is short; False when
        it still cannot (nothing newer left)."""
        table = self._table[self.running.index(seq)]
        while len(table) * BLOCK < slots:
            b = self.blocks.take()
            if b is None:
                newest = max(self.running, key=self._order)
                if self._order(newest) <= self._order(seq):
                    return False
                self._preempt(newest)
                continue
            table.append(b)
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Take seq off the rows, with its group while its prompt is still being prefilled: its blocks released, it
        waits first in line (in admission order) to be prefilled again from its context."""
        group = next((g for g in self._filling if seq in g), [seq])
        if group in self._filling:
            self._filling.remove(group)
        gens = []
        for s in group:
            i = self.running.index(s)
            gens.append(self._gen[i])
            self._unlooked.discard(id(s))
            self._remove(i)
        self.preempted.append((group, gens))
        self.preempted.sort(key=lambda entry: self._order(entry[0][0]))
        self.preemptions += 1

    def _resume(self) -> None:
        """Preempted sequences start again, oldest first, while rows and blocks allow."""
        while self.preempted and self._could_start(len(self.preempted[0][0]), len(self.preempted[0][0][0].context)):
            self._start(*self.preempted.pop(0))

    def _look_up(self, seq: Sequence, row: int) -> None:
        """Before a prompt's first chunk (not at admission: a prompt admitted with others that share its prefix finds
        the blocks the first of them has prefilled by then), share the longest cached prefix's blocks."""
        if id(seq) not in self._unlooked:
            return
        self._unlooked.discard(id(seq))
        blocks, hit = self.blocks.lookup(seq.context)
        for b in blocks:
            self.blocks.share(b)
        self._table[row].extend(blocks)
        self._len[row] = hit

    def _forward(self, decodes, chunks, wanted) -> torch.Tensor:
        """One flat forward pass (nn/ragged.py): the decoding rows' last tokens, then the prompt chunks; the logits
        (len(wanted), V) of the wanted tokens."""
        ids = [self.running[i].tokens[-1] for i, _ in decodes]
        for row, start, n in chunks:
            ids += self.running[row].context[start:start + n]
        batch = make_ragged([(self._table[i], slot) for i, slot in decodes],
                            [(self._table[row], start, n) for row, start, n in chunks], wanted, self.device)
        x = torch.tensor([ids], device=self.device)
        return self.model(x, input_pos=batch, positions=batch.positions.unsqueeze(0), cache=self.cache).logits[0]

    def _prefilled(self, group: list[Sequence], logits: torch.Tensor) -> list[tuple[Sequence, list[int]]]:
        """A prompt's prefill has ended in its first row: the group's other rows share its full blocks (and copy its
        last, partly filled one), and each draws its first token from the prompt's last logits."""
        row, T = self.running.index(group[0]), len(group[0].context)
        kept = [group[0]]
        for s in group[1:]:
            if self._share_prompt(row, self.running.index(s), T):
                kept.append(s)
            else:  # no block for its last one: it starts again later (its prompt's full blocks are cached)
                self._preempt(s)
        rows = [self.running.index(s) for s in kept]
        settings = [s.sampling for s in kept]
        tokens = draw(row_probs(logits.expand(len(kept), -1), settings), settings, [self._gen[r] for r in rows])
        return [(s, [t]) for s, t in zip(kept, tokens.tolist())]

    def _share_prompt(self, src: int, dst: int, T: int) -> bool:
        table = self._table[src]
        if T % BLOCK:
            b = self.blocks.take()
            if b is None:
                return False
            self.cache.copy_block(table[T // BLOCK], b)
        for shared in table[:T // BLOCK]:
            self.blocks.share(shared)
        self._table[dst][:] = table[:T // BLOCK] + ([b] if T % BLOCK else [])
        self._len[dst] = T
        return True

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence now (a stop string, a client gone) and free its row. A group still prefilling goes on for
        its other samples (the first one's blocks pass to the next)."""
        if not seq.done:
            seq.finish_reason = reason
        for group, gens in self.preempted:
            if seq in group:
                del gens[group.index(seq)]
                group.remove(seq)
        self.preempted = [entry for entry in self.preempted if entry[0]]
        if seq not in self.running:
            self._ticket.pop(id(seq), None)
            return
        for group in [g for g in self._filling if seq in g]:
            if group[0] is seq and len(group) > 1:
                old, new = self.running.index(seq), self.running.index(group[1])
                self._table[new], self._table[old] = self._table[old], []
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
        """Free row i (its blocks released): the last running row moves into it, so rows stay 0..n-1."""
        self.blocks.release(self._table[i])
        self._move_last_to(i)

    def _move_last_to(self, i: int) -> None:
        if self.running[i].done:
            self._ticket.pop(id(self.running[i]), None)
        last = len(self.running) - 1
        if i != last:
            self.running[i], self._len[i], self._gen[i] = self.running[last], self._len[last], self._gen[last]
            self._table[i] = self._table[last]
        for rows in (self.running, self._len, self._gen, self._table):
            rows.pop()


class SpeculativeEngine(Engine):
    """The engine with a draft model (speculative decoding, Leviathan et al. 2023; Chen et al. 2023): rows of whole
    contexts (a cache row each, in the target's and the draft's caches); a prompt is prefilled whole when it is
    added (into both caches), and a step is a round for every running row at once: the draft, on its own cache of
    the same rows, proposes k tokens per row from each row's own distribution q; the target scores all k + 1
    positions of every row in one forward pass; each row keeps the drafts the acceptance rule keeps
    (sampler.accept): every token is distributed as the target's own sampling, and at temperature 0 it is the
    target's greedy token. Rows accept different counts and go on at their own positions; rejected slots need no
    undo (a row never attends past its length, and the next round writes over them). No prefix cache (the draft's
    cache would need the prefix too) and no preemption: a row holds a whole context."""

    def __init__(self, model: GPT, max_batch: int, draft: GPT, k: int = 4, max_len: int | None = None) -> None:
        if k < 1 or draft.config.vocab_size != model.config.vocab_size:
            raise UserError(f"speculative decoding needs k >= 1 (got {k}) and a draft with the target's vocab_size")
        self.draft, self.k = draft.eval(), k
        super().__init__(model, max_batch, min(max_len or draft.config.block_size, draft.config.block_size))
        self.drafted = self.accepted = 0  # draft tokens proposed and accepted, over every row

    def _make_cache(self, kv_tokens: int | None, prefix_cache: bool) -> None:
        self.cache = self.model.make_cache(self.max_batch, self.max_len)
        self.draft_cache = self.draft.make_cache(self.max_batch, self.max_len)
        self.blocks = self.prefix = None

    @property
    def kv_tokens(self) -> int:
        return self.max_batch * self.max_len

    def holds(self, n: int, tokens: int) -> bool:
        return n <= self.max_batch

    def fits(self, n: int, tokens: int) -> bool:
        return n <= self.free

    @torch.no_grad()
    def add(self, seqs: list[Sequence]) -> list[tuple[Sequence, int | None]]:
        """Start the n samples of one prompt: prefilled whole now into the first one's row of both caches, copied to
        the others' rows; returns their first tokens."""
        gens = self._generators(seqs)
        row, prompt = len(self.running), seqs[0].prompt
        T = len(prompt)
        for s, g in zip(seqs, gens):
            self.running.append(s)
            self._len.append(T)
            self._table.append([])  # unused: the rows are the caches' own
            self._gen.append(g)
        ids, pos = torch.tensor([prompt], device=self.device), torch.arange(T, device=self.device)
        logits = self.model(ids, input_pos=pos, cache=self.cache.rows(row, row + 1), last_only=True).logits[0, -1]
        self.draft(ids, input_pos=pos, cache=self.draft_cache.rows(row, row + 1), last_only=True)
        for r in range(row + 1, row + len(seqs)):
            self._copy_row(row, r, T)
        self.prefills += 1
        settings = [s.sampling for s in seqs]
        tokens = draw(row_probs(logits.expand(len(seqs), -1), settings), settings, self._gen[row:])
        return self._emit([(s, [t]) for s, t in zip(seqs, tokens.tolist())])

    @torch.no_grad()
    def step(self) -> list[tuple[Sequence, int | None]]:
        return self._speculate() if self.running else []

    def finish(self, seq: Sequence, reason: str) -> None:
        if not seq.done:
            seq.finish_reason = reason
        if seq in self.running:
            self._remove(self.running.index(seq))

    def _remove(self, i: int) -> None:
        """Free row i: the last running row moves into it (its cache slots copied), so rows stay 0..n-1."""
        last = len(self.running) - 1
        if i != last:
            self._copy_row(last, i, min(self._len[last] + 1, self.max_len))
        self._move_last_to(i)

    def _copy_row(self, src: int, dst: int, length: int) -> None:
        self.cache.copy_row(src, dst, length)
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
    """Run sequences to the end on the engine, admitting each as soon as it fits (continuous batching without a
    server: tests and benchmarks)."""
    waiting = list(seqs)
    while waiting or engine.running or engine.preempted:
        while waiting and engine.fits(1, len(waiting[0].prompt)):
            engine.add([waiting.pop(0)])
        engine.step()
    return seqs
