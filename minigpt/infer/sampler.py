"""Sampling, once for every client: the distribution a token is drawn from, and the draw.

Settings are temperature (0: greedy), top-k (0: off) and top-p (1: off). A draw is the exponential race,
argmax(p / E) with E ~ Exp(1): it picks each token with probability p and, unlike torch.multinomial, never waits
for the host. The static generator (`sample_next`) draws a whole batch from one generator; the engine (`draw`)
gives each row its own generator, seeded per sequence, so a request gets the same tokens whatever runs beside it.
Speculative decoding's acceptance rule (`accept`) draws from the same generators.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.8  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off


def filtered_probs(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """logits (..., V) -> the distribution sampling draws from: softmax(logits / temperature) over the
    top_k most likely tokens and the nucleus of mass top_p (Holtzman et al. 2020); temperature 0
    is greedy, a one-hot of the argmax."""
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.size(-1)).float()
    logits = logits.float()
    # shifted by the maximum before the division: a vanishing temperature (1e-40) then tends to the greedy
    # one-hot (0 for the best, -inf for the rest) instead of overflowing to inf - inf = NaN
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:  # keep the smallest set whose mass reaches top_p
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        sorted_probs = sorted_logits.softmax(dim=-1)
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p  # mass before this token already enough
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits.softmax(dim=-1)


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator) -> torch.Tensor:
    """logits (B, V) -> next ids (B,), the whole batch from one generator."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = filtered_probs(logits, temperature, top_k, top_p)
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / race).argmax(dim=-1)


def row_probs(logits: torch.Tensor, settings: list[Sampling]) -> torch.Tensor:
    """Each row's distribution (n, ..., V) under its own settings (one-hot at temperature 0); rows that share
    settings are filtered together, in one call."""
    groups: dict[Sampling, list[int]] = {}
    for i, s in enumerate(settings):
        groups.setdefault(s, []).append(i)
    if len(groups) == 1:
        return filtered_probs(logits, *_args(settings[0]))
    out = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
    for sampling, rows in groups.items():
        out[rows] = filtered_probs(logits[rows], *_args(sampling))
    return out


def draw(probs: torch.Tensor, settings: list[Sampling], gens: list[torch.Generator]) -> torch.Tensor:
    """One token per row, (n, V) -> (n,): greedy rows by one argmax; the sampled rows' exponentials each from the
    row's own generator (a seeded row's stream is its own), then one race over all of them."""
    sampled = [i for i, s in enumerate(settings) if s.temperature > 0]
    if not sampled:
        return probs.argmax(dim=-1)
    race = torch.ones_like(probs)
    for i in sampled:
        race[i].exponential_(1.0, generator=gens[i])
    return (probs / race).argmax(dim=-1)


def race(probs: torch.Tensor, gen: torch.Generator) -> int:
    """A draw from probs (V,) by the exponential race, argmax p / E with E ~ Exp(1) from gen."""
    return int((probs / torch.empty_like(probs).exponential_(1.0, generator=gen)).argmax())


def accept(drafts: torch.Tensor, q: torch.Tensor, p: torch.Tensor, gen: torch.Generator, greedy: bool) -> tuple[int, int]:
    """Speculative acceptance for one row (Leviathan et al. 2023; Chen et al. 2023): (accepted count j, the token
    after them) from drafts (k,), draft distributions q (k, V), target distributions p (k + 1, V). Draft i is kept
    with probability min(1, p_i / q_i); at the first rejection the token is drawn from norm(max(0, p_i - q_i)); after
    k acceptances one more from p_k. Greedy: the drafts that equal the target's argmax, then the target's own token."""
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
        return i, race(residual / residual.sum() if residual.sum() > 0 else p[i], gen)
    return k, race(p[k], gen)


def _args(s: Sampling) -> tuple[float, int, float]:
    return s.temperature, s.top_k, s.top_p
