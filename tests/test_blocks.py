"""The model written once: the inventory (core/blocks.py) is what the built model holds, and every reader
costs every part of it (parameters, counted FLOPs, saved activations, tensor/expert splits, HF names,
LoRA and quantization targets). Memory predicted from it matches PyTorch's MemTracker across features."""

import dataclasses

import pytest
import torch

from minigpt.analytic import flops as F
from minigpt.core.blocks import SAVE_DTYPES, SAVE_SCALES, SAVE_WHEN, TP_STYLES, inventory, numel
from minigpt.core.config import LORA_TARGETS, ModelConfig
from minigpt.measure.counted import COMPONENTS, _classify, count_train_flops, memory_report
from minigpt.measure.simulate import params_per_rank
from minigpt.nn.model import GPT

BASE = dict(n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=500)
FEATURES = {
    "plain": {},
    "qk_norm": {"qk_norm": True},
    "relu2": {"mlp": "relu2"},
    "swiglu": {"mlp": "swiglu"},
    "rope": {"pos_emb": "rope"},
    "rmsnorm": {"norm": "rmsnorm"},
    "gqa": {"n_kv_head": 2},
    "untied": {"tie_embeddings": False},
    "biases": {"bias": True},
    "moe": {"n_expert": 4},
    "modern": {"qk_norm": True, "pos_emb": "rope", "norm": "rmsnorm", "mlp": "relu2", "tie_embeddings": False},
    "moe_modern": {"qk_norm": True, "n_expert": 4, "n_expert_active": 1, "mlp": "swiglu", "n_kv_head": 2,
                   "norm": "rmsnorm", "pos_emb": "rope"},
}


def config(name: str) -> ModelConfig:
    return ModelConfig(**{**BASE, **FEATURES[name]})


@pytest.mark.parametrize("name", FEATURES)
def test_the_built_model_holds_exactly_what_the_inventory_lists(name):
    c = config(name)
    with torch.device("meta"):
        model = GPT(c)
    inv = inventory(c)
    expected = {}
    for part in inv.layer:
        for pname in part.param_names():
            expected.update({f"blocks.{i}.{pname}": None for i in range(c.n_layer)})
    for part in inv.root:
        expected.update(dict.fromkeys(part.param_names()))
    held = dict(model.named_parameters())
    assert set(held) == set(expected), set(held) ^ set(expected)
    for pname, p in held.items():
        part = inv.find(pname.rsplit(".", 1)[0])
        want = part.shape if pname.endswith(".weight") else (part.bias,)
        assert tuple(p.shape) == want, pname
    assert F.param_counts(c).total == model.num_params()
    assert F.param_counts(c).non_embedding == model.num_params(non_embedding=True)


@pytest.mark.parametrize("name", FEATURES)
def test_every_part_is_costed_by_every_reader(name):
    c = config(name)
    inv = inventory(c)
    for part in inv.parts():
        assert part.tp in TP_STYLES, part.name
        for s in part.saves:
            assert (s.dtype, s.scale, s.when) in {(d, sc, w) for d in SAVE_DTYPES for sc in SAVE_SCALES for w in SAVE_WHEN}
        if part.kind != "embedding":  # memory: every part that runs in forward says what it keeps
            assert part.saves, f"{part.name} has no saved tensors: memory.activation_bytes cannot cost it"
        if part.is_matmul:  # FLOPs, the counter's components, the step-time GEMMs
            assert part.flops == 2 * numel(part.shape), part.name
            assert part.component in COMPONENTS, part.name
            path = f"GPT.blocks.0.{part.name.replace('*', '1')}" if part in inv.layer else f"GPT.{part.name}"
            assert _classify(inv, path) == part.component, part.name
            assert part.quantize == (part.kind == "linear"), part.name  # the router stays in full precision
        if part.lora:
            assert part.leaf in LORA_TARGETS and part.kind == "linear" and part in inv.layer
    # the eager kernel count costs every part, or refuses the model naming the part it does not cost
    from minigpt.analytic import eager
    from minigpt.core.errors import UserError

    uncosted = [p.name for p in inv.layer if p.name not in eager.COSTED_PARTS]
    if uncosted:
        with pytest.raises(UserError, match=uncosted[0].replace(".", r"\.")):
            eager.check_covered(c, "kernels fused")
    else:
        eager.check_covered(c, "kernels fused")
    # simulate's per-rank parameters add up to the model's at tp = ep = 1, and halve the split parts at tp = 2
    assert params_per_rank(c, 1).total == F.param_counts(c).total
    split = sum(p.params * p.copies for p in inv.layer if p.tp in ("column", "row"))
    row_bias = sum(p.bias * p.copies for p in inv.layer if p.tp == "row")
    assert params_per_rank(c, 1).block - params_per_rank(c, 2).block == pytest.approx((split - row_bias) / 2)


