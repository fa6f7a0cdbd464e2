"""Speculative decoding: a small draft model proposes K tokens, the target verifies them in one pass.

Leviathan et al. 2023 / Chen et al. 2023: draft token d_i, drawn from the draft's distribution
q_i, is accepted with probability min(1, p_i(d_i) / q_i(d_i)) under the target's p_i; at the first
rejection a token is drawn from norm(max(0, p_i - q_i)) instead, and when all K are accepted one
more is drawn from p_{K+1}. Every emitted token is then distributed exactly as the target's own
sampling (with the same temperature, top-k and top-p applied to both models' distributions);
with temperature 0 both distributions are one-hot, so the output is the target's greedy output,
token for token. Each round costs K draft steps and one target forward over K + 1 positions.

Both models keep a static KV cache (minigpt.model.KVCache). Rejected positions need no undo: the
next round writes over their slots, and a query attends only to slots up to its own position.
One sequence at a time (batch 1).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from minigpt.core.errors import UserError
from minigpt.infer.generate import filtered_probs
from minigpt.nn.model import GPT, KVCache


@dataclass
class SpeculativeGeneration:
    new_tokens: list[int]
    rounds: int  # target forwards after prefill (one per round)
    drafted: int
    accepted: int
    seconds: float

    def stats(self) -> dict:
        n = len(self.new_tokens)
        return {
            "new_tokens": n,
            "target_forwards": self.rounds,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "acceptance_rate": round(self.accepted / self.drafted, 4) if self.drafted else None,
            "tokens_per_target_forward": round(n / self.rounds, 3) if self.rounds else None,
            "tokens_per_s": round(n / self.seconds, 1) if self.seconds > 0 else None,
        }


def check_pair(target: GPT, draft: GPT, target_vocab: dict, draft_vocab: dict) -> None:
    """The two models must read and write the same tokens: one line naming the difference."""
    if target.config.vocab_size != draft.config.vocab_size:
        raise UserError(f"the draft's vocab_size {draft.config.vocab_size:,} differs from the target's "
                        f"{target.config.vocab_size:,}: train the draft with the target's tokenizer")
    if target_vocab != draft_vocab:
        differ = sorted(set(target_vocab.items()) ^ set(draft_vocab.items()), key=str)[:2]
        raise UserError(f"the draft's tokenizer differs from the target's (e.g. {differ}): train the draft with the "
                        f"target's tokenizer (data.tokenizer = the target run's tokenizer.json)")


class _Model:
    """A model with its cache and how many leading tokens of the sequence the cache holds."""

    def __init__(self, model: GPT, length: int) -> None:
        self.model, self.fed = model, 0
        self.cache: KVCache = model.make_cache(1, length)
        self.device = model.wte.weight.device

    def feed(self, tokens: list[int], upto: int) -> torch.Tensor:
        """Feed tokens[self.fed:upto] (writing their cache slots); logits (n, V) for each of them."""
        if upto <= self.fed:
            return torch.empty(0, self.model.config.vocab_size, device=self.device)
        ids = torch.tensor([tokens[self.fed:upto]], device=self.device)
        pos = torch.arange(self.fed, upto, device=self.device)
        logits = self.model(ids, input_pos=pos, cache=self.cache).logits[0]
        self.fed = upto
        return logits.float()


@torch.no_grad()
def speculative_generate(target: GPT, draft: GPT, prompt: list[int], max_new_tokens: int, k: int = 4,
                         temperature: float = 0.8, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                         eot_id: int | None = None) -> SpeculativeGeneration:
    if k < 1:
        raise UserError(f"--speculate {k} must be at least 1 (draft tokens per round)")
    block = min(target.config.block_size, draft.config.block_size)
    if not prompt or len(prompt) >= block:
        raise UserError(f"the prompt must be 1 to {block - 1} tokens (block_size {block}); it has {len(prompt)}")
    total = min(len(prompt) + max_new_tokens, block)
    t, d = _Model(target.eval(), total), _Model(draft.eval(), total)
    gen = torch.Generator(device=t.device).manual_seed(seed)
    probs = lambda logits: filtered_probs(logits, temperature, top_k, top_p)  # noqa: E731
    tokens, rounds, drafted, accepted = list(prompt), 0, 0, 0
    start = time.perf_counter()
    t.feed(tokens, len(tokens) - 1)
    d.feed(tokens, len(tokens) - 1)
    while len(tokens) < total:
        n = len(tokens)
        kk = min(k, total - n - 1)  # room for the drafts and the token the round always adds
        drafts, q = _draft(d, tokens, kk, probs if temperature else None, gen)
        logits = t.feed(tokens + drafts, n + kk)[-(kk + 1):]  # (kk + 1, V): the target's p_1 .. p_{kk+1}
        j, new = _verify(drafts, q, probs(logits), gen) if temperature else _verify_greedy(drafts, logits)
        tokens += drafts[:j] + [new]
        rounds, drafted, accepted = rounds + 1, drafted + kk, accepted + j
        t.fed, d.fed = n + j, min(d.fed, n + j)  # caches valid up to the accepted tokens
        if eot_id is not None and eot_id in tokens[n:]:
            break
    out = tokens[len(prompt):total]
    if eot_id is not None and eot_id in out:
        out = out[: out.index(eot_id)]
    return SpeculativeGeneration(out, rounds, drafted, accepted, time.perf_counter() - start)


def _draft(d: _Model, tokens: list[int], kk: int, probs, gen) -> tuple[list[int], list[torch.Tensor]]:
    """kk draft tokens and the draft distributions they were drawn from (greedy, probs None: the
    argmax, no distributions)."""
    drafts, q = [], []
    for _ in range(kk):
        seq = tokens + drafts
        logits = d.feed(seq, len(seq))[-1]
        if probs is None:
            drafts.append(int(logits.argmax()))
            continue
        dist = probs(logits[None])[0]
        drafts.append(int(torch.multinomial(dist, 1, generator=gen)))
        q.append(dist)
    return drafts, q


def _verify_greedy(drafts: list[int], logits: torch.Tensor) -> tuple[int, int]:
    """Greedy: the drafts agreeing with the target's argmax are kept, then the target's own token
    (the rejection rule with one-hot p and q, without the arithmetic)."""
    best = logits.argmax(dim=-1).tolist()
    j = next((i for i, (a, b) in enumerate(zip(drafts, best)) if a != b), len(drafts))
    return j, best[j]


def _verify(drafts: list[int], q: list[torch.Tensor], p: torch.Tensor, gen) -> tuple[int, int]:
    """(accepted count j, the token that follows them): the rejection rule, then the residual or
    the target's next-token distribution."""
    for i, token in enumerate(drafts):
        ratio = (p[i, token] / q[i][token]).item()
        if torch.rand((), generator=gen, device=p.device).item() < min(1.0, ratio):
            continue
        residual = (p[i] - q[i]).clamp(min=0)
        if residual.sum() <= 0:  # p == q: any draw from p is right
            residual = p[i]
        return i, int(torch.multinomial(residual / residual.sum(), 1, generator=gen))
    return len(drafts), int(torch.multinomial(p[len(drafts)], 1, generator=gen))


