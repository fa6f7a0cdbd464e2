"""Speculative decoding: a small draft model proposes K tokens, the target verifies them in one pass.

Leviathan et al. 2023 / Chen et al. 2023: draft token d_i, drawn from the draft's distribution
q_i, is accepted with probability min(1, p_i(d_i) / q_i(d_i)) under the target's p_i; at the first
rejection a token is drawn from norm(max(0, p_i - q_i)) instead, and when all K are accepted one
more is drawn from p_{K+1}. Every emitted token is then distributed exactly as the target's own
sampling (with the same temperature, top-k and top-p applied to both models' distributions);
with temperature 0 both distributions are one-hot, so the output is the target's greedy output,
token for token. Each round costs K draft steps and one target forward over K + 1 positions.

The rounds run on the serving engine (minigpt.infer.engine): both models keep a static KV cache of the same
rows, each row samples with its own settings and generator, and a batch of rows speculates together (each
accepting its own count); `minigpt serve --draft RUN` serves with it. This module keeps the one-prompt entry
point, the tokenizer check and the benchmark against plain decoding.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from minigpt.core.errors import UserError
from minigpt.infer.engine import Sampling, Sequence, SpeculativeEngine, generate_all
from minigpt.nn.model import GPT


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


@torch.no_grad()
def speculative_generate(target: GPT, draft: GPT, prompt: list[int], max_new_tokens: int, k: int = 4,
                         temperature: float = 0.8, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                         eot_id: int | None = None) -> SpeculativeGeneration:
    """One prompt through the engine with a draft (minigpt.infer.engine: the serving engine's rows, cache and
    sampler): its first token from the prefill, then speculative rounds."""
    if k < 1:
        raise UserError(f"--speculate {k} must be at least 1 (draft tokens per round)")
    block = min(target.config.block_size, draft.config.block_size)
    if not prompt or len(prompt) >= block:
        raise UserError(f"the prompt must be 1 to {block - 1} tokens (block_size {block}); it has {len(prompt)}")
    engine = SpeculativeEngine(target, 1, draft, k)
    seq = Sequence(prompt, max_new_tokens, Sampling(temperature, top_k, top_p), seed,
                   frozenset() if eot_id is None else frozenset([eot_id]))
    start = time.perf_counter()
    generate_all(engine, [seq])
    return SpeculativeGeneration(seq.tokens, engine.steps, engine.drafted, engine.accepted, time.perf_counter() - start)


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