@pytest.mark.parametrize("name", ["plain", "biases", "untied", "swiglu_llama"])
def test_the_hf_layout_names_every_parameter(name):
    from minigpt.interop.hf import layout

    llama = {"mlp": "swiglu", "norm": "rmsnorm", "pos_emb": "rope", "n_kv_head": 2, "tie_embeddings": False}
    c = ModelConfig(**{**BASE, **llama}) if name == "swiglu_llama" else config(name)
    with torch.device("meta"):
        model = GPT(c)
    mapped = {ours for ours, _, _ in layout(c, "llama" if c.mlp == "swiglu" else "gpt2")}
    missing = {n for n, _ in model.named_parameters()} - mapped
    assert not missing, f"no Hugging Face name for {sorted(missing)[:3]}: give the part `hf` names"


@pytest.mark.parametrize("name", ["plain", "qk_norm", "swiglu", "moe", "moe_modern"])
def test_counted_flops_by_component_equal_the_inventory(name):
    c = config(name)
    counted = count_train_flops(c, 2, 16, "meta")
    inv, n = inventory(c), 2 * 16
    want = dict.fromkeys(COMPONENTS, 0.0)
    for part in inv.layer:
        if part.is_matmul:
            want[part.component] += c.n_layer * part.flops * part.active * n
    want["lm_head"] = inv.get("lm_head").flops * n
    core = c.n_layer * inv.get("attn.core").flops * 16 * n  # 4 T H D per token over the full square
    want["attn_scores"], want["attn_values"] = core / 2, core / 2
    assert counted.components == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("name", FEATURES)
def test_memory_matrix_predicted_within_2_percent(name, precision):
    """Parameters, gradients and optimizer state to the byte, activations within 2% (measured: exact), for
    every feature alone and in combination, fp32 and bf16 autocast, against MemTracker on real tensors."""
    r = memory_report(config(name), 3, 32, precision, device="cpu")
    for k in ("parameters", "gradients", "optimizer_state"):
        assert r["measured"][k] == r["predicted"][k], k
    assert r["ratios"]["activations"] == pytest.approx(1.0, abs=0.02), r["ratios"]


def test_a_new_feature_is_one_entry():
    """QK-norm is two parts; turning it on changes the inventory by exactly those two (the model, the
    counts and the memory follow from them)."""
    off, on = inventory(config("plain")), inventory(config("qk_norm"))
    assert {p.name for p in on.parts()} - {p.name for p in off.parts()} == {"attn.q_norm", "attn.k_norm"}
    c = config("qk_norm")
    assert F.param_counts(c).total - F.param_counts(dataclasses.replace(c, qk_norm=False)).total == 2 * c.n_layer * c.head_dim


@pytest.mark.parametrize("name", FEATURES)
def test_the_step_time_model_times_every_matmul_part(name):
    """One GEMM per matmul part, with the part's FLOPs (split over tp as the part says)."""
    from minigpt.analytic import steptime as T
    from minigpt.core.plan import ParallelPlan

    c = config(name)
    b, s = 2, 16
    for tp in (1, 2):
        gemms = {g.name: g for g in T.layer_gemms(c, ParallelPlan(tp=tp), b, s, "flash")}
        for part in inventory(c).layer:
            if part.is_matmul:
                split = tp if part.tp in ("column", "row") else 1
                want = part.flops * part.active * b * s / split
                assert gemms[part.name].flops == pytest.approx(want, rel=0.02), (part.name, tp)