def bench_speculative(target: GPT, draft: GPT, prompts: list[list[int]], new_tokens: int, ks: list[int],
                      temperature: float, repeats: int = 3) -> list[dict]:
    """Plain target decoding and speculative decoding at each K, interleaved prompt by prompt and
    repeat by repeat in one process (same settings and seeds): tokens/s of each, the speed-up,
    acceptance rate and tokens per target forward. Median over the repeats of each pass's time."""
    from statistics import median

    from minigpt.infer.generate import generate_ids

    modes = [0, *ks]  # 0: the target alone
    seconds = {m: [] for m in modes}
    counts = {m: {"tokens": 0, "drafted": 0, "accepted": 0, "rounds": 0} for m in modes}
    for rep in range(repeats + 1):  # the first pass warms up and is not counted
        passed = dict.fromkeys(modes, 0.0)
        for i, p in enumerate(prompts):
            g = generate_ids(target, [p], new_tokens, temperature=temperature, seed=i)
            passed[0] += g.prefill_s + g.decode_s
            found = {0: (len(g.new_tokens[0]), 0, 0, 0)}
            for k in ks:
                sg = speculative_generate(target, draft, p, new_tokens, k=k, temperature=temperature, seed=i)
                passed[k] += sg.seconds
                found[k] = (len(sg.new_tokens), sg.drafted, sg.accepted, sg.rounds)
            for m, values in found.items():
                if rep:
                    for key, v in zip(("tokens", "drafted", "accepted", "rounds"), values):
                        counts[m][key] += v
        if rep:
            for m in modes:
                seconds[m].append(passed[m])
    rate = {m: counts[m]["tokens"] / repeats / median(seconds[m]) for m in modes}
    rows = [{"k": 0, "mode": "plain target", "tokens_per_s": round(rate[0], 1)}]
    for k in ks:
        c = counts[k]
        rows.append({"k": k, "mode": "speculative", "tokens_per_s": round(rate[k], 1), "speedup": round(rate[k] / rate[0], 3),
                     "acceptance_rate": round(c["accepted"] / c["drafted"], 4),
                     "tokens_per_target_forward": round(c["tokens"] / c["rounds"], 3)})
    return rows
