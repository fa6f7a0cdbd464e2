"""The parallel layout (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass

from minigpt.core.config import ModelConfig, TrainConfig, divisors
from minigpt.core.errors import UserError


def check_tensor_parallel(c: ModelConfig, tp: int, world: int) -> None:
    """Every sharded dimension must divide by tp; one clear line when one does not."""
    if tp == 1:
        return
    if c.is_moe:
        raise UserError("train.tensor_parallel > 1 does not shard a mixture of experts; use train.tensor_parallel = 1")
    for name, n in (("model.n_head", c.n_head), ("model.n_kv_head", c.n_kv_head), ("model.ffn_hidden", c.ffn_hidden)):
        if n % tp:
            raise UserError(f"{name} = {n} does not divide by train.tensor_parallel = {tp}; choose a tensor-parallel "
                            f"degree that divides n_head, n_kv_head and ffn_hidden")
    if world % tp:
        raise UserError(f"train.tensor_parallel = {tp} must divide the {world} processes; e.g. --nproc_per_node {tp}")


@dataclass(frozen=True)


class BatchLayout:
    """How train.batch_size_tokens splits into ranks x accumulation x micro-batches of sequences."""

    micro_batch_size: int  # sequences per forward pass on one rank
    accum: int  # micro-batches per optimizer step on one rank
    world_size: int
    block_size: int
    note: str = ""  # why the micro-batch differs from the configured one, when it does

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batch_size * self.block_size * self.accum * self.world_size


def batch_layout(tc: TrainConfig, block_size: int, world_size: int) -> BatchLayout:
    """Gradient accumulation derived from the global batch in tokens (nanochat's rule).

    batch_size_tokens = 0 means one micro-batch per rank. When the configured micro-batch does not
    divide a rank's share of the global batch (e.g. the tiny preset's 4,096 tokens on 2 ranks), the
    largest micro-batch below it that does is used and `note` says so; the global batch, and so the
    training, stays the same.
    """
    micro, total = tc.micro_batch_size, tc.batch_size_tokens
    if total == 0:
        return BatchLayout(micro, 1, world_size, block_size)
    per_rank, rest = divmod(total, block_size * world_size)
    if rest or per_rank == 0:
        unit = block_size * world_size
        raise UserError(
            f"train.batch_size_tokens = {total:,} is not a multiple of block_size x world_size = {block_size} x "
            f"{world_size} = {unit:,}; set train.batch_size_tokens to a multiple of {unit:,}, e.g. "
            f"{max(1, round(total / unit)) * unit:,}"
        )
    if per_rank % micro == 0:
        return BatchLayout(micro, per_rank // micro, world_size, block_size)
    fitted = max(d for d in divisors(per_rank) if d <= micro)
    note = (f"micro-batch {micro} -> {fitted} sequences: {total:,} tokens per step on {world_size} rank(s) is "
            f"{per_rank} sequences of {block_size} per rank, which {micro} does not divide")
    return BatchLayout(fitted, per_rank // fitted, world_size, block_size, note)
