"""A flat batch over a paged KV cache: one forward pass for rows that decode and prompts being prefilled.

A serving step mixes two kinds of work: every running row decodes one token, and a newcomer's prompt (or a chunk of
it) is prefilled. Run as one padded (rows x tokens) batch, a one-token row would pay for the longest chunk; run as two
passes, the weights would be read twice. Here the step's tokens are laid end to end, (1, N): every Linear, norm and MLP
sees them as one batch (the weights read once; on a CPU or a small batch that is the cost), and only attention,
which is per row, splits them again (vLLM's flattened batch; Agrawal et al. 2024 "Sarathi-Serve" for chunked
prefills riding with decodes). The tokens are ordered: first one token for each decoding row, then each prefill
chunk, a run of consecutive tokens of one row.

The keys and values live in a pool of fixed-size blocks (`PagedKVCache`; Kwon et al. 2023, "PagedAttention"): a row's
slots are the blocks its table lists, so a row holds only the blocks its tokens fill and rows may share blocks (a
prompt's prefix). Attention gathers a call's blocks into one (rows, G, slots, D) tensor and attends over it with
torch's SDPA: a copy of what it reads (on this 2-core CPU, 32 rows x 80 slots, 390 against 220 us a layer for rows
held whole), where a GPU server would use a kernel that reads the blocks in place (vLLM's paged attention; torch has
none for CPUs outside flex attention's compiled path). A decode call reads its rows' own blocks only, not the cache's
whole length, each row masked to its own slots; rows of like length share a call (`group_decodes`), so the many
short rows do not pay for the longest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

BLOCK = 16  # slots a block holds (vLLM's default): a row's memory grows, and prompts are shared, a block at a time


class PagedKVCache:
    """Keys and values of every layer in one pool of n_blocks blocks: each layer's (n_blocks * BLOCK, G, D); slot s of
    a row with block table t is pool slot t[s // BLOCK] * BLOCK + s % BLOCK. Which row owns which blocks is the
    caller's (infer/blocks.py)."""

    def __init__(self, config, n_blocks: int, device, dtype) -> None:
        shape = (n_blocks * BLOCK, config.n_kv_head, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.n_blocks = n_blocks

    def write(self, layer: int, where: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v (N, G, D) at pool slots where (N,)."""
        self.k[layer].index_copy_(0, where, k.to(self.k[layer].dtype))
        self.v[layer].index_copy_(0, where, v.to(self.v[layer].dtype))

    def gather(self, layer: int, tables: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of rows whose block tables are tables (r, nb): each (r, G, nb * BLOCK, D)."""
        r, nb = tables.shape
        index = tables.reshape(-1)
        out = []
        for pool in (self.k[layer], self.v[layer]):
            blocks = pool.view(self.n_blocks, BLOCK, *pool.shape[1:]).index_select(0, index)
            out.append(blocks.view(r, nb * BLOCK, *pool.shape[1:]).transpose(1, 2).to(dtype))
        return out[0], out[1]

    def copy_block(self, src: int, dst: int) -> None:
        """Block dst := block src, in every layer (a shared block a row is about to write into: copy on write)."""
        for t in self.k + self.v:
            t[dst * BLOCK:(dst + 1) * BLOCK] = t[src * BLOCK:(src + 1) * BLOCK]


@dataclass(frozen=True)
class Ragged:
    where: torch.Tensor  # (N,) the pool slot each token's keys and values are written at
    positions: torch.Tensor  # (N,) each token's position in its row (= its slot there)
    groups: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # the decodes' attention calls: (token indexes (r,),
    # block tables (r, nb) cut or padded to the call's longest row, mask (r, 1, 1, nb * BLOCK): each sees its own slots)
    chunks: list[tuple[torch.Tensor, int, int]]  # (table (1, nb), first slot, length) of each prefill chunk, in order
    decodes: int
    out: torch.Tensor  # (M,) the tokens whose logits are wanted (each decode; each chunk that ends a prompt)


CALL_SLOTS = 64  # a call's own cost, in row-slots read: what splitting the decodes into one more call must save
# (2-core AMD EPYC, one thread: an SDPA call ~15 us, a row-slot of the 6 x 384 model's keys and values gathered and
# read ~0.15-0.2 us)


def blocks_for(slots: int) -> int:
    """Blocks that hold `slots` slots (a row's table length, a prompt's share of the pool)."""
    return -(-slots // BLOCK)


def group_decodes(blocks: list[int]) -> list[list[int]]:
    """The decoding rows (row i needs blocks[i] blocks) split into attention calls: a call gathers and reads each of
    its rows to its longest row's blocks, so rows of like length go together; the split reads the fewest row-slots,
    counting CALL_SLOTS for each call (calls are runs of the rows sorted by length; dynamic programming over the
    distinct lengths)."""
    order = sorted(range(len(blocks)), key=blocks.__getitem__)
    sizes = sorted(set(blocks))
    upto = [0]  # rows with at most sizes[j - 1] blocks
    for size in sizes:
        upto.append(upto[-1] + blocks.count(size))
    cost, cut = [0.0] + [float("inf")] * len(sizes), [0] * (len(sizes) + 1)
    for j in range(1, len(sizes) + 1):
        for i in range(j):
            c = cost[i] + (upto[j] - upto[i]) * sizes[j - 1] * BLOCK + CALL_SLOTS
            if c < cost[j]:
                cost[j], cut[j] = c, i
    groups, j = [], len(sizes)
    while j:
        groups.append(order[upto[cut[j]]:upto[j]])
        j = cut[j]
    return groups[::-1]


def _table(blocks: list[int], slots: int, device) -> torch.Tensor:
    """(1, nb): the blocks holding slots 0..slots-1."""
    return torch.tensor([blocks[:blocks_for(slots)]], dtype=torch.long, device=device)


def _decode_call(decodes: list[tuple[list[int], int]], rows: list[int], device) -> tuple:
    """One attention call over these decoding rows: their token indexes, block tables and masks."""
    nb = max(blocks_for(decodes[i][1] + 1) for i in rows)
    tables = [decodes[i][0][:nb] + [decodes[i][0][0]] * (nb - len(decodes[i][0][:nb])) for i in rows]  # padding masked
    last = torch.tensor([decodes[i][1] for i in rows], device=device)
    mask = (torch.arange(nb * BLOCK, device=device).view(1, -1) <= last.view(-1, 1)).view(len(rows), 1, 1, -1)
    return (torch.tensor(rows, dtype=torch.long, device=device), torch.tensor(tables, dtype=torch.long, device=device),
            mask)


def make_ragged(decodes: list[tuple[list[int], int]], chunks: list[tuple[list[int], int, int]], wanted: list[int],
                device) -> Ragged:
    """decodes: (block table, slot) of each decoding row's token; chunks: (block table, first slot, length); wanted:
    token indexes. Every table covers its row's slots through this step's tokens."""
    where = [t[s // BLOCK] * BLOCK + s % BLOCK for t, s in decodes]
    where += [t[s // BLOCK] * BLOCK + s % BLOCK for t, s0, n in chunks for s in range(s0, s0 + n)]
    positions = [s for _, s in decodes] + [s for _, s0, n in chunks for s in range(s0, s0 + n)]
    groups = [_decode_call(decodes, rows, device) for rows in group_decodes([blocks_for(s + 1) for _, s in decodes])] \
        if decodes else []
    def as_tensor(x: list[int]) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.long, device=device)
    return Ragged(as_tensor(where), as_tensor(positions), groups,
                  [(_table(t, s0 + n, device), s0, n) for t, s0, n in chunks], len(decodes), as_tensor(wanted))


def ragged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: PagedKVCache, layer: int,
                     batch: Ragged, gqa: bool) -> torch.Tensor:
    """q (1, H, N, D), k and v (1, G, N, D) of a flat batch -> (1, H, N, D). Writes every token's keys and values at
    its pool slot first, then attends: the decodes in a few calls of rows of like length, each chunk in one call."""
    cache.write(layer, batch.where, k[0].transpose(0, 1), v[0].transpose(0, 1))  # (N, G, D)
    out, d = [], batch.decodes
    if d:
        y = q.new_empty(1, q.size(1), d, q.size(-1))
        for index, tables, mask in batch.groups:
            K, V = cache.gather(layer, tables, q.dtype)
            qd = q[0, :, index].transpose(0, 1).unsqueeze(2)  # (r, H, 1, D)
            yd = F.scaled_dot_product_attention(qd, K, V, attn_mask=mask, enable_gqa=gqa)
            y[0, :, index] = yd[:, :, 0].transpose(0, 1)
        out.append(y)
    at = d
    for table, first, n in batch.chunks:
        qc, S = q[:, :, at:at + n], first + n
        K, V = cache.gather(layer, table, q.dtype)
        kc, vc = K[:, :, :S], V[:, :, :S]
        if first == 0:
            y = F.scaled_dot_product_attention(qc, kc, vc, is_causal=True, enable_gqa=gqa)
        else:  # query t sits at slot first + t and sees every slot up to it
            visible = torch.arange(S, device=q.device).view(1, -1) <= torch.arange(first, S, device=q.device).view(-1, 1)
            y = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=visible.view(1, 1, n, S), enable_gqa=gqa)
        out.append(y)
        at += n
    return torch.cat(out, dim=2)
