"""Bytes one decoder layer's memory-bound operations move when they run as eager PyTorch ops.

The step-time model's default count (steptime.layer_memory_bytes) assumes fused kernels, as torch.compile
or Megatron's fused kernels run them: each norm, activation or residual pass reads its inputs and writes
its output once. Eager PyTorch runs each op of the written code as its own kernel, many of them in fp32:
an RMSNorm written as x.float() -> pow -> mean -> +eps -> rsqrt -> mul -> mul weight -> cast back (as
torchtitan's and torch.nn.RMSNorm's decomposition), rotary embeddings in fp32 (cast, four multiplies, a
subtract, an add, a concatenation, a cast back), SwiGLU as silu then multiply. This module counts each op's
tensor reads and writes, forward and backward (autograd's ops, as PyTorch runs them for this block), for
minigpt's own block (nn/model.py: fused q/k/v and gate/up projections). A test counts the same with a
dispatch mode on the real block and requires them to agree, the layout copies around the attention kernel
left out (they depend on the kernel's memory layout: on this CPU with rotary embeddings they add 2-5%).

Covered: dense blocks without dropout (LayerNorm or RMSNorm; GELU, ReLU^2 or SwiGLU; learned or rotary
positions). LayerNorm and GELU are single ATen kernels in eager mode too. Elements times bytes per element;
fp32 intermediates at 4 bytes; with fp32 activations the casts are no-ops and count nothing. Torch-free.
"""

from __future__ import annotations

from minigpt.core.blocks import inventory
from minigpt.core.config import ModelConfig
from minigpt.core.errors import UserError

FP32 = 4


def _moved(*tensors: tuple[float, int]) -> float:
    """Bytes of the tensors an op reads and writes: (elements, bytes per element) each."""
    return sum(n * el for n, el in tensors)


def _cast(elements: float, el: int) -> float:
    """A cast between the activation dtype and fp32 (read one, write the other); none when they are the same."""
    return 0.0 if el == FP32 else _moved((elements, el), (elements, FP32))


def rmsnorm_bytes(rows: float, width: int, el: int) -> tuple[float, float]:
    """(forward, backward) of an RMSNorm over rows x width computed in fp32 (ops as in the docstring)."""
    r, n, f = rows * width, rows, FP32
    fwd = (_cast(r, el) + _moved((r, f), (r, f)) + _moved((r, f), (n, f))  # cast up, square, mean
           + 2 * _moved((n, f), (n, f))  # + eps, rsqrt
           + _moved((r, f), (n, f), (r, f)) + _moved((r, f), (width, el), (r, f))  # x * rstd, * weight
           + _cast(r, el))  # cast back
    bwd = (_cast(r, el)  # grad cast up
           + 2 * _moved((r, f), (r, f), (r, f)) + _moved((r, f), (width, el), (r, f))  # grad products with the weight
           + _moved((r, f), (width, f)) + _cast(width, el)  # the weight's gradient, cast
           + _moved((r, f), (n, f), (r, f)) + _moved((r, f), (n, f))  # rstd's gradient: product, row sum
           + 2 * _moved((n, f), (n, f)) + _moved((n, f), (n, f), (n, f))  # rstd^3 and scale
           + 3 * _moved((r, f), (r, f))  # mean(x^2)'s gradient: divide, 2x, ...
           + 2 * _moved((r, f), (r, f), (r, f))  # ... times, plus the direct path
           + _cast(r, el))  # cast back
    return fwd, bwd


def layernorm_bytes(rows: float, width: int, el: int, bias: bool) -> tuple[float, float]:
    """(forward, backward) of one native_layer_norm kernel each way: x, weight (bias) in, y and the fp32 row
    statistics out; backward reads dy, x, the statistics and the weight, writes dx and the weight's (bias') grads."""
    r, n, w = rows * width, rows, width * (2 if bias else 1)
    fwd = _moved((r, el), (w, el), (r, el), (2 * n, FP32))
    return fwd, _moved((r, el), (r, el), (2 * n, FP32), (w, el), (r, el), (w, el))


