import json

import pytest
import torch
import torch.nn.functional as Fn
from conftest import REPO, run_cli
from torch.utils.flop_counter import FlopCounterMode

from minigpt.analytic import flops as F
from minigpt.core.config import ModelConfig, load_config
from minigpt.core.errors import UserError
from minigpt.measure.counted import count_train_flops, flops_report
from minigpt.nn.torch_private import flop_counter

SHAPES = [
    dict(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=64),
    dict(n_layer=3, n_head=4, n_embd=64, block_size=48, vocab_size=300),
    dict(n_layer=2, n_head=8, n_kv_head=2, n_embd=64, block_size=32, vocab_size=1000),
    dict(n_layer=2, n_head=4, n_embd=96, block_size=64, vocab_size=257, mlp="swiglu"),
    dict(n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=500, tie_embeddings=False, bias=True),
    dict(n_layer=2, n_head=6, n_kv_head=3, n_embd=96, block_size=40, vocab_size=777, pos_emb="rope", norm="rmsnorm"),
    dict(n_layer=4, n_head=2, n_embd=32, block_size=128, vocab_size=128, ffn_hidden=40),
]


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_counted_matmul_flops_equal_the_exact_analytic_count(shape, device):
    c = ModelConfig(**shape)
    for T in (c.block_size, c.block_size // 2):
        counted = count_train_flops(c, 2, T, device)
        exact = F.train_flops_per_token(c, T, "exact")
        assert counted.per_token == pytest.approx(exact, rel=1e-3)
        assert counted.backward == 2 * counted.forward
        assert sum(counted.components.values()) == counted.forward
        # the forward + backward breakdown adds up too, each component 3x its forward
        assert sum(counted.components_train.values()) == counted.total
        assert all(counted.components_train[k] == 3 * v for k, v in counted.components.items())


def test_attention_is_counted_on_cpu():
    c = ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=256)
    counted = count_train_flops(c, 2, 32, "cpu")
    # QK^T per token: 2 x T x H x D per layer, and the same for AV
    assert counted.components["attn_scores"] == 2 * 32 * 64 * 2 * (2 * 32)
    assert counted.components["attn_values"] == counted.components["attn_scores"]


def test_cpu_flash_kernel_is_zero_for_torch_but_counted_by_ours():
    q = torch.randn(2, 4, 32, 16, requires_grad=True)
    k, v = torch.randn(2, 4, 32, 16), torch.randn(2, 4, 32, 16)
    with FlopCounterMode(display=False) as plain:
        Fn.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
    ours = flop_counter()
    with ours:
        Fn.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
    assert plain.get_total_flops() == 0  # the pitfall: CPU attention counts as nothing
    one_bmm = 2 * (2 * 4) * 32 * 32 * 16  # one (B H) x T x T x D batched matmul
    # forward QK^T and AV; backward 5: the fused kernel's formula recomputes the scores
    assert ours.get_total_flops() == 7 * one_bmm


def test_megatron_72_is_exact_for_a_gpt2_shaped_model():
    c = ModelConfig(n_layer=4, n_head=4, n_embd=128, block_size=256, vocab_size=4096, bias=False)
    assert F.train_flops_per_token(c, 256, "megatron_72") == pytest.approx(F.train_flops_per_token(c, 256, "exact"), rel=1e-12)
    assert F.train_flops_per_token(c, 256, "megatron_96") == pytest.approx(F.train_flops_per_token(c, 256, "exact_recompute"), rel=1e-12)
    half = F.train_flops_per_token(c, 256, "exact") - F.train_flops_per_token(c, 256, "exact_causal")
    assert half == 3 * 2 * 4 * 256 * 128  # half of the attention square, 3x forward


def test_palm_and_kaplan_by_hand():
    c = ModelConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=128)
    p = F.param_counts(c)
    assert F.train_flops_per_token(c, 32, "kaplan_6n") == 6 * p.non_embedding
    assert F.train_flops_per_token(c, 32, "palm") == 6 * p.total + 12 * 2 * 2 * 32 * 32  # all N (App. B)


def test_palm_8b_flops_per_token_from_its_shape():
    """PaLM App. B / Table 1: the 8B model (32 layers, d_model 4096, 16 heads of 256, multi-query,
    SwiGLU d_ff = 4 d_model, 256k tied vocabulary, T = 2048) has 8.63B parameters and 5.50e10
    training FLOPs per token under 6N + 12LHQT. Predicted from the shape alone."""
    c = ModelConfig(n_layer=32, n_head=16, n_kv_head=1, n_embd=4096, head_dim=256, ffn_hidden=16384, mlp="swiglu",
                    norm="rmsnorm", pos_emb="rope", vocab_size=256_000, block_size=2048, pad_vocab_multiple=1)
    assert F.param_counts(c).total == pytest.approx(8.63e9, rel=2e-3)
    assert F.train_flops_per_token(c, 2048, "palm") == pytest.approx(5.50e10, rel=5e-3)


def test_chinchilla_by_hand_for_one_layer():
    c = ModelConfig(n_layer=1, n_head=2, n_embd=8, block_size=4, vocab_size=64)
    s, h, V, ff = 4, 8, 64, 32
    fwd = 2 * s * V * h + (6 * s * h * h + 2 * s * s * h + 3 * 2 * s * s + 2 * s * s * h + 2 * s * h * h + 4 * s * h * ff) + 2 * s * h * V
    assert F.train_flops_per_token(c, s, "chinchilla") == 3 * fwd / s


def test_inference_flops():
    c = load_config(REPO / "configs" / "gpt3-175b.toml").model
    n_mm = F.param_counts(c).matmul
    assert F.decode_flops(c, 0) == pytest.approx(2 * n_mm, rel=1e-3)
    # about 350 TFLOPs per 1000 generated tokens at short context (2N per token, Kaplan et al. 2020)
    assert 1000 * F.decode_flops(c, 100) == pytest.approx(3.5e14, rel=0.01)
    assert F.prefill_flops(c, 16, all_logits=True) == 2 * n_mm * 16 + 4 * 96 * 16 * 16 * 12288


def test_gpt3_175b_counted_on_meta_matches_megatron():
    c = load_config(REPO / "configs" / "gpt3-175b.toml").model
    r = flops_report(c, 1, 2048, "meta")
    assert r["params_total"] == pytest.approx(175e9, rel=0.01)
    assert r["ratios_to_counted"]["megatron_72"] == pytest.approx(1.0, abs=1e-3)  # padded vocab only
    assert r["exact_ratio_to_counted"] == pytest.approx(1.0, abs=1e-9)
    assert r["ratios_to_counted"]["kaplan_6n"] < 0.98  # 6N misses attention at T = 2048


def test_flops_cli_json_and_errors():
    r = run_cli("flops", "--config", "tiny", "--batch-size", "2", "--seq-len", "64", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for key in ("params_total", "params_non_embedding", "tokens_per_step", "counted_train_flops_per_token", "formulas"):
        assert key in out
    assert set(out["formulas"]) == {"kaplan_6n", "six_n_all", "palm", "chinchilla", "megatron_72", "megatron_96"}
    assert out["tokens_per_step"] == 128
    assert set(out["ratios_to_counted"]) == set(out["formulas"])
    r = run_cli("flops", "--config", "tiny", "--seq-len", "4096")
    assert r.returncode == 2 and "exceeds model.block_size = 128" in r.stderr


def test_sequence_longer_than_block_is_a_user_error():
    with pytest.raises(UserError, match="exceeds model.block_size"):
        count_train_flops(ModelConfig(block_size=16), 1, 17)
