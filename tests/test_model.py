import pytest
import torch

import minigpt.nn.ops as ops_module
from minigpt.analytic.flops import param_counts
from minigpt.core.config import ModelConfig
from minigpt.infer.generate import generate_ids
from minigpt.nn.model import GPT
from minigpt.parallel.parallelize import apply_activation_checkpointing

VARIANTS = {
    "gpt2": dict(),
    "gqa-rope-swiglu-rms": dict(n_kv_head=1, pos_emb="rope", mlp="swiglu", norm="rmsnorm"),
    "untied-bias": dict(tie_embeddings=False, bias=True, n_kv_head=2),
    "odd-vocab": dict(vocab_size=300, pos_emb="rope"),
}


def small(**kw) -> ModelConfig:
    base = dict(n_layer=2, n_head=4, n_embd=32, block_size=24, vocab_size=256)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("name", VARIANTS)
def test_forward_shapes_loss_and_param_counts(name):
    c = small(**VARIANTS[name])
    torch.manual_seed(0)
    model = GPT(c)
    x = torch.randint(0, c.vocab_size, (3, 20))
    logits, loss = model(x).logits, model(x, x).loss
    assert logits.shape == (3, 20, c.vocab_size)  # padding rows cut off
    assert torch.isfinite(loss)
    # an untrained model is close to uniform over the real vocabulary, not the padded one
    assert abs(loss.item() - torch.log(torch.tensor(float(c.vocab_size))).item()) < 1.0
    counts = param_counts(c)  # analytic, torch-free
    assert model.num_params() == counts.total
    assert model.num_params(non_embedding=True) == counts.non_embedding
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert counts.matmul == linear  # the LM head is a Linear whether tied or not
    assert model.wte.weight.shape[0] == c.padded_vocab_size and c.padded_vocab_size % 64 == 0


def test_tied_head_shares_the_embedding():
    m = GPT(small())
    assert m.lm_head.weight is m.wte.weight
    u = GPT(small(tie_embeddings=False))
    assert u.lm_head.weight is not u.wte.weight


def test_init_scales_residual_projections():
    c = small(n_layer=8, n_embd=128, n_head=4)
    m = GPT(c)
    std_proj = m.blocks[0].attn.c_proj.weight.std().item()
    std_fc = m.blocks[0].mlp.c_fc.weight.std().item()
    assert std_fc == pytest.approx(0.02, rel=0.05)
    assert std_proj == pytest.approx(0.02 / (2 * c.n_layer) ** 0.5, rel=0.1)


def test_activation_checkpointing_applied_from_outside_gives_the_same_gradients():
    c = small(n_kv_head=2, pos_emb="rope", dropout=0.1)
    torch.manual_seed(0)
    a = GPT(c)
    b = apply_activation_checkpointing(GPT(c))
    b.load_state_dict(a.state_dict())
    assert [n for n, _ in a.named_parameters()] == [n for n, _ in b.named_parameters()]  # names unchanged
    x = torch.randint(0, c.vocab_size, (2, 16))
    torch.manual_seed(1)
    a(x, x).loss.backward()
    torch.manual_seed(1)  # the recomputed forward replays the same dropout masks
    b(x, x).loss.backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=n)


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("chunk", [None, 16])
def test_the_fused_loss_equals_the_textbook_cross_entropy(name, chunk, monkeypatch):
    """The LM head's chunked cross-entropy (gradients computed in its forward) = F.cross_entropy of
    the full logits: loss and every gradient, with ignored targets and a padded vocabulary; in one
    chunk, and in chunks of 16 rows (60 rows: three full chunks and a short one, through the one
    reused logits buffer)."""
    if chunk:
        monkeypatch.setattr(ops_module, "_chunk_rows", lambda vocab, device: chunk)
    c = small(**VARIANTS[name])
    torch.manual_seed(0)
    m = GPT(c)
    x, y = torch.randint(0, c.vocab_size, (3, 20)), torch.randint(0, c.vocab_size, (3, 20))
    y[0, :5] = -1
    logits = m(x).logits
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, c.vocab_size), y.reshape(-1), ignore_index=-1)
    ref.backward()
    expected = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    fused = m(x, y).loss
    fused.backward()
    torch.testing.assert_close(fused, ref, rtol=1e-6, atol=1e-6)
    for (n, p), g in zip(m.named_parameters(), expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7, msg=n)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert m(x, y).loss.item() == pytest.approx(ref.item(), rel=2e-2)  # bf16 matmuls, fp32 softmax


def test_causality_future_tokens_do_not_change_the_past():
    m = GPT(small(pos_emb="rope", n_kv_head=2)).eval()
    x = torch.randint(0, 256, (1, 16))
    y = x.clone()
    y[0, 10:] = (y[0, 10:] + 1) % 256
    torch.testing.assert_close(m(x)[0][:, :10], m(y)[0][:, :10])


@pytest.mark.parametrize("name", VARIANTS)
def test_kv_cache_logits_match_full_forward(name):
    c = small(**VARIANTS[name])
    m = GPT(c).eval()
    x = torch.randint(0, c.vocab_size, (2, 18))
    full = m(x).logits
    cache = m.make_cache(2, 20)  # static: written at the slots given by input_pos
    parts = [m(x[:, a:b], input_pos=torch.arange(a, b), cache=cache).logits for a, b in ((0, 7), (7, 8), (8, 18))]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cached_decoding_gives_exactly_the_uncached_tokens(name, temperature):
    c = small(**VARIANTS[name])
    torch.manual_seed(1)
    m = GPT(c)
    prompts = [[5, 6, 7, 8, 9], [1, 2], [42]]  # different lengths: left padding and masks
    kw = dict(max_new_tokens=12, temperature=temperature, top_k=20, top_p=0.9, seed=3)
    cached = generate_ids(m, prompts, use_cache=True, **kw)
    uncached = generate_ids(m, prompts, use_cache=False, **kw)
    assert cached.new_tokens == uncached.new_tokens
    assert all(len(row) == 12 for row in cached.new_tokens)


def test_a_batched_prompt_decodes_as_it_would_alone():
    c = small(pos_emb="learned")
    torch.manual_seed(2)
    m = GPT(c)
    prompts = [[5, 6, 7, 8, 9], [1, 2]]
    batched = generate_ids(m, prompts, max_new_tokens=10, temperature=0.0)
    for i, p in enumerate(prompts):
        alone = generate_ids(m, [p], max_new_tokens=10, temperature=0.0)
        assert alone.new_tokens[0] == batched.new_tokens[i]


def test_compiled_decoding_gives_the_eager_tokens():
    c = small(pos_emb="rope", n_kv_head=2, block_size=32)
    torch.manual_seed(3)
    m = GPT(c)
    prompts = [[5, 6, 7, 8, 9], [1, 2]]
    for kw in (dict(temperature=0.0), dict(temperature=1.0, top_k=20, seed=4)):
        eager = generate_ids(m, prompts, max_new_tokens=10, **kw)
        compiled = generate_ids(m, prompts, max_new_tokens=10, compile=True, **kw)
        assert compiled.new_tokens == eager.new_tokens


def test_generation_is_capped_at_block_size():
    m = GPT(small(block_size=16))
    g = generate_ids(m, [[1, 2, 3, 4]], max_new_tokens=100, temperature=0.0)
    assert g.capped and len(g.new_tokens[0]) == 12