def rope_bytes(x: float, positions: int, head_dim: int, el: int) -> tuple[float, float]:
    """(forward, backward) of rotating x elements (all heads of q or of k) in fp32: cast up, four multiplies
    by the cos/sin tables (positions x head_dim/2 each), subtract, add, concatenate, cast back; the backward
    has a negation and two adds in place of subtract and add."""
    half, f, table = x / 2, FP32, positions * head_dim / 2
    casts = 2 * _cast(x, el)
    products = 4 * _moved((half, f), (table, f), (half, f))
    cat = _moved((x, f), (x, f))
    fwd = casts + products + 2 * _moved((half, f), (half, f), (half, f)) + cat
    bwd = casts + products + _moved((half, f), (half, f)) + 2 * _moved((half, f), (half, f), (half, f)) + cat
    return fwd, bwd


def activation_bytes(c: ModelConfig, tokens: float, width: int, el: int) -> tuple[float, float]:
    """(forward, backward) of the MLP's elementwise pass over tokens x width (ffn_hidden on this rank)."""
    a = tokens * width
    if c.mlp == "swiglu":  # silu(gate) * up; backward: two products, silu_backward, the gate/up gradient concatenated
        return _moved((a, el), (a, el)) + _moved((3 * a, el)), 3 * _moved((3 * a, el)) + _moved((2 * a, el), (2 * a, el))
    if c.mlp == "relu2":  # relu, square; backward: x^1, 2x, product, threshold_backward
        return 2 * _moved((2 * a, el)), 2 * _moved((2 * a, el)) + 2 * _moved((3 * a, el))
    return _moved((2 * a, el)), _moved((3 * a, el))  # gelu / gelu_backward: one kernel each


# the parts of the model's inventory (core/blocks.py) whose eager kernels layer_bytes counts: the norms, the
# projections' bias and gradient passes, RoPE, the residual adds and the MLP's activation
COSTED_PARTS = frozenset({"ln_1", "attn.c_attn", "attn.rope", "attn.core", "attn.c_proj", "ln_2", "mlp.c_fc",
                          "mlp.c_proj"})


def check_covered(c: ModelConfig, fix: str) -> None:
    """The blocks this count covers: every part of the block's inventory must be one it costs (a new block
    feature is refused by name until it is counted here); dropout's kernels are not counted either. `fix`
    names the way out in the caller's words."""
    missing = [p.name for p in inventory(c).layer if p.name not in COSTED_PARTS]
    if missing or c.dropout > 0:
        what = f"the part(s) {', '.join(missing)}" if missing else "dropout"
        raise UserError(f"eager kernel counts do not cover {what} of this model's blocks (core/blocks.py): use {fix}")


def layer_bytes(c: ModelConfig, tp: int, sp: bool, b: int, s: int, el: int) -> tuple[float, float]:
    """(forward, backward) bytes of one layer's memory-bound eager ops on one tensor-parallel rank, for b
    sequences of s tokens: two norms, the rotary embedding, two residual adds, the activation; in the
    backward also the gradients' adds where branches meet, the q/k/v and gate/up gradients concatenated
    for the fused projections, and the bias gradients (layout copies left out: see the module doc). Norm
    and residual regions are split over tp with sequence parallelism."""
    check_covered(c, 'kernels = "fused"')
    T, h = b * s, c.n_embd
    rows = T / (tp if sp else 1)
    q, kv = T * c.n_head * c.head_dim / tp, T * c.n_kv_head * c.head_dim / tp
    f = c.ffn_hidden // tp
    norm = (rmsnorm_bytes(rows, h, el) if c.norm == "rmsnorm" else layernorm_bytes(rows, h, el, c.bias))
    act = activation_bytes(c, T, f, el)
    residual = _moved((3 * rows * h, el))
    fwd = 2 * norm[0] + act[0] + 2 * residual
    bwd = 2 * norm[1] + act[1] + 2 * residual + _moved((2 * (q + 2 * kv), el))  # q/k/v grads concatenated
    if c.pos_emb == "rope":
        rq, rk = rope_bytes(q, s, c.head_dim, el), rope_bytes(kv, s, c.head_dim, el)
        fwd, bwd = fwd + rq[0] + rk[0], bwd + rq[1] + rk[1]
    biased = (q + 2 * kv) * c.qkv_bias + rows * h * c.attention_bias + (T * f * (2 if c.mlp == "swiglu" else 1)
                                                                       + rows * h) * c.mlp_bias
    return fwd, bwd + _moved((biased, el))  # a bias gradient reads its GEMM's output gradient
