"""Hugging Face `config.json` <-> minigpt `[model]`, torch-free (the analytic commands read them).

Families whose layout the model in model.py computes exactly:

    gpt2                      learned positions, LayerNorm, GELU (tanh), biases everywhere, tied head
    llama, mistral            RoPE, RMSNorm, SwiGLU, GQA, optional biases, tied or untied head
    qwen2                     as llama, with Q/K/V biases and no output-projection bias
    mixtral                   as mistral, with a top-k mixture of SwiGLU experts (n_expert)

The vocabulary is kept exact (pad_vocab_multiple = 1), so parameter counts equal the HF model's
`num_parameters()`. `for_weights=True` (converting weights, not only counting) also refuses what
would change the logits: RoPE scaling, a sliding window shorter than the context, other
activations.
"""

from __future__ import annotations

from pathlib import Path

from minigpt.core.config import ModelConfig, SampleConfig, read_json
from minigpt.core.errors import UserError

FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "mixtral")
ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "mixtral": "MixtralForCausalLM"}
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def is_hf_config(raw: dict) -> bool:
    return isinstance(raw, dict) and "model_type" in raw


def model_from_hf(raw: dict, origin: str = "config.json", for_weights: bool = False) -> ModelConfig:
    """The minigpt ModelConfig of an HF config.json (a dict), validated."""
    family = raw.get("model_type")
    if not isinstance(family, str) or family not in FAMILIES:
        raise UserError(f"{origin}: model_type {family!r} is not supported; supported: {', '.join(FAMILIES)} "
                        f"({', '.join(ARCHITECTURES.values())})")
    if for_weights and family == "mixtral":
        raise UserError(f"{origin}: converting Mixtral weights is not supported (its config works as a target "
                        f"for flops, memory and extrapolate)")
    try:
        c = _gpt2(raw, origin, for_weights) if family == "gpt2" else _llama_like(raw, family, origin, for_weights)
        c.validate()
    except UserError as e:
        raise UserError(f"{origin}: {e}") from None
    except KeyError as e:
        raise UserError(f"{origin}: {e.args[0]!r} is missing: a {family} config.json gives it") from None
    except (TypeError, ValueError, AttributeError) as e:  # a value of the wrong type met arithmetic
        raise UserError(f"{origin}: a value has the wrong type for a {family} config ({str(e)[:120]})") from None
    return c


def _gpt2(raw: dict, origin: str, for_weights: bool) -> ModelConfig:
    act = raw.get("activation_function", "gelu_new")
    if for_weights:
        if act not in TANH_GELUS:
            raise UserError(f"{origin}: activation_function {act!r} is not the tanh GELU minigpt computes "
                            f"({', '.join(TANH_GELUS)}); the logits would differ")
        for key in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if raw.get(key):
                raise UserError(f"{origin}: {key} = true has no minigpt equivalent; the logits would differ")
    return ModelConfig(
        n_layer=raw["n_layer"], n_head=raw["n_head"], n_embd=raw["n_embd"], block_size=raw["n_positions"],
        vocab_size=raw["vocab_size"], ffn_hidden=raw.get("n_inner") or 4 * raw["n_embd"], mlp="gelu",
        norm="layernorm", pos_emb="learned", tie_embeddings=raw.get("tie_word_embeddings", True), bias=True,
        norm_eps=raw.get("layer_norm_epsilon", 1e-5), pad_vocab_multiple=1)


def _rope_theta(raw: dict, origin: str, for_weights: bool) -> float:
    params = raw.get("rope_parameters") or {}  # transformers >= 5 nests them
    scaling = raw.get("rope_scaling") or params
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if for_weights and kind not in ("default", None):
        raise UserError(f"{origin}: RoPE scaling {kind!r} is not implemented in minigpt; the logits would differ")
    return float(raw.get("rope_theta") or params.get("rope_theta") or 10000.0)


