"""A flat batch over the rows of a KV cache: one forward pass for rows that decode and prompts being prefilled.

A serving step mixes two kinds of work: every running row decodes one token, and a newcomer's prompt (or a chunk of
it) is prefilled. Run as one padded (rows x tokens) batch, a one-token row would pay for the longest chunk; run as two
passes, the weights would be read twice. Here the step's tokens are laid end to end, (1, N): every Linear, norm and MLP
sees them as one batch (the weights read once; on a CPU or a small batch that is the cost), and only attention,
which is per row, splits them again (vLLM's flattened batch; Agrawal et al. 2024 "Sarathi-Serve" for chunked
prefills riding with decodes). The tokens are ordered: first one token for each decoding row, then each prefill
chunk, a run of consecutive tokens of one row.

Attention reads each row's own slots only, not the cache's whole length: a chunk up to its end; the decodes in one
call over every decoding row up to a common length, each row masked to its own, and the few rows much longer than
the rest alone, each over exactly its slots (`split_decodes`), so the many short rows do not pay for the longest
(continuous batching puts a new row beside rows hundreds of tokens on: one padded call would read every row to the
longest one's length). Rows are the cache's own, in place: no row is copied.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Ragged:
    rows: torch.Tensor  # (N,) the cache row of each token
    slots: torch.Tensor  # (N,) the cache slot each token's keys and values are written at (= its position)
    decode_rows: list[int]  # the rows whose one token leads the batch (token i is decode_rows[i]'s)
    decode_mask: torch.Tensor | None  # (R, 1, 1, S): row r's query sees its slots 0..its token's slot; R = max row + 1
    alone: list[tuple[int, int]]  # (token index, visible slots) of the decodes attended alone, beyond the mask's S
    chunks: list[tuple[int, int, int]]  # (row, first slot, length) of each prefill chunk, in token order
    out: torch.Tensor  # (M,) the tokens whose logits are wanted (each decode; each chunk that ends a prompt)

    @property
    def decodes(self) -> int:
        return len(self.decode_rows)


CALL_SLOTS = 64  # a call's own cost, in row-slots read: what peeling one more row alone must save to be worth it
# (2-core AMD EPYC, one thread: an SDPA call ~15 us, a row-slot of the 6 x 384 model's keys and values ~0.2 us)
MOST_ALONE = 8


def split_decodes(lengths: list[int]) -> tuple[int, list[int]]:
    """(S, the indexes attended alone) for decoding rows that see lengths[i] slots each: the rows not alone share one
    call over S slots (the longest of them), each longer row gets a call of its own; the split reads the fewest
    row-slots, counting CALL_SLOTS for each call (at most MOST_ALONE rows alone)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    best, best_cost = 0, len(lengths) * lengths[order[0]]
    for k in range(1, min(MOST_ALONE, len(lengths) - 1) + 1):
        cost = len(lengths) * lengths[order[k]] + sum(lengths[i] for i in order[:k]) + k * CALL_SLOTS
        if cost < best_cost:
            best, best_cost = k, cost
    return lengths[order[best]], sorted(order[:best])


def make_ragged(decodes: list[tuple[int, int]], chunks: list[tuple[int, int, int]], wanted: list[int],
                device) -> Ragged:
    """decodes: (row, slot) of each decoding row's token; chunks: (row, first slot, length); wanted: token indexes."""
    rows = [r for r, _ in decodes] + [r for r, _, n in chunks for _ in range(n)]
    slots = [s for _, s in decodes] + [s for _, s0, n in chunks for s in range(s0, s0 + n)]
    mask, alone = None, []
    if decodes:
        S, peeled = split_decodes([s + 1 for _, s in decodes])
        alone = [(i, decodes[i][1] + 1) for i in peeled]
        R = max(r for r, _ in decodes) + 1
        last = torch.zeros(R, dtype=torch.long)  # a row that does not decode now sees slot 0 (its output is dropped)
        last[[r for r, _ in decodes]] = torch.tensor([s for _, s in decodes])
        mask = (torch.arange(S).view(1, -1) <= last.view(-1, 1)).view(R, 1, 1, S).to(device)
    def as_tensor(x: list[int]) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.long, device=device)
    return Ragged(as_tensor(rows), as_tensor(slots), [r for r, _ in decodes], mask, alone, chunks, as_tensor(wanted))


def ragged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache, layer: int, batch: Ragged,
                     gqa: bool) -> torch.Tensor:
    """q (1, H, N, D), k and v (1, G, N, D) of a flat batch -> (1, H, N, D). Writes every token's keys and values at
    its (row, slot) of the cache's layer first, then attends row by row: the decodes in one call over rows
    0..R-1 (rows that do not decode now get a zero query whose output is dropped) and the longest alone (their
    rows' outputs of the shared call, cut short, replaced), each chunk in one call."""
    K, V = cache.k[layer], cache.v[layer]  # (B, G, max_len, D)
    K[batch.rows, :, batch.slots] = k[0].transpose(0, 1).to(K.dtype)  # (N, G, D) at (row, :, slot)
    V[batch.rows, :, batch.slots] = v[0].transpose(0, 1).to(V.dtype)
    out, d = [], batch.decodes
    if d:
        mask = batch.decode_mask
        R, S = mask.size(0), mask.size(-1)
        qd = q.new_zeros(R, q.size(1), 1, q.size(-1))
        qd[batch.decode_rows] = q[0, :, :d].transpose(0, 1).unsqueeze(2)  # (d, H, 1, D) into their rows
        y = F.scaled_dot_product_attention(qd, K[:R, :, :S].to(q.dtype), V[:R, :, :S].to(q.dtype), attn_mask=mask,
                                           enable_gqa=gqa)
        y = y[batch.decode_rows, :, 0].transpose(0, 1).unsqueeze(0)  # (1, H, d, D)
        for i, n in batch.alone:
            row = batch.decode_rows[i]
            y[:, :, i:i + 1] = F.scaled_dot_product_attention(q[:, :, i:i + 1], K[row:row + 1, :, :n].to(q.dtype),
                                                              V[row:row + 1, :, :n].to(q.dtype), enable_gqa=gqa)
        out.append(y)
    at = d
    for row, first, n in batch.chunks:
        qc, S = q[:, :, at:at + n], first + n
        kc, vc = K[row:row + 1, :, :S].to(q.dtype), V[row:row + 1, :, :S].to(q.dtype)
        if first == 0:
            y = F.scaled_dot_product_attention(qc, kc, vc, is_causal=True, enable_gqa=gqa)
        else:  # query t sits at slot first + t and sees every slot up to it
            visible = torch.arange(S, device=q.device).view(1, -1) <= torch.arange(first, S, device=q.device).view(-1, 1)
            y = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=visible.view(1, 1, n, S), enable_gqa=gqa)
        out.append(y)
        at += n
    return torch.cat(out, dim=2)
