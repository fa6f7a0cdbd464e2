"""Analytic parameter counts and FLOPs of the GPT in model.py: pure functions of the config.

Torch-free on purpose (extrapolation to GPT-3/GPT-4 scale runs without torch). One multiply-add
is 2 FLOPs. T is the sequence length. Every count follows the module exactly (GQA, SwiGLU, biases,
tied or untied head, learned or rotary positions, padded vocabulary), so a test can check the
parameter counts against the real module.
"""

from __future__ import annotations

from dataclasses import dataclass

from minigpt.core.blocks import inventory, numel
from minigpt.core.config import ModelConfig


@dataclass(frozen=True)
class ParamCounts:
    total: int  # every parameter once (a tied matrix once); all experts of a mixture
    non_embedding: int  # blocks + final norm: Kaplan et al. 2020's N
    embedding: int  # token embedding (+ learned positions, + an untied LM head)
    matmul: int  # weights that multiply activations: block linears (all experts) + the LM head
    active: int  # parameters one token uses: as total, with n_expert_active experts per block
    active_non_embedding: int
    active_matmul: int  # what sets the FLOPs per token (router included)


def param_counts(c: ModelConfig) -> ParamCounts:
    """Parameter counts of model.GPT, summed over the model's inventory (core/blocks.py; a test checks them
    against the module).

    Mixture of experts: memory follows the total (all experts), FLOPs the active parameters
    (the non-expert weights, n_expert_active experts and the router; Fedus et al. 2021, Switch Transformers).
    """
    inv = inventory(c)
    block = sum(p.params * p.copies for p in inv.layer)
    block_active = sum(p.params * p.active for p in inv.layer)
    final_norm = inv.get("ln_f").params
    embedding = sum(p.params for p in inv.root if p.kind in ("embedding", "linear"))  # wte (+ wpe, + untied head)
    layer_mm = sum(numel(p.shape) * p.copies for p in inv.layer if p.is_matmul)
    layer_mm_active = sum(numel(p.shape) * p.active for p in inv.layer if p.is_matmul)
    head = numel(inv.get("lm_head").shape)  # the LM head multiplies activations, tied or not
    non_embedding, active_non_embedding = c.n_layer * block + final_norm, c.n_layer * block_active + final_norm
    return ParamCounts(non_embedding + embedding, non_embedding, embedding, c.n_layer * layer_mm + head,
                       active_non_embedding + embedding, active_non_embedding, c.n_layer * layer_mm_active + head)


def forward_matmul_flops_per_token(c: ModelConfig, seq_len: int, causal: bool = False) -> float:
    """Exact matmul FLOPs of one forward pass, per token, as the model executes them.

    2 x (active block linear weights + router + LM head over the padded vocabulary) + attention
    scores QK^T and
    weighted values AV: 2 x 2 x T x (n_head x head_dim) per layer over the full T x T square
    (what PyTorch's FLOP counter and Megatron count), halved when `causal` (only the lower
    triangle is useful work). This is Megatron-72 generalised to GQA, SwiGLU and any d_ff.
    """
    p = param_counts(c)
    attn = 4 * seq_len * c.n_head * c.head_dim * c.n_layer
    return 2 * p.active_matmul + (attn / 2 if causal else attn)


CONVENTIONS = ("kaplan_6n", "six_n_all", "palm", "chinchilla", "megatron_72", "megatron_96")
EXACT_CONVENTIONS = ("exact", "exact_causal", "exact_recompute")
ALL_CONVENTIONS = EXACT_CONVENTIONS + CONVENTIONS + ("megatron_72_causal",)


