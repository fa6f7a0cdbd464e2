"""A decoder-only GPT in one file: config in, logits (or loss) out, read top to bottom.

    tokens -> token embedding (+ learned positions) -> dropout
           -> n_layer x [ x + attn(norm(x)) ; x + mlp(norm(x)) ]      (pre-norm blocks)
           -> final norm -> LM head (tied to the token embedding or not) -> logits

Attention is causal, goes through `F.scaled_dot_product_attention`, and supports grouped-query
attention (n_kv_head < n_head: each K/V head serves n_head/n_kv_head query heads) and rotary
position embeddings (RoPE). The MLP is GELU (ffn_hidden wide) or SwiGLU, or a mixture of experts.
The vocabulary is padded to a multiple of 64 rows for speed; the padding never enters the loss
or sampling.

The model is stateless: incremental decoding passes a static `KVCache` and the cache slots of
the new tokens (`input_pos`), as gpt-fast does, so a decode step has fixed shapes. Training
techniques (activation checkpointing, torch.compile, data/tensor parallelism) are applied from
outside (minigpt/parallel/parallelize.py); nothing here knows about them.

Shape letters: B batch, T query length, S key length (cache slots), C = n_embd, H = n_head,
G = n_kv_head, D = head_dim = C / H, V = vocab_size, Vp = padded vocab.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from minigpt.core.blocks import Part, inventory
from minigpt.core.config import ModelConfig
from minigpt.nn.ops import activation_dtype, linear_cross_entropy
from minigpt.nn.ragged import PagedKVCache, Ragged, ragged_attention


class ModelOutput(NamedTuple):
    logits: torch.Tensor | None  # (B, T or 1, V) when no targets are given
    loss: torch.Tensor | None  # mean cross-entropy in nats over the targets, when given
    aux_loss: torch.Tensor | None  # mixture of experts: load-balancing loss summed over layers


def linear(part: Part) -> nn.Linear:
    """The Linear an inventory part describes (core/blocks.py: its (out, in) shape and bias)."""
    return nn.Linear(part.shape[1], part.shape[0], bias=bool(part.bias))


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


def rope_tables(head_dim: int, max_len: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * frequency, each (max_len, head_dim/2), in fp32 (RoFormer, Su et al.
    2021: frequency_i = theta^(-2i/head_dim))."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + D/2) of x (B, heads, T, D) by the angles of cos/sin (B, 1, T, D/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.type_as(x)


class KVCache:
    """Keys and values of every layer for incremental decoding: static and preallocated.

    Each layer's tensors are (B, G, max_len, D). `update` writes the new keys and values at the
    slots `input_pos` (T,) with index_copy_ and returns the whole buffers, so shapes never change
    and a decode step compiles to one graph (gpt-fast). Which slots a query may see is up to the
    attention mask: by default every slot up to the query's own.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device, dtype) -> None:
        shape = (batch_size, config.n_kv_head, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.max_len = max_len

    def update(self, layer: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, G, T, D) at slots input_pos: (T,) the same slots in every row, or (B, T) each
        row its own (continuous batching, rows at different lengths); return all keys/values (B, G, max_len, D)."""
        if input_pos.dim() == 2:
            index = input_pos[:, None, :, None].expand(k.shape)
            self.k[layer].scatter_(2, index, k.to(self.k[layer].dtype))
            self.v[layer].scatter_(2, index, v.to(self.v[layer].dtype))
        else:
            self.k[layer].index_copy_(2, input_pos, k.to(self.k[layer].dtype))
            self.v[layer].index_copy_(2, input_pos, v.to(self.v[layer].dtype))
        return self.k[layer], self.v[layer]

    def rows(self, start: int, stop: int) -> KVCache:
        """Rows start..stop-1 as a cache of their own that shares this one's memory (a view: writes land here)."""
        return self._mapped(lambda t: t[start:stop])

    def select_rows(self, index: torch.Tensor) -> KVCache:
        """A new cache whose row i is this one's row index[i] (rows prefilled once, given to several samples)."""
        return self._mapped(lambda t: t.index_select(0, index))

    def slots(self, length: int) -> KVCache:
        """The first `length` slots of every row as a cache of their own (a view): a batch whose rows all end
        before `length` attends over these instead of the whole max_len."""
        return self._mapped(lambda t: t[:, :, :length], length)

    def _mapped(self, fn, max_len: int | None = None) -> KVCache:
        """A cache (of max_len slots, default this one's) whose key and value tensors are fn of this one's."""
        out = object.__new__(KVCache)
        out.k, out.v, out.max_len = [fn(t) for t in self.k], [fn(t) for t in self.v], max_len or self.max_len
        return out

    def copy_row(self, src: int, dst: int, length: int) -> None:
        """Row dst's first `length` slots := row src's (a prompt prefilled once for several samples)."""
        for t in self.k + self.v:
            t[dst, :, :length] = t[src, :, :length]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        inv = inventory(config)
        self.c_attn = linear(inv.get("attn.c_attn"))  # one fused projection: queries (H heads), keys, values (G each)
        self.c_proj = linear(inv.get("attn.c_proj"))
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        # QK-norm: each head's queries and keys RMS-normalised (learned scale), bounding the attention logits
        self.q_norm = nn.RMSNorm(config.head_dim, eps=config.norm_eps) if config.qk_norm else None
        self.k_norm = nn.RMSNorm(config.head_dim, eps=config.norm_eps) if config.qk_norm else None

    def forward(self, x, rope=None, cache: KVCache | None = None, input_pos=None, attn_mask=None) -> torch.Tensor:
        B, T, _ = x.shape
        H, G, D = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.c_attn(x).split([H * D, G * D, G * D], dim=-1)
        q = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, G, D).transpose(1, 2)  # (B, G, T, D)
        v = v.view(B, T, G, D).transpose(1, 2)  # (B, G, T, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if isinstance(input_pos, Ragged):  # a serving step's flat batch of decodes and prefill chunks
            y = ragged_attention(q, k, v, cache, self.layer, input_pos, G != H)
            return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, H * D)))
        if cache is not None:
            k, v = cache.update(self.layer, input_pos, k, v)  # (B, G, S, D), S = cache slots
        y = F.scaled_dot_product_attention(
            q, k.to(q.dtype), v.to(q.dtype),
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=attn_mask is None,  # without a mask: plain causal attention over the window
            enable_gqa=G != H,  # each K/V head serves H/G query heads
        )  # (B, H, T, D)
        y = y.transpose(1, 2).contiguous().view(B, T, H * D)
        return self.resid_dropout(self.c_proj(y))


