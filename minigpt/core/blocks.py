"""What the model is made of, written once: a torch-free inventory of every part of the GPT.

Every reader of the model's shape takes it from here: `nn/model.py` builds its Linear layers from the
shapes, `analytic/flops.py` sums the parameters and FLOPs, `analytic/memory.py` sums the tensors autograd
saves, `measure/counted.py` books the counted FLOPs by `component`, `measure/simulate.py` and
`parallel/sharding.py` split by `tp`, `interop/hf.py` maps the `hf` names, `nn/lora.py` and
`nn/quantize.py` take their targets from `lora` / `quantize`. Torch-free. A new block feature is one `Part` here
plus its module in model.py; tests/test_blocks.py fails when a part is not costed by every reader or
when the built model holds a parameter this inventory does not name.

A part is one module of a block (`attn.c_attn`, `mlp.experts.*.c_fc`: `*` stands for each expert) or of
the model's root (`wte`, `lm_head`), or an operation without weights that still costs FLOPs or memory
(the attention core, RoPE). Its `saves` list what autograd keeps of it for the backward pass, per token
of a micro-batch, worked out from model.py and checked against PyTorch's MemTracker (tests/test_memory.py).

Notation as in model.py: h = n_embd, H = n_head, G = n_kv_head, D = head_dim, ff = ffn_hidden,
E = n_expert, k = n_expert_active, Vp = the padded vocabulary, T = the sequence length.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from minigpt.core.config import LORA_TARGETS, ModelConfig

TP_STYLES = ("column", "row", "replicate", "sequence")  # see Part.tp
SAVE_DTYPES = ("act", "fp32", "int64")
SAVE_SCALES = ("token", "token_seq", "seq", "once")
SAVE_WHEN = ("always", "fp32", "autocast")


@dataclass(frozen=True)
class Saved:
    """A tensor autograd keeps for the backward pass.

    elements: per token of the micro-batch ("token"), per token times the sequence length ("token_seq": a
    T x T attention matrix), per sequence position ("seq"), or once ("once": a weight's 16-bit copy).
    dtype: "act" is the matmul-input dtype (fp32, or the 16-bit autocast dtype); "fp32" and "int64" stay so.
    when: saved in every precision, in fp32 only, or under 16-bit autocast only.
    tp_split: tensor parallelism splits it (a head's or a hidden unit's values live on one rank); the rest
    (norm and projection inputs, the router's tensors) is whole on every rank unless sequence parallelism
    splits it along the sequence."""

    what: str
    elements: float
    dtype: str = "act"
    scale: str = "token"
    when: str = "always"
    tp_split: bool = False  # divided among tensor-parallel ranks (heads, hidden units); else whole on each

    def bytes(self, n_tokens: int, seq_len: int, act_bytes: int) -> float:
        autocast = act_bytes != 4
        if (self.when == "fp32" and autocast) or (self.when == "autocast" and not autocast):
            return 0.0
        size = {"act": act_bytes, "fp32": 4, "int64": 8}[self.dtype]
        count = {"token": n_tokens, "token_seq": n_tokens * seq_len, "seq": seq_len, "once": 1}[self.scale]
        return self.elements * count * size


@dataclass(frozen=True)
class Part:
    """One module (or weightless operation) of a block or of the model's root.

    shape: the weight's shape as torch holds it ((out, in) for a Linear, (rows, width) for an Embedding,
    (width,) for a norm); () for an operation without weights. bias: bias elements (0: none).
    copies / active: how many of it a block holds (E experts) and how many one token runs (k).
    flops: forward FLOPs per token of one active copy (2 x in x out for a Linear; the attention core
    4 T H D over the full T x T square, as PyTorch's counter counts it).
    component: the name counted FLOPs are booked under (measure/counted.py).
    tp: how tensor parallelism splits it: "column" (output rows split, bias too), "row" (input columns
    split, bias replicated), "sequence" (replicated weights, activations split along the sequence under
    sequence parallelism: the norms), "replicate". ep: copies split over expert-parallel ranks.
    fused: row blocks of a fused weight (q, k, v; gate, up): tensor parallelism slices each block.
    hf: Hugging Face tensor names (without .weight/.bias; {i} the layer) by family; several names are
    concatenated along dim 0 in `fused` order. hf_rows: the HF tensor has vocab_size rows, not Vp.
    quantize: a target of weight-only quantization. `lora`: a Linear whose own name is one of the names
    `train.lora_targets` accepts (config.LORA_TARGETS): so never the router or the LM head.
    tied: the weight is another part's (the LM head tied to the embedding): counted once."""

    name: str
    kind: str  # "embedding" | "linear" | "router" | "norm" | "op"
    shape: tuple[int, ...] = ()
    bias: int = 0
    copies: int = 1
    active: int = 1
    flops: float = 0.0
    component: str | None = None
    tp: str = "replicate"
    ep: bool = False
    fused: tuple[int, ...] = ()
    hf: dict[str, tuple[str, ...]] = field(default_factory=dict)
    hf_rows: bool = False
    quantize: bool = False
    tied: bool = False
    saves: tuple[Saved, ...] = ()

    @property
    def weight_params(self) -> int:
        return 0 if self.tied or not self.shape else numel(self.shape)

    @property
    def params(self) -> int:
        """Parameters of one copy (weight + bias), a tied weight not counted."""
        return self.weight_params + self.bias

    @property
    def is_matmul(self) -> bool:
        """Its weight multiplies activations (the Linear layers, the router and the LM head)."""
        return self.kind in ("linear", "router")

    @property
    def lora(self) -> bool:
        return self.kind == "linear" and self.leaf in LORA_TARGETS

    @property
    def leaf(self) -> str:
        """The module's own name (`c_attn`): what LoRA targets are given as."""
        return self.name.rsplit(".", 1)[-1]

    def params_per_rank(self, tp: int, ep: int = 1) -> float:
        """Parameters of all its copies one tensor- and expert-parallel rank holds (see `tp`, `ep`)."""
        weight = self.weight_params / (tp if self.tp in ("column", "row") else 1)
        bias = self.bias / (tp if self.tp == "column" else 1)
        return (weight + bias) * self.copies / (ep if self.ep else 1)

    def param_names(self) -> list[str]:
        """Its parameters' names inside the block (or the root), experts expanded."""
        if not self.shape:
            return []
        names = [f"{self.name}.weight"] + ([f"{self.name}.bias"] if self.bias else [])
        if self.tied:
            return []
        if "*" in self.name:
            return [n.replace("*", str(e)) for e in range(self.copies) for n in names]
        return names


@dataclass(frozen=True)
class Inventory:
    layer: tuple[Part, ...]  # one transformer block (every block is the same)
    root: tuple[Part, ...]  # embeddings before the blocks, final norm and LM head after
    n_layer: int

    def parts(self) -> tuple[Part, ...]:
        return self.layer + self.root

    def get(self, name: str) -> Part:
        for p in self.parts():
            if p.name == name:
                return p
        raise KeyError(name)

    def row_parallel_outputs(self) -> int:
        """All-reduces of b s h values one layer's forward makes under tensor parallelism: one per row-parallel
        matmul a token passes through (attention's output projection, the MLP's second Linear or, in a
        mixture, each of the k experts' over its own tokens). Dense 2; a mixture 1 + k."""
        return sum(p.active for p in self.layer if p.tp == "row" and p.is_matmul)

    def find(self, module_path: str) -> Part | None:
        """The part a module of the built model is (`blocks.3.mlp.experts.1.c_fc` -> `mlp.experts.*.c_fc`)."""
        bits = module_path.split(".")
        if bits[0] == "blocks" and len(bits) > 2:
            bits = bits[2:]
            if len(bits) > 2 and bits[1] == "experts":
                bits[2] = "*"
            name, parts = ".".join(bits), self.layer
        else:
            name, parts = module_path, self.root
        return next((p for p in parts if p.name == name), None)


def numel(shape) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def inventory(c: ModelConfig) -> Inventory:
    """Every part of the GPT that `c` describes, in the order a token meets them."""
    return Inventory(tuple(_norm(c, "ln_1", "input_layernorm") + _attention(c) + _norm(c, "ln_2", "post_attention_layernorm")
                           + _mlp(c)), tuple(_head(c)), c.n_layer)


def _norm(c: ModelConfig, name: str, llama: str) -> list[Part]:
    """LayerNorm (weight, bias with model.bias) or RMSNorm: saves its fp32 input and statistics (RMSNorm
    also the normalised input)."""
    h, bias = c.n_embd, _norm_bias(c)
    if c.norm == "rmsnorm":
        saves = (Saved("norm input, normalised input", 2 * h, "fp32"), Saved("rstd", 1, "fp32"))
    else:
        saves = (Saved("norm input", h, "fp32"), Saved("mean, rstd", 2, "fp32"))
    hf = {"gpt2": (f"transformer.h.{{i}}.{name}",) if name != "ln_f" else ("transformer.ln_f",),
          "llama": (f"model.layers.{{i}}.{llama}",) if name != "ln_f" else ("model.norm",)}
    return [Part(name, "norm", (h,), bias, tp="sequence", hf=hf, saves=saves)]


def _norm_bias(c: ModelConfig) -> int:
    """A norm's bias elements: LayerNorm has one with model.bias; RMSNorm never."""
    return c.n_embd if (c.norm == "layernorm" and c.bias) else 0


def _attention(c: ModelConfig) -> list[Part]:
    h, H, G, D = c.n_embd, c.n_head, c.n_kv_head, c.head_dim
    q, kv = H * D, G * D
    rope, qkn, drop = c.pos_emb == "rope", c.qk_norm, c.dropout > 0
    layer = "model.layers.{i}.self_attn."
    parts = [Part("attn.c_attn", "linear", (q + 2 * kv, h), (q + 2 * kv) if c.qkv_bias else 0,
                  flops=2 * h * (q + 2 * kv), component="qkv_proj", tp="column", fused=(q, kv, kv),
                  hf={"gpt2": ("transformer.h.{i}.attn.c_attn",), "llama": tuple(f"{layer}{n}_proj" for n in "qkv")},
                  quantize=True, saves=_linear_saves(c, h, q + 2 * kv))]
    if qkn:  # QK-norm: RMSNorm over each head's D channels of q and of k (learned scale, shared by heads)
        parts += [_qk_norm(c, "attn.q_norm", q, H), _qk_norm(c, "attn.k_norm", kv, G)]
    if rope:  # the rotated q and k are new tensors (no weights: RoFormer, Su et al. 2021)
        parts.append(Part("attn.rope", "op", saves=(Saved("rotated q, k", q + kv, tp_split=True),)))
    parts.append(Part("attn.core", "op", flops=4 * H * D, component="attention", saves=_core_saves(c)))
    out_saves = _linear_saves(c, q, h, split_input=True) + ((Saved("residual dropout mask", h),) if drop else ())
    parts.append(Part("attn.c_proj", "linear", (h, q), h if c.attention_bias else 0, flops=2 * q * h,
                      component="attn_out_proj", tp="row",
                      hf={"gpt2": ("transformer.h.{i}.attn.c_proj",), "llama": (f"{layer}o_proj",)},
                      quantize=True, saves=out_saves))
    return parts


def _linear_saves(c: ModelConfig, n_in: int, n_out: int, split_input: bool = False) -> tuple[Saved, ...]:
    """A Linear keeps its input (n_in per token, in the matmul dtype; split over tp ranks for a row-parallel
    one) and, under autocast, its weight's 16-bit copy."""
    return (Saved("input", n_in, tp_split=split_input),
            Saved("16-bit weight copy", n_in * n_out, scale="once", when="autocast", tp_split=True))


def _qk_norm(c: ModelConfig, name: str, width: int, heads: int) -> Part:
    """RMSNorm of q or k (width = heads x D per token). In fp32 the fused kernel keeps a contiguous copy of its
    (strided) input and the rstd; under autocast the 16-bit input meets an fp32 scale, so torch takes the
    composite path, which keeps the input upcast to fp32 and the normalised fp32 tensor. Without RoPE its
    output is what SDPA keeps (with RoPE the rotation keeps only its cos/sin tables)."""
    saves = [Saved("contiguous input", width, "fp32", when="fp32", tp_split=True),
             Saved("fp32 input, normalised input", 2 * width, "fp32", when="autocast", tp_split=True),
             Saved("rstd", heads, "fp32", tp_split=True)]
    if c.pos_emb != "rope":
        saves.append(Saved("normalised output (SDPA's input)", width, tp_split=True))
    return Part(name, "norm", (c.head_dim,), 0, tp="replicate", saves=tuple(saves))


def _core_saves(c: ModelConfig) -> tuple[Saved, ...]:
    """What attention keeps between its projections. Fused SDPA (no dropout): the q, k, v buffer and the
    log-sum-exp; with RoPE or QK-norm its inputs are fresh (B, H, T, D) tensors, so the transpose before the
    output projection copies its output once more. Dropout > 0 on CPU takes the math path, which works in
    fp32 under autocast: q, k, v upcast (k, v expanded to n_head heads), and three B H T^2 fp32 tensors (the
    softmax, the dropout mask, the dropped probabilities)."""
    H, G, D = c.n_head, c.n_kv_head, c.head_dim
    fresh = (Saved("output copy (B, H, T, D) -> (B, T, H D)", H * D, tp_split=True),) if (c.pos_emb == "rope" or c.qk_norm) else ()
    if c.dropout == 0:
        return (Saved("q, k, v buffer", (H + 2 * G) * D, tp_split=True), Saved("log-sum-exp", H, "fp32", tp_split=True)) + fresh
    return (Saved("q, k, v buffer", (H + 2 * G) * D, when="fp32", tp_split=True),
            Saved("q, k, v upcast", 3 * H * D, "fp32", when="autocast", tp_split=True),
            Saved("softmax, dropout mask, dropped probabilities", 3 * H, "fp32", scale="token_seq", tp_split=True)) + fresh


def _activation_width(c: ModelConfig) -> int:
    """Elements per token the MLP's activation keeps: GELU and ReLU^2 their input and output (2 ff), SwiGLU the
    fused gate/up buffer, silu(gate) and the product (4 ff)."""
    return (4 if c.mlp == "swiglu" else 2) * c.ffn_hidden


def _mlp(c: ModelConfig) -> list[Part]:
    h, ff = c.n_embd, c.ffn_hidden
    fc_out = 2 * ff if c.mlp == "swiglu" else ff
    fused = (ff, ff) if c.mlp == "swiglu" else ()
    drop = (Saved("residual dropout mask", h),) if c.dropout > 0 else ()
    llama = "model.layers.{i}.mlp."
    fc_hf = {"gpt2": ("transformer.h.{i}.mlp.c_fc",), "llama": (f"{llama}gate_proj", f"{llama}up_proj")}
    proj_hf = {"gpt2": ("transformer.h.{i}.mlp.c_proj",), "llama": (f"{llama}down_proj",)}
    if not c.is_moe:
        act = Saved("activation tensors", _activation_width(c), tp_split=True)
        return [Part("mlp.c_fc", "linear", (fc_out, h), fc_out if c.mlp_bias else 0, flops=2 * h * fc_out,
                     component="mlp", tp="column", fused=fused, hf=fc_hf, quantize=True,
                     saves=_linear_saves(c, h, fc_out) + (act,)),
                Part("mlp.c_proj", "linear", (h, ff), h if c.mlp_bias else 0, flops=2 * ff * h, component="mlp",
                     tp="row", hf=proj_hf, quantize=True, saves=_linear_saves(c, ff, h)[1:] + drop)]
    E, k = c.n_expert, c.n_expert_active
    # the router: its input, probabilities (fp32), top-k indices (int64) and renormalised weights, the routed share
    router = Part("mlp.router", "router", (E, h), 0, flops=2 * h * E, component="router",
                  saves=(Saved("router input", h), Saved("probabilities", E, "fp32"), Saved("top-k indices", k, "int64"),
                         Saved("top-k weights", k, "fp32"), Saved("routed share", 1, "fp32"),
                         Saved("16-bit weight copy", E * h, scale="once", when="autocast")))
    # per routed token copy (k per token): the expert's input, its activation tensors, its output (kept for the
    # weighting), the gathered weight, the weighted output index_add_ keeps, and the token and slot indices
    # (the input and activation tensors with c_fc, what follows c_proj with it)
    routed_in = (Saved("expert input", k * h), Saved("activation tensors", k * _activation_width(c), tp_split=True))
    routed_out = (Saved("expert output, weighted output", 2 * k * h), Saved("gathered routing weight", k),
                  Saved("token and slot indices", 2 * k, "int64"))
    # autocast keeps each expert Linear's 16-bit weight copy for the backward; the grouped matrix multiplies
    # (model.moe_grouped_mm, widths multiples of 8) keep the weights themselves and cast again in the backward
    grouped = c.moe_grouped_mm and not (h % 8 or ff % 8 or fc_out % 8)
    copy = lambda n: () if grouped else (Saved("16-bit weight copy", n, scale="once", when="autocast", tp_split=True),)  # noqa: E731
    expert_drop = (Saved("expert dropout masks", k * h),) if c.dropout > 0 else ()  # each routed copy's own
    return [router,
            Part("mlp.experts.*.c_fc", "linear", (fc_out, h), fc_out if c.mlp_bias else 0, copies=E, active=k,
                 flops=2 * h * fc_out, component="mlp", tp="column", ep=True, fused=fused, quantize=True,
                 saves=routed_in + copy(E * h * fc_out)),
            Part("mlp.experts.*.c_proj", "linear", (h, ff), h if c.mlp_bias else 0, copies=E, active=k,
                 flops=2 * ff * h, component="mlp", tp="row", ep=True, quantize=True,
                 saves=routed_out + copy(E * ff * h) + expert_drop)]


def _head(c: ModelConfig) -> list[Part]:
    """The root: token (and learned position) embeddings, the final norm, the LM head. The fused LM-head
    cross-entropy computes its gradients in forward and keeps them, d_h (n h fp32) and d_W (Vp h fp32),
    instead of the n x V logits; plus the token count. Once per micro-batch: the position ids (learned) or
    the RoPE cos/sin rows, the loss scalar, and the embedding dropout's mask."""
    h, Vp = c.n_embd, c.padded_vocab_size
    pos = (Saved("position ids", 1, "int64", scale="seq"),) if c.pos_emb == "learned" else \
        (Saved("RoPE cos/sin rows", c.head_dim, "fp32", scale="seq"),)
    emb_saves = pos + (Saved("loss scalar", 1, "fp32", scale="once"),)
    if c.dropout > 0:
        emb_saves += (Saved("embedding dropout mask", h, "fp32"),)
    parts = [Part("wte", "embedding", (Vp, h), hf={"gpt2": ("transformer.wte",), "llama": ("model.embed_tokens",)},
                  hf_rows=True, saves=emb_saves)]
    if c.pos_emb == "learned":
        parts.append(Part("wpe", "embedding", (c.block_size, h), hf={"gpt2": ("transformer.wpe",)}))
    parts += _norm(c, "ln_f", "norm")
    parts.append(Part("lm_head", "linear", (Vp, h), 0, flops=2 * h * Vp, component="lm_head", quantize=True,
                      tied=c.tie_embeddings, hf={} if c.tie_embeddings else {"gpt2": ("lm_head",), "llama": ("lm_head",)},
                      hf_rows=True,
                      saves=(Saved("d_h", h, "fp32"), Saved("d_W", Vp * h, "fp32", scale="once"),
                             Saved("token count", 1, "fp32", scale="once"))))
    return parts