def _llama_like(raw: dict, family: str, origin: str, for_weights: bool) -> ModelConfig:
    if raw.get("hidden_act", "silu") != "silu":
        raise UserError(f"{origin}: hidden_act {raw['hidden_act']!r}: minigpt's SwiGLU uses silu")
    h, heads, ctx = raw["hidden_size"], raw["num_attention_heads"], raw["max_position_embeddings"]
    window = raw.get("sliding_window") if raw.get("use_sliding_window", family != "qwen2") else None
    if for_weights and window and window < ctx:
        raise UserError(f"{origin}: sliding_window = {window} < max_position_embeddings = {ctx}: minigpt attends "
                        f"to the whole context; the logits would differ past {window} tokens")
    bias = bool(raw.get("attention_bias", False))
    moe = family == "mixtral"
    return ModelConfig(
        n_layer=raw["num_hidden_layers"], n_head=heads, n_kv_head=raw.get("num_key_value_heads") or heads,
        n_embd=h, head_dim=raw.get("head_dim") or h // heads, block_size=ctx, vocab_size=raw["vocab_size"],
        ffn_hidden=raw["intermediate_size"], mlp="swiglu", norm="rmsnorm", pos_emb="rope",
        tie_embeddings=bool(raw.get("tie_word_embeddings", False)), bias=False,
        attention_bias=bias, qkv_bias=True if family == "qwen2" else bias, mlp_bias=bool(raw.get("mlp_bias", False)),
        rope_theta=_rope_theta(raw, origin, for_weights), norm_eps=raw.get("rms_norm_eps", 1e-6),
        n_expert=raw.get("num_local_experts", 0) if moe else 0,
        n_expert_active=raw.get("num_experts_per_tok", 2) if moe else 0, pad_vocab_multiple=1)


def hf_family(c: ModelConfig) -> str:
    """Which HF family a minigpt model exports to; a one-line refusal naming the option otherwise."""
    if c.is_moe:
        raise UserError(f"model.n_expert = {c.n_expert}: exporting a mixture of experts is not supported "
                        f"(dense GPT-2 and Llama layouts only)")
    if c.qk_norm:
        raise UserError("model.qk_norm = true: neither GPT-2 nor Llama normalises queries and keys; export refuses it "
                        "(train with qk_norm = false to export)")
    layouts = "GPT-2 is learned + layernorm + gelu, Llama is rope + rmsnorm + swiglu"
    if (c.pos_emb, c.norm, c.mlp) == ("learned", "layernorm", "gelu"):
        if c.n_kv_head != c.n_head or c.head_dim * c.n_head != c.n_embd:
            raise UserError(f"model.n_kv_head = {c.n_kv_head} / model.head_dim = {c.head_dim}: GPT-2 has neither "
                            f"grouped-query attention nor a free head_dim")
        return "gpt2"
    if (c.pos_emb, c.norm, c.mlp) == ("rope", "rmsnorm", "swiglu"):
        if c.qkv_bias and not c.attention_bias and not c.mlp_bias:
            return "qwen2"
        if c.qkv_bias != c.attention_bias:
            raise UserError(f"model.qkv_bias = {c.qkv_bias} with model.attention_bias = {c.attention_bias} has "
                            f"no Hugging Face layout (Llama: both or neither; Qwen2: Q/K/V biases alone)")
        return "llama"
    raise UserError(f"model.pos_emb = {c.pos_emb!r}, model.norm = {c.norm!r}, model.mlp = {c.mlp!r}: no Hugging "
                    f"Face equivalent ({layouts})")


def hf_from_model(c: ModelConfig, bos_id: int | None, eos_id: int | None) -> dict:
    """config.json for the HF family of `c` (see hf_family); the vocabulary without padding rows."""
    family = hf_family(c)
    common = {"architectures": [ARCHITECTURES[family]], "model_type": family, "vocab_size": c.vocab_size,
              "tie_word_embeddings": c.tie_embeddings, "bos_token_id": bos_id, "eos_token_id": eos_id,
              "torch_dtype": "float32"}
    if family == "gpt2":
        return {**common, "n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd, "n_positions": c.block_size,
                "n_inner": c.ffn_hidden, "activation_function": "gelu_new", "layer_norm_epsilon": c.norm_eps,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    out = {**common, "hidden_size": c.n_embd, "intermediate_size": c.ffn_hidden, "num_hidden_layers": c.n_layer,
           "num_attention_heads": c.n_head, "num_key_value_heads": c.n_kv_head, "head_dim": c.head_dim,
           "max_position_embeddings": c.block_size, "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta,
           "hidden_act": "silu", "attention_dropout": 0.0}
    if family == "llama":
        out.update(attention_bias=c.attention_bias, mlp_bias=c.mlp_bias)
    else:
        out.update(use_sliding_window=False)
    return out


def hf_stop_token(src: Path) -> tuple[str, int | None]:
    """The EOS token of an HF folder (generation_config.json, then config.json): (text, id)."""
    from tokenizers import Tokenizer

    gen = src / "generation_config.json"
    eos = (read_json(gen, "generation config") if gen.is_file() else {}).get("eos_token_id")
    eos = read_json(src / "config.json", "config").get("eos_token_id") if eos is None else eos
    eos = eos[0] if isinstance(eos, list) else eos
    text = Tokenizer.from_file(str(src / "tokenizer.json")).id_to_token(eos) if eos is not None else None
    return text or SampleConfig.stop_token, eos
