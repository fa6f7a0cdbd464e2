"""Analytic training and inference memory: pure functions of the config (torch-free).

Bytes, never GiB, inside; callers format. Psi is the parameter count.

Model states (Rajbhandari et al. 2019, ZeRO, section 3.1), per GPU with N_d data-parallel ranks:
  mixed precision (bf16/fp16 params and grads, fp32 master + Adam m, v): 2 + 2 + 12 = 16 bytes/param
      stage 0: 16 Psi   stage 1: 4 Psi + 12 Psi/N_d   stage 2: 2 Psi + 14 Psi/N_d   stage 3: 16 Psi/N_d
  fp32 (params, grads, Adam m, v): 4 + 4 + 8 = 16 bytes/param, partitioned the same way.
  torch autocast ("amp"): what minigpt's own bf16/fp16 training holds: fp32 params and grads, fp32
      m and v (autocast casts on the fly and keeps no 16-bit copy): 4 + 4 + 8.

Activations per layer (Korthikanti et al. 2022, Table 2): s b h (34 + 5 a s / h) bytes in 16-bit
with dropout; flash attention drops the 5 a s / h term, full recompute keeps only the layer input
(2 s b h). `activation_bytes` instead counts exactly what minigpt's model saves for backward, for
any precision, GQA, SwiGLU and dropout, and is what measured memory is compared with.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from minigpt.analytic.flops import param_counts
from minigpt.core.blocks import inventory, numel
from minigpt.core.config import ModelConfig
from minigpt.core.errors import UserError

PRECISION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class ModelStates:
    parameters: float
    gradients: float
    optimizer_state: float

    @property
    def total(self) -> float:
        return self.parameters + self.gradients + self.optimizer_state

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def state_bytes_per_param(precision: str, layout: str = "zero") -> tuple[int, int, int]:
    """(param, grad, optimizer) bytes per parameter.

    layout "zero": the ZeRO paper's mixed precision for bf16/fp16 (2, 2, 12); fp32 is (4, 4, 8).
    layout "amp": torch autocast as minigpt trains without DeepSpeed: (4, 4, 8) whatever the dtype.
    layout "zero_fp32_grads": what DeepSpeed's engine holds. Mixed precision: 16-bit params, 16-bit grads plus
    fp32 gradient partitions, fp32 master + m + v: (2, 6, 12), so stage 2 is 2 + 18/N as in
    DeepSpeed's own estimator. fp32: DeepSpeed's ZeRO optimizer keeps an fp32 master partition
    even when the model is fp32: (4, 4, 12) (stage 0: plain AdamW, (4, 4, 8)).
    """
    if precision not in PRECISION_BYTES:
        raise UserError(f"precision {precision!r} is not one of {', '.join(PRECISION_BYTES)}")
    if layout == "zero_fp32_grads":
        return (4, 4, 12) if precision == "fp32" else (2, 6, 12)
    if precision == "fp32" or layout == "amp":
        return 4, 4, 8
    if layout == "zero":
        return 2, 2, 12
    raise ValueError(f"unknown layout {layout!r}")


def model_state_bytes(num_params: float, precision: str = "bf16", zero_stage: int = 0, dp: int = 1,
                      layout: str = "zero") -> ModelStates:
    """Per-GPU bytes of parameters, gradients and optimizer state under a ZeRO stage."""
    if num_params <= 0:
        raise UserError(f"parameter count {num_params:g} must be positive, e.g. --params 7.5e9")
    if dp < 1 or int(dp) != dp:
        raise UserError(f"data-parallel degree {dp} must be a positive integer, e.g. --dp 64")
    if zero_stage not in (0, 1, 2, 3):
        raise UserError(f"ZeRO stage {zero_stage} must be 0, 1, 2 or 3")
    p, g, o = (b * num_params for b in state_bytes_per_param(precision, layout))
    if layout == "zero_fp32_grads" and precision == "fp32" and zero_stage == 0:
        o = 8 * num_params  # no ZeRO optimizer: torch AdamW's m and v only
    if zero_stage >= 1:
        o /= dp  # stage 1 partitions the optimizer state
    if zero_stage >= 2:
        g /= dp  # stage 2 also the gradients
    if zero_stage >= 3:
        p /= dp  # stage 3 also the parameters
    return ModelStates(p, g, o)


def zero_table(num_params: float, precision: str, dp: int) -> dict[str, dict]:
    """Model-state bytes per GPU for ZeRO stages 0-3 (the ZeRO paper's layout)."""
    return {str(s): model_state_bytes(num_params, precision, s, dp).as_dict() for s in range(4)}


def korthikanti_activation_bytes_per_layer(c: ModelConfig, batch: int, seq_len: int, flash: bool = False,
                                           recompute: bool = False, tp: int = 1,
                                           sequence_parallel: bool = False) -> float:
    """s b h (34 + 5 a s / h) bytes: 16-bit activations with dropout masks (Korthikanti et al. 2022).

    flash: attention that stores no s x s matrices (drops the 5 a s / h term); recompute: full
    activation checkpointing, only the layer input (2 s b h) is kept. Tensor parallelism over tp ranks
    splits the attention and MLP parts, s b h (10 + (24 + 5 a s / h) / tp); with sequence parallelism the
    rest too, s b h (34 + 5 a s / h) / tp, and the kept layer input of full recompute, 2 s b h / tp.
    A mixture of experts: the formula's MLP share (its input and dropout mask 3 s b h, whole on each rank
    without sequence parallelism, and the 16 s b h of its hidden activations, split) is replaced by what the
    inventory says the router and the k experts a token visits keep (moe_mlp_activation_bytes).
    """
    s, b, h, a = seq_len, batch, c.n_embd, c.n_head
    if recompute:
        return 2 * s * b * h / (tp if sequence_parallel else 1)
    attention = 0 if flash else 5 * a * s / h
    if tp == 1:
        out = s * b * h * (34 + attention)
    elif sequence_parallel:
        out = s * b * h * (34 + attention) / tp
    else:
        out = s * b * h * (10 + (24 + attention) / tp)
    if c.is_moe:
        dense_mlp = (3 + 16 / tp) if not sequence_parallel else 19 / tp
        out += moe_mlp_activation_bytes(c, batch, seq_len, tp, sequence_parallel) - s * b * h * dense_mlp
    return out


def moe_mlp_activation_bytes(c: ModelConfig, batch: int, seq_len: int, tp: int = 1,
                             sequence_parallel: bool = False, act_bytes: int = 2) -> float:
    """Bytes a mixture's MLP keeps for backward per micro-batch on one tensor-parallel rank, from the model's
    inventory (core/blocks.py): the router's input, probabilities and top-k choice, and per routed token copy
    the expert's input, output and weighted output, its hidden activations (split over tp: each expert is
    split like the dense MLP) and the indices; 16-bit where the model computes in 16 bits."""
    n, total = batch * seq_len, 0.0
    for part in inventory(c).layer:
        if part.name.startswith("mlp."):
            for saved in part.saves:
                if saved.scale == "token":
                    split = saved.tp_split or sequence_parallel
                    total += saved.bytes(n, seq_len, act_bytes) / (tp if split else 1)
    return total


def activation_bytes(c: ModelConfig, batch: int, seq_len: int, precision: str = "fp32",
                     recompute: bool = False) -> dict[str, float]:
    """Bytes minigpt's GPT keeps for the backward pass of one micro-batch, tensor by tensor: the sum of
    every part's `saves` in the model's inventory (core/blocks.py says what each part keeps and why; the
    tests check the sum against PyTorch's MemTracker by category, across features and precisions).

    e = bytes of a matmul input (4 in fp32, 2 under bf16/fp16 autocast); the residual stream, norms and
    the loss stay fp32. recompute=True (activation checkpointing): each block keeps only its input, n h x 4.
    """
    if batch <= 0 or seq_len <= 0:
        raise UserError(f"batch {batch} and sequence length {seq_len} must be positive")
    inv, n, e = inventory(c), batch * seq_len, PRECISION_BYTES[precision]
    layer = sum(s.bytes(n, seq_len, e) for p in inv.layer for s in p.saves)
    if recompute:
        layer = n * c.n_embd * 4
    head = sum(s.bytes(n, seq_len, e) for p in inv.root for s in p.saves)
    return {
        "per_layer": layer,
        "layers": layer * c.n_layer,
        "head_and_loss": head,
        "total": layer * c.n_layer + head,
    }


def _matrix_params_per_layer(c: ModelConfig) -> int:
    """Weights of one block's matrices: QKV, the output projection, every expert's MLP and the router."""
    return sum(numel(p.shape) * p.copies for p in inventory(c).layer if p.is_matmul)


def kv_cache_bytes_per_token(c: ModelConfig, bytes_per_el: int = 2) -> int:
    """K and V for every layer: 2 L n_kv_head head_dim bytes_per_el (GQA shrinks it by H/G).

    GPT-3 175B in fp16 (Brown et al. 2020, Table 2.1 shape): 2 x 96 x 96 x 128 x 2 = 4.5 MiB per token.
    """
    return 2 * c.n_layer * c.n_kv_head * c.head_dim * bytes_per_el


def predicted_training_memory(c: ModelConfig, batch: int, seq_len: int, precision: str,
                              recompute: bool = False) -> dict[str, float]:
    """Per-category bytes minigpt's own (non-ZeRO) trainer should hold: the 'amp' layout."""
    psi = param_counts(c).total
    states = model_state_bytes(psi, precision, 0, 1, layout="amp")
    act = activation_bytes(c, batch, seq_len, precision, recompute)
    return {
        "parameters": states.parameters,
        "gradients": states.gradients,
        "optimizer_state": states.optimizer_state,
        "activations": act["total"],
    }


def training_bytes_estimate(c: ModelConfig, batch: int, seq_len: int, precision: str) -> float:
    """Bytes one process needs to train `c` as minigpt's own trainer does: fp32 weights, gradients
    and AdamW moments (16 bytes per parameter, all experts), the activations of one micro-batch
    and the RoPE tables. A floor: temporaries and the allocator's slack come on top."""
    states = model_state_bytes(param_counts(c).total, precision, 0, 1, layout="amp").total
    rope = 2 * c.block_size * c.head_dim // 2 * 4 if c.pos_emb == "rope" else 0
    return states + activation_bytes(c, batch, seq_len, precision)["total"] + rope


def model_bytes(c: ModelConfig, bytes_per_el: int = 4) -> float:
    """Bytes of a model's weights (all experts; fp32 as built) and its RoPE tables."""
    rope = 2 * c.block_size * c.head_dim // 2 * 4 if c.pos_emb == "rope" else 0
    return param_counts(c).total * bytes_per_el + rope


def inference_bytes(c: ModelConfig, batch: int, context: int) -> float:
    """Bytes generation holds: the fp32 weights, an fp32 KV cache of `batch` x `context` tokens, and one
    step's logits per row."""
    return model_bytes(c) + kv_cache_bytes_per_token(c, 4) * batch * context + 4 * batch * c.padded_vocab_size * 2


def weight_copy_bytes(c: ModelConfig, precision: str) -> float:
    """The part of the activations that is weights: under autocast each matrix's 16-bit copy, which Linear
    saves for backward (every layer's; 0 in fp32). Part of activation_bytes' per-layer figure."""
    return 0.0 if precision == "fp32" else c.n_layer * _matrix_params_per_layer(c) * PRECISION_BYTES[precision]


def deepspeed_estimates(params: float, dp: int, largest_layer: float = 0.0) -> dict[str, float]:
    """GPU bytes per rank that DeepSpeed's own estimators give for the model states (no offload), beside
    the ZeRO paper's layout: estimate_zero2_model_states_mem_needs gives 2 Psi + 18 Psi / N (its 16-bit
    weights, and fp32 master weights, Adam moments and gradient buffers partitioned), and
    estimate_zero3_model_states_mem_needs 4 x the largest layer's parameters + 18 Psi / N (DeepSpeed
    0.x, stage_1_and_2.py and stage3.py; tests/test_memory.py checks this transcription against the
    installed functions). Keys "2" and "3"."""
    return {"2": 2 * params + int(18 * params / dp), "3": 4 * largest_layer + int(18 * params / dp)}