GELU_K = 2 * math.sqrt(2 / math.pi)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation (Hendrycks & Gimpel 2016; GPT-2): 0.5 x (1 + tanh(sqrt(2/pi)(x + 0.044715 x^3))).

    Under torch.compile it is written in its identical sigmoid form, x * sigmoid(2 sqrt(2/pi)(...)),
    since 0.5 (1 + tanh z) = sigmoid(2z): inductor's CPU tanh is 3x slower than its exp. Eager
    keeps ATen's fused kernel. The two agree to float rounding (a test checks it).
    """
    if torch.compiler.is_compiling():
        return x * torch.sigmoid(GELU_K * (x + 0.044715 * x * x * x))
    return F.gelu(x, approximate="tanh")


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, prefix: str = "mlp.") -> None:
        """prefix: where the inventory lists this MLP's Linears ("mlp." dense, "mlp.experts.*." an expert)."""
        super().__init__()
        self.swiglu, self.relu2 = config.mlp == "swiglu", config.mlp == "relu2"
        # SwiGLU (Shazeer 2020): silu(x W1) * (x W3), fused here as one matrix of 2*ffn_hidden outputs
        inv = inventory(config)
        self.c_fc = linear(inv.get(prefix + "c_fc"))
        self.c_proj = linear(inv.get(prefix + "c_proj"))
        self.dropout = nn.Dropout(config.dropout)

    def activate(self, h: torch.Tensor) -> torch.Tensor:
        """(..., ffn_hidden or 2*ffn_hidden) -> (..., ffn_hidden): the elementwise pass between the projections."""
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            return F.silu(gate) * up
        if self.relu2:
            return F.relu(h).square()  # ReLU^2 (Primer)
        return gelu_tanh(h)  # GPT-2's GELU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)  # (B, T, ffn_hidden or 2*ffn_hidden)
        return self.dropout(self.c_proj(self.activate(h)))


