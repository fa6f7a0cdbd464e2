"""Analytic parameter counts and FLOPs of the GPT in model.py: pure functions of the config.

Torch-free on purpose (extrapolation to GPT-3/GPT-4 scale runs without torch). One multiply-add
is 2 FLOPs. T is the sequence length. Every count follows the module exactly (GQA, SwiGLU, biases,
tied or untied head, learned or rotary positions, padded vocabulary), so a test can check the
parameter counts against the real module.
"""

from __future__ import annotations

from dataclasses import dataclass

from minigpt.config import ModelConfig


@dataclass(frozen=True)
class ParamCounts:
    total: int  # every parameter once (a tied matrix once)
    non_embedding: int  # blocks + final norm: Kaplan et al. 2020's N
    embedding: int  # token embedding (+ learned positions, + an untied LM head)
    matmul: int  # weights that multiply activations per token: block linears + the LM head


def param_counts(c: ModelConfig) -> ParamCounts:
    h, D, Vp = c.n_embd, c.head_dim, c.padded_vocab_size
    b = 1 if c.bias else 0
    norm = h * (2 if (c.norm == "layernorm" and c.bias) else 1)  # weight (+ bias)
    qkv_out = (c.n_head + 2 * c.n_kv_head) * D
    fc_out = 2 * c.ffn_hidden if c.mlp == "swiglu" else c.ffn_hidden
    block_matmul = h * qkv_out + c.n_head * D * h + h * fc_out + c.ffn_hidden * h
    block_bias = b * (qkv_out + h + fc_out + h)
    block = block_matmul + block_bias + 2 * norm
    non_embedding = c.n_layer * block + norm
    embedding = Vp * h + (c.block_size * h if c.pos_emb == "learned" else 0) + (0 if c.tie_embeddings else Vp * h)
    matmul = c.n_layer * block_matmul + Vp * h  # the LM head multiplies whether tied or not
    return ParamCounts(non_embedding + embedding, non_embedding, embedding, matmul)


def forward_matmul_flops_per_token(c: ModelConfig, seq_len: int, causal: bool = False) -> float:
    """Exact matmul FLOPs of one forward pass, per token, as the model executes them.

    2 x (block linear weights + LM head over the padded vocabulary) + attention scores QK^T and
    weighted values AV: 2 x 2 x T x (n_head x head_dim) per layer over the full T x T square
    (what PyTorch's FLOP counter and Megatron count), halved when `causal` (only the lower
    triangle is useful work). This is Megatron-72 generalised to GQA, SwiGLU and any d_ff.
    """
    p = param_counts(c)
    attn = 4 * seq_len * c.n_head * c.head_dim * c.n_layer
    return 2 * p.matmul + (attn / 2 if causal else attn)


def train_flops_per_token(c: ModelConfig, seq_len: int, convention: str = "exact") -> float:
    """Training FLOPs per token (forward + backward, no recompute) under a named convention.

    exact         3 x forward_matmul_flops_per_token (backward = 2 x forward); full attention square
    exact_causal  the same with the attention score/value terms halved (Megatron-LM since 2025)
    kaplan_6n     6 N, N = non-embedding parameters (Kaplan et al. 2020, Table 1)
    six_n_all     6 N over all parameters (GPT-3 Table D.1's 6 x params x tokens)
    palm          6 N + 12 L H Q T, N non-embedding (Chowdhery et al. 2022, App. B)
    """
    p = param_counts(c)
    if convention == "exact":
        return 3 * forward_matmul_flops_per_token(c, seq_len)
    if convention == "exact_causal":
        return 3 * forward_matmul_flops_per_token(c, seq_len, causal=True)
    if convention == "kaplan_6n":
        return 6 * p.non_embedding
    if convention == "six_n_all":
        return 6 * p.total
    if convention == "palm":
        return 6 * p.non_embedding + 12 * c.n_layer * c.n_head * c.head_dim * seq_len
    raise ValueError(f"unknown FLOP convention {convention!r}")