def chinchilla_forward_flops(c: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs of one sequence, Hoffmann et al. 2022 (Chinchilla), Appendix F.

    Counts the embedding lookup as a matmul (2 s V h), softmax (3 H s^2) and the logits; not
    norms, biases or element-wise ops. Generalised here to GQA (the KQV projection has
    (H + 2G) D outputs), SwiGLU (three d_ff matrices) and mixtures of experts (k active MLPs and
    the router, 2 s h E). V is the real vocabulary.
    """
    s, h, V = seq_len, c.n_embd, c.vocab_size
    H, G, D, ff = c.n_head, c.n_kv_head, c.head_dim, c.ffn_hidden
    mlp_mats = (3 if c.mlp == "swiglu" else 2) * (c.n_expert_active if c.is_moe else 1)
    router = 2 * s * h * c.n_expert if c.is_moe else 0
    layer = router + (
        2 * s * h * (H + 2 * G) * D  # key, query, value projections
        + 2 * s * s * H * D  # key @ query logits
        + 3 * H * s * s  # softmax
        + 2 * s * s * H * D  # softmax @ values
        + 2 * s * H * D * h  # final attention linear
        + 2 * s * h * ff * mlp_mats  # feed-forward
    )
    return 2 * s * V * h + c.n_layer * layer + 2 * s * h * V


def train_flops_per_token(c: ModelConfig, seq_len: int, convention: str = "exact") -> float:
    """Training FLOPs per token (forward + backward) under a named convention.

    exact            3 x forward_matmul_flops_per_token: every matmul the model executes
                     (padded vocabulary), attention over the full T x T square, backward = 2 x
                     forward, no recompute. This is what PyTorch's FLOP counter counts.
    exact_causal     the same with the attention score/value terms halved (only the causal
                     triangle is useful work; Megatron-LM since 2025, MaxText).
    exact_recompute  exact plus one more forward of the blocks (full activation checkpointing):
                     hardware FLOPs (HFU), not model FLOPs.
    For a mixture of experts every N is the ACTIVE parameter count (Switch Transformers, Fedus et al. 2021); the
    Megatron formulas assume a dense GELU 4h MLP and are shown as they are.
    kaplan_6n        6 N, N = non-embedding parameters (Kaplan et al. 2020, Table 1, Eq. 2.2);
                     ignores attention over the context and the LM head.
    six_n_all        6 N over all parameters, embeddings included (GPT-3 Table D.1).
    palm             6 N + 12 L H Q T with N ALL parameters, a tied embedding once (Chowdhery
                     et al. 2022, App. B: PaLM 8B's and 62B's per-token figures reproduce with the
                     total, not the non-embedding N); excludes recompute. Counts the attention
                     square in full.
    chinchilla       3 x the forward of Hoffmann et al. 2022, App. F (see chinchilla_forward_flops):
                     also counts the embedding lookup and softmax.
    megatron_72      72 B s L h^2 (1 + s/(6h) + V/(12 L h)) per step (Narayanan et al. 2021, App.):
                     exact for a GELU 4h MLP with full attention heads, no recompute; ignores
                     GQA and SwiGLU by construction. V the real vocabulary.
    megatron_72_causal  megatron_72 with the attention term s/(6h) halved.
    megatron_96      96 B s L h^2 (1 + s/(6h) + V/(16 L h)): the same with full activation
                     recompute (one more forward of the layers).
    """
    p = param_counts(c)
    L, h, s, V = c.n_layer, c.n_embd, seq_len, c.vocab_size
    if convention == "exact":
        return 3 * forward_matmul_flops_per_token(c, seq_len)
    if convention == "exact_causal":
        return 3 * forward_matmul_flops_per_token(c, seq_len, causal=True)
    if convention == "exact_recompute":
        head = 2 * c.padded_vocab_size * h
        return 3 * forward_matmul_flops_per_token(c, seq_len) + (forward_matmul_flops_per_token(c, seq_len) - head)
    if convention == "kaplan_6n":
        return 6 * p.active_non_embedding
    if convention == "six_n_all":
        return 6 * p.active
    if convention == "palm":
        return 6 * p.active + 12 * L * c.n_head * c.head_dim * s
    if convention == "chinchilla":
        return 3 * chinchilla_forward_flops(c, seq_len) / seq_len
    if convention == "megatron_72":
        return 72 * L * h * h * (1 + s / (6 * h) + V / (12 * L * h))
    if convention == "megatron_72_causal":
        return 72 * L * h * h * (1 + s / (12 * h) + V / (12 * L * h))
    if convention == "megatron_96":
        return 96 * L * h * h * (1 + s / (6 * h) + V / (16 * L * h))
    raise ValueError(f"unknown FLOP convention {convention!r}; choose from {', '.join(ALL_CONVENTIONS)}")


def all_train_flops_per_token(c: ModelConfig, seq_len: int) -> dict[str, float]:
    return {name: train_flops_per_token(c, seq_len, name) for name in ALL_CONVENTIONS}


def prefill_flops(c: ModelConfig, prompt_len: int, all_logits: bool = False) -> float:
    """Forward FLOPs of prefilling a prompt of P tokens (one sequence).

    2 N_mm P + 4 L P^2 H D (full attention square, as executed). With all_logits=False the LM
    head runs on the last position only, as minigpt's generate does; all_logits=True gives the
    reference formula 2 N_mm P + 4 L P^2 h (Kaplan et al. 2020, Table 1: 2N + 2 n_layer n_ctx d_attn per token).
    """
    p = param_counts(c)
    head = 2 * c.padded_vocab_size * c.n_embd
    body = 2 * (p.active_matmul - c.padded_vocab_size * c.n_embd) * prompt_len
    attn = 4 * c.n_layer * prompt_len * prompt_len * c.n_head * c.head_dim
    return body + attn + head * (prompt_len if all_logits else 1)


def decode_flops(c: ModelConfig, cache_len: int) -> float:
    """Forward FLOPs of one decode step at cache length t (one sequence): 2 N_mm + 4 L t H D.

    The new token attends to t cached positions plus itself; we count t + 1 keys.
    """
    p = param_counts(c)
    return 2 * p.active_matmul + 4 * c.n_layer * (cache_len + 1) * c.n_head * c.head_dim


def muon_flops_per_step(c: ModelConfig, ns_steps: int = 5, ep: int = 1) -> float:
    """FLOPs of Muon's Newton-Schulz orthogonalisation per optimizer step on one rank (torch.optim.Muon, ns_steps
    quintic iterations per matrix): for an m x n matrix with a = min(m, n), b = max(m, n), each iteration
    forms A = X X^T (2 a^2 b), B = beta A + gamma A A (2 a^3) and alpha X + B X (2 a^2 b). Every matrix of
    every block (the router, every expert; with expert parallelism a rank's n_expert / ep); a sharded matrix is
    gathered and orthogonalised whole on every rank. Not part of the model FLOPs that MFU counts."""
    shapes = [p.shape for p in inventory(c).layer if p.is_matmul for _ in range(p.copies // ep if p.ep else p.copies)]
    per_layer = sum(ns_steps * (4 * min(m, n) ** 2 * max(m, n) + 2 * min(m, n) ** 3) for m, n in shapes)
    return float(c.n_layer * per_layer)