class MoE(nn.Module):
    """Top-k mixture of expert MLPs with a learned router (Shazeer et al. 2017; Fedus et al. 2021).

    Each token goes to its n_expert_active highest-probability experts; their outputs are mixed
    with the router probabilities renormalised over the chosen k. Dispatch is dropless unless
    model.moe_capacity_factor sets a capacity (each expert takes its first ceil(factor x N k / E) slots in
    token order; a dropped slot adds nothing, the token keeps its residual: Switch Transformer). With
    model.moe_grouped_mm the experts run as two grouped matrix multiplies over their tokens sorted by expert
    (where torch's grouped_mm can), else as a loop over experts that gathers each one's tokens. Returns the output and the load-balancing loss of Switch Transformer
    (eq. 4), generalised to top-k: E * sum_e f_e * P_e, with f_e the share of routed slots that went to expert
    e and P_e its mean router probability; 1.0 when balanced. `stats` keeps the last training forward's
    routing (per-expert share of the slots, the share dropped, the router's mean entropy in nats), detached,
    for the step logs. On the meta device or fake tensors (no data, so no routing), each expert gets an equal
    share of the N*k slots: the FLOPs are the same for any routing.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_expert, self.k, self.capacity_factor = config.n_expert, config.n_expert_active, config.moe_capacity_factor
        self.router = linear(inventory(config).get("mlp.router"))
        self.experts = nn.ModuleList(MLP(config, "mlp.experts.*.") for _ in range(config.n_expert))
        self.stats: dict[str, torch.Tensor] = {}
        self.bias_rate = config.moe_bias_update_rate
        self.grouped = config.moe_grouped_mm
        if self.bias_rate:  # saved with the weights: training state the next step's routing depends on
            self.register_buffer("router_bias", torch.zeros(config.n_expert))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, C = x.shape
        E, k = self.n_expert, self.k
        flat = x.reshape(-1, C)  # (N, C)
        N = flat.size(0)
        probs = self.router(flat).float().softmax(dim=-1)  # (N, E)
        if self.bias_rate:  # the bias picks the experts; the weights stay the router's (DeepSeek-V3)
            chosen = (probs + self.router_bias).topk(k, dim=-1).indices
            weights = probs.gather(1, chosen)
        else:
            weights, chosen = probs.topk(k, dim=-1)  # (N, k)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros(N, C, device=flat.device, dtype=activation_dtype(flat))
        symbolic = has_no_data(flat)
        capacity = math.ceil(self.capacity_factor * N * k / E) if self.capacity_factor else None
        cuda_ok = flat.device.type != "cuda" or activation_dtype(flat) == torch.bfloat16  # its CUDA kernel: bf16
        if self.grouped and not symbolic and cuda_ok and grouped_experts_ok(self.experts):
            kept = self._grouped(flat, chosen, weights, capacity, out)
        else:
            kept = self._loop(flat, chosen, weights, capacity, out, symbolic)
        routed = F.one_hot(chosen, E).sum(dim=(0, 1)).float() / (N * k)  # f_e
        aux = E * (routed * probs.mean(dim=0)).sum()
        if self.training and not symbolic and not torch.compiler.is_compiling():
            entropy = -(probs * probs.clamp_min(1e-12).log()).sum(dim=-1).mean()
            self.stats = {"load": routed.detach(), "dropped": 1 - kept.float() / (N * k), "entropy": entropy.detach()}
            count_step_load(self, routed)
        return out.view(B, T, C), aux

    def _grouped(self, flat, chosen, weights, capacity, out) -> torch.Tensor:
        """Every expert at once: the routed slots sorted by expert (stable: token order within one, as the loop
        takes them), past-capacity slots dropped, then two grouped matrix multiplies. Adds into out; returns the
        slots kept."""
        k, E = self.k, self.n_expert
        expert_of = chosen.reshape(-1)
        order = torch.argsort(expert_of, stable=True)  # slot ids (token * k + j), by expert then token
        counts = torch.bincount(expert_of, minlength=E)
        if capacity is not None:
            first = torch.cumsum(counts, 0) - counts  # each expert's first position in `order`
            rank = torch.arange(order.numel(), device=order.device) - first[expert_of[order]]
            order, counts = order[rank < capacity], counts.clamp(max=capacity)
        token_idx, slot = order // k, order % k
        y = grouped_mlp(self.experts, flat[token_idx], counts)
        out.index_add_(0, token_idx, y * weights[token_idx, slot].unsqueeze(-1).to(y.dtype))
        return counts.sum()

    def _loop(self, flat, chosen, weights, capacity, out, symbolic: bool) -> torch.Tensor:
        """One expert at a time (the fallback, and the meta/fake path); adds into out; returns the slots kept."""
        N, k, E = chosen.size(0), self.k, self.n_expert
        kept = flat.new_zeros((), dtype=torch.long)
        for e, expert in enumerate(self.experts):
            if symbolic:  # balanced shares of the N*k slots (see the class docstring)
                count = N * k // E + (1 if e < N * k % E else 0)
                token_idx = torch.arange(count, device=flat.device) % N
                slot = torch.zeros_like(token_idx)
            else:
                token_idx, slot = (chosen == e).nonzero(as_tuple=True)  # in token order
                if capacity is not None:
                    token_idx, slot = token_idx[:capacity], slot[:capacity]
            kept = kept + token_idx.numel()
            y = expert(flat[token_idx])  # (n_e, C), in the autocast dtype under mixed precision
            out.index_add_(0, token_idx, y * weights[token_idx, slot].unsqueeze(-1).to(y.dtype))
        return kept


class AuxLossCarrier(torch.autograd.Function):
    """x passed through unchanged; in backward, `scale` also flows into aux (Megatron-Core's MoEAuxLossAutoScaler):
    a pipeline stage's load-balancing loss trains its routers without travelling to the last stage's loss. The
    schedule's 1/micro-batches gradient scale then applies to it as to the data loss."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(aux)
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (aux,) = ctx.saved_tensors
        return grad, torch.full_like(aux, ctx.scale), None


def grouped_experts_ok(experts: nn.ModuleList) -> bool:
    """Whether the experts can run as grouped matrix multiplies: torch has grouped_mm, and every expert is a plain
    MLP of plain Linears with plain-tensor weights (not adapted by LoRA, quantized, pruned to its own width, or a
    DTensor shard), their widths multiples of 8."""
    if not hasattr(F, "grouped_mm"):
        return False
    first = experts[0]
    for e in experts:
        for lin, ref in ((e.c_fc, first.c_fc), (e.c_proj, first.c_proj)):
            if type(lin) is not nn.Linear or type(lin.weight.data) is not torch.Tensor or lin.weight.shape != ref.weight.shape:
                return False
            if lin.in_features % 8 or lin.out_features % 8:  # the kernel wants rows of whole 16-byte units
                return False
    return True


def grouped_mlp(experts: nn.ModuleList, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """x (n, C), its rows sorted by expert, counts (E,) rows per expert -> the experts' MLP outputs (n, C): each
    projection one grouped matrix multiply over the experts' weights (GroupedLinear), in the autocast dtype."""
    offs = torch.cumsum(counts, 0).to(torch.int32)
    which = torch.repeat_interleave(torch.arange(len(experts), device=x.device), counts)  # each row's expert
    h = x.to(activation_dtype(x))
    for name in ("c_fc", "c_proj"):
        lins = [getattr(e, name) for e in experts]
        h = GroupedLinear.apply(h, offs, *[lin.weight for lin in lins])
        if lins[0].bias is not None:
            h = h + torch.stack([lin.bias for lin in lins]).to(h.dtype)[which]
        if name == "c_fc":
            h = experts[0].activate(h)
    return experts[0].dropout(h)


class GroupedLinear(torch.autograd.Function):
    """y = x_g W_e^T for the rows of each group e, as one torch.nn.functional.grouped_mm. The experts' weights are
    stacked for the multiply and stacked again in the backward: saved as themselves, so the backward keeps no copy
    of them (stacking in autograd would keep one per layer until the backward)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, offs: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        ctx.save_for_backward(x, offs, *weights)
        w = torch.stack(weights).to(x.dtype)  # (E, out, in)
        return F.grouped_mm(x, w.transpose(1, 2), offs=offs)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, offs, *weights = ctx.saved_tensors
        grad = grad.contiguous()
        gx = None
        if ctx.needs_input_grad[0]:
            gx = F.grouped_mm(grad, torch.stack(weights).to(grad.dtype), offs=offs)  # (n, out) x (E, out, in)
        gw = F.grouped_mm(grad.t(), x, offs=offs)  # (out, n) x (n, in), n jagged -> (E, out, in)
        return (gx, None, *[g.to(wt.dtype) for g, wt in zip(gw.unbind(0), weights)])


def count_step_load(moe: nn.Module, routed: torch.Tensor) -> None:
    """Add a training forward's expert load to the step's (the bias update reads every micro-batch of the step,
    so 1 process accumulating 2 micro-batches moves the biases as 2 ranks of 1 do)."""
    if moe.bias_rate:
        total, n = getattr(moe, "step_load", (0, 0))
        moe.step_load = (total + routed.detach(), n + 1)


@torch.no_grad()
def update_router_bias(model: nn.Module, average=None) -> None:
    """After a step: each MoE layer's bias moves by its rate toward an even load, down for an expert above the mean
    load and up below (DeepSeek-V3), the load the mean over the step's micro-batches. `average`: averages a tensor
    over data-parallel ranks, so every replica moves its biases alike."""
    for m in model.modules():  # the dense MoE, or its expert-parallel form (the same attributes)
        if getattr(m, "bias_rate", 0) and getattr(m, "step_load", (0, 0))[1]:
            total, n = m.step_load
            load = total / n if average is None else average(total / n)
            m.router_bias += m.bias_rate * torch.sign(load.mean() - load)
            m.step_load = (0, 0)


def routing_stats(model: nn.Module) -> dict | None:
    """The last training forward's routing over every MoE layer: each expert's share of the slots (mean over
    layers), the busiest expert's share over the even 1/E, the share of slots dropped, the router's entropy."""
    layers = [m.stats for m in model.modules() if isinstance(getattr(m, "stats", None), dict) and "load" in m.stats]
    if not layers:
        return None
    load = torch.stack([s["load"] for s in layers]).float()  # (layers, E)
    busiest = load.max(dim=1).values * load.size(1)  # per layer, over the even share
    out = {"expert_load": [round(x, 4) for x in load.mean(dim=0).tolist()],
           "max_over_mean_load": round(float(busiest.max()), 4),
           "dropped": round(float(torch.stack([s["dropped"] for s in layers]).mean()), 6),
           "router_entropy_nats": round(float(torch.stack([s["entropy"] for s in layers]).mean()), 4)}
    if "all_to_all_bytes" in layers[0]:  # expert parallelism: this rank's last micro-batch, every MoE layer
        for key in ("all_to_all_bytes", "all_to_all_bytes_formula"):
            out[key] = float(sum(s[key] for s in layers))
    return out


def has_no_data(t: torch.Tensor) -> bool:
    """True on the meta device and for fake tensors, where data-dependent shapes are impossible."""
    from minigpt.nn.torch_private import is_fake

    return t.device.type == "meta" or is_fake(t)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = make_norm(config)
        self.mlp = MoE(config) if config.is_moe else MLP(config)

    def forward(self, x, rope=None, cache=None, input_pos=None, attn_mask=None):
        """x (B, T, C) -> (x, aux): aux is the MoE load-balancing loss, or None for a dense MLP."""
        x = x + self.attn(self.ln_1(x), rope, cache, input_pos, attn_mask)
        y = self.mlp(self.ln_2(x))
        y, aux = y if isinstance(y, tuple) else (y, None)
        return x + y, aux


def embed_tokens(wte: nn.Embedding, wpe: nn.Embedding | None, drop: nn.Module, idx, positions) -> torch.Tensor:
    """(B, T) token ids -> (B, T, C): token (+ learned position) embeddings, then dropout. The GPT's forward
    and a pipeline's first stage both call it, with the GPT's own modules."""
    x = wte(idx)
    if wpe is not None:
        x = x + wpe(positions)
    return drop(x)


def rope_rows(module: nn.Module, positions) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cos/sin rows of `positions` (B|1, 1, T, D/2) from a module holding the RoPE tables, or None."""
    if getattr(module, "rope_cos", None) is None:
        return None
    return module.rope_cos[positions].unsqueeze(1), module.rope_sin[positions].unsqueeze(1)


class LMHead(nn.Linear):
    """The output projection; given targets it returns the cross-entropy instead of the logits.

    With targets the loss is computed chunk by chunk (`linear_cross_entropy`), never holding the
    (tokens x vocabulary) logits: the same matmuls, a fraction of the memory traffic.
    """

    packed = None  # a oneDNN-packed copy of the weight for inference on a CPU (nn/torch_private.prepack_linears)

    def __init__(self, n_embd: int, padded_vocab: int, vocab_size: int) -> None:
        super().__init__(n_embd, padded_vocab, bias=False)
        self.vocab_size = vocab_size

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if targets is None:
            if self.packed is not None:
                from minigpt.nn.torch_private import linear

                return linear(x, self.weight, None, self.packed)[..., : self.vocab_size]
            return F.linear(x, self.weight)[..., : self.vocab_size]  # padding rows dropped
        return linear_cross_entropy(x.reshape(-1, x.size(-1)), self.weight, targets.reshape(-1), self.vocab_size)


class GPT(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        Vp = config.padded_vocab_size
        self.wte = nn.Embedding(Vp, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.pos_emb == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = make_norm(config)
        self.lm_head = LMHead(config.n_embd, Vp, config.vocab_size)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight  # one matrix embeds and un-embeds (Press & Wolf 2017)
        if config.pos_emb == "rope":
            cos, sin = rope_tables(config.head_dim, config.block_size, config.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2's initialisation (Radford et al. 2019, section 2.3; nanoGPT).

        Every Linear and Embedding weight ~ N(0, 0.02), biases 0, norm weights 1. The two
        projections that write into the residual stream (attn.c_proj, mlp.c_proj) get
        std 0.02 / sqrt(2 * n_layer), so the residual's variance does not grow with depth.
        """
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.c_proj.weight, mean=0.0, std=residual_std)
            for mlp in (block.mlp.experts if self.config.is_moe else [block.mlp]):
                nn.init.normal_(mlp.c_proj.weight, mean=0.0, std=residual_std)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters, each shared tensor once (the analytic twin is flops.param_counts).

        non_embedding=True leaves out the token embedding, the learned position embedding and an
        untied LM head (Kaplan et al. 2020's N): what remains is the blocks and the final norm.
        """
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a tied matrix once
        if non_embedding:
            n -= self.wte.weight.numel()
            if self.wpe is not None:
                n -= self.wpe.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def forward(self, idx, targets=None, *, input_pos=None, positions=None, cache: KVCache | PagedKVCache | None = None,
                attn_mask=None, last_only: bool = False) -> ModelOutput:
        """idx (B, T) token ids -> ModelOutput(logits, loss, aux_loss).

        targets (B, T): next-token ids, -1 where ignored: returns the mean cross-entropy (nats)
        and no logits. input_pos (T,): the cache slots of these tokens, also their positions
        (default 0..T-1), or (B, T) each row's own slots (then give positions and attn_mask), or a Ragged
        flat batch (B = 1) over a PagedKVCache (nn/ragged.py; give positions; logits of its `out` tokens);
        positions (B, T): per-row positions when they differ from input_pos (left-padded batches); cache: a KVCache read and written at input_pos; attn_mask
        (B|1, 1, T, S) bool, True = may attend (default: causal, or every cache slot up to the
        query's own); last_only: logits of the last position only.
        """
        B, T = idx.shape
        if input_pos is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of {T} tokens exceeds block_size {self.config.block_size}")
            input_pos = torch.arange(T, device=idx.device)
        if positions is None:
            positions = input_pos.unsqueeze(0)  # (1, T)
        ragged = isinstance(input_pos, Ragged)
        if cache is not None and attn_mask is None and not ragged:
            slots = torch.arange(cache.max_len, device=idx.device)
            attn_mask = (slots.unsqueeze(0) <= input_pos.unsqueeze(1))[None, None]  # (1, 1, T, S)
        x = embed_tokens(self.wte, self.wpe, self.drop, idx, positions)  # (B, T, C)
        rope = rope_rows(self, positions)  # (B|1, 1, T, D/2), or None
        aux_loss = None
        for block in self.blocks:
            x, aux = block(x, rope, cache, input_pos, attn_mask)
            if aux is not None:
                aux_loss = aux if aux_loss is None else aux_loss + aux
        x = self.ln_f(x)
        if targets is not None:
            return ModelOutput(None, self.lm_head(x, targets), aux_loss)
        if last_only:
            x = x[:, -1:, :]
        elif ragged:  # the tokens whose next token is wanted
            x = x[:, input_pos.out]
        return ModelOutput(self.lm_head(x), None, aux_loss)

    def make_cache(self, batch_size: int, max_len: int | None = None, dtype=None) -> KVCache:
        w = self.wte.weight
        return KVCache(self.config, batch_size, max_len or self.config.block_size, w.device, dtype or w.dtype)

    def make_paged_cache(self, n_blocks: int, dtype=None) -> PagedKVCache:
        """A pool of n_blocks blocks of keys and values (nn/ragged.py) for the serving engine's flat batches."""
        w = self.wte.weight
        return PagedKVCache(self.config, n_blocks, w.device, dtype or w.dtype)
