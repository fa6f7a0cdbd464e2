"""Routing a user can steer and see (issue 43, part): a capacity factor that drops slots, DeepSeek-V3's
auxiliary-loss-free bias, and per-expert load, dropped slots and router entropy in the step logs."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli, set_args, step_records, tiny_overrides

from minigpt.core.config import ModelConfig
from minigpt.core.errors import UserError
from minigpt.nn.model import MoE, routing_stats, update_router_bias


def _moe(**kw) -> MoE:
    c = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32, n_expert=4, **{"n_expert_active": 1, **kw})
    c.validate()
    torch.manual_seed(0)
    m = MoE(c).train()
    with torch.no_grad():  # every token prefers expert 0, each by its own margin over the others
        m.router.weight.normal_(0, 1.0)
        m.router.weight[0, 0] = 8.0
    return m


def _x() -> torch.Tensor:
    torch.manual_seed(1)
    x = torch.randn(2, 8, 16)
    x[..., 0] = x[..., 0].abs() + 2  # feature 0 positive and large: expert 0's score highest for every token
    return x


def test_a_capacity_drops_the_slots_past_it_in_token_order():
    x = _x()
    dropless = _moe()
    dropless(x)
    assert float(dropless.stats["dropped"]) == 0 and float(dropless.stats["load"][0]) == 1.0
    capped = _moe(moe_capacity_factor=1.0)  # each expert takes ceil(16 x 1 / 4) = 4 of the 16 slots
    out, _ = capped(x)
    assert float(capped.stats["dropped"]) == pytest.approx(12 / 16)
    flat = out.reshape(16, -1)
    assert flat[:4].abs().sum() > 0 and flat[4:].abs().sum() == 0  # the first 4 tokens kept, the rest dropped


def test_the_bias_evens_the_load_without_touching_the_weights():
    """A router that sends about half the tokens to one expert, fixed: the bias alone, moved after each forward,
    brings every expert to within a few tokens of an even share (DeepSeek-V3's sign update)."""
    c = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32, n_expert=4, n_expert_active=1,
                    moe_bias_update_rate=0.01)
    c.validate()
    torch.manual_seed(0)
    m = MoE(c).train()
    with torch.no_grad():
        m.router.weight.normal_(0, 1.0)
        m.router.weight[0, 0] = 2.0
    torch.manual_seed(1)
    x = torch.randn(4, 32, 16)
    x[..., 0] = x[..., 0].abs() + 1
    router = m.router.weight.clone()
    m(x)
    before = float(m.stats["load"].max()) * 4
    for _ in range(300):
        m(x)
        update_router_bias(m)
    m(x)
    after = float(m.stats["load"].max()) * 4
    assert before > 1.9 and after < 1.2 and torch.equal(m.router.weight, router)
    stats = routing_stats(m)
    assert stats["max_over_mean_load"] == pytest.approx(after, abs=1e-4) and len(stats["expert_load"]) == 4
    assert "router_bias" in m.state_dict()  # saved with the weights: the next step's routing depends on it
    assert "router_bias" not in _moe().state_dict()  # no bias, nothing new in a plain mixture's weights


def test_settings_are_checked():
    for kw, says in ((dict(moe_capacity_factor=0.1), "moe_capacity_factor"), (dict(moe_bias_update_rate=2.0), "rate")):
        with pytest.raises(UserError, match=says):
            ModelConfig(n_expert=4, **kw).validate()


def test_the_step_logs_carry_the_routing(corpus_dir, data_cache, tmp_path):
    out = tmp_path / "moe"
    sets = tiny_overrides(corpus_dir, data_cache, out, **{"model.n_expert": 4, "model.n_expert_active": 2,
                                                          "model.moe_capacity_factor": 1.0, "train.max_steps": 2,
                                                          "model.moe_bias_update_rate": 0.001})
    r = run_cli("train", "--config", "tiny", *set_args(sets))
    assert r.returncode == 0, r.stderr[-2000:]
    moe = step_records(out)[-1]["moe"]
    assert len(moe["expert_load"]) == 4 and sum(moe["expert_load"]) == pytest.approx(1.0, abs=1e-3)
    assert 0 <= moe["dropped"] < 1 and moe["router_entropy_nats"] > 0 and moe["max_over_mean_load"] >= 1
    assert "busiest/mean" in r.stdout and json.loads((out / "config.json").read_text())["model"]["moe_capacity_factor"] == 1.0
    assert run_cli("generate", "--run", str(out), "--prompt", "def", "--max-new-tokens", "2").returncode == 0


@pytest.mark.parametrize("kw", [{}, {"moe_capacity_factor": 1.25, "n_expert_active": 2},
                                {"mlp": "swiglu", "bias": True, "n_expert_active": 2}])
def test_grouped_experts_equal_the_loop_over_experts_in_outputs_and_gradients(kw):
    """model.moe_grouped_mm (two torch.nn.functional.grouped_mm over the tokens sorted by expert) against the loop:
    the same outputs, load-balancing loss, dropped share and gradients."""
    from minigpt.nn.model import grouped_experts_ok

    grouped, loop = _moe(**kw, moe_grouped_mm=True), _moe(**kw)
    loop.load_state_dict(grouped.state_dict())
    assert grouped_experts_ok(grouped.experts)
    x = torch.randn(2, 8, 16)
    outs = []
    for m in (grouped, loop):
        y, aux = m(x)
        (y.square().sum() + aux).backward()
        outs.append((y, aux, m.stats["dropped"], {n: p.grad for n, p in m.named_parameters()}))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-6, rtol=1e-5)
    assert float(outs[0][1]) == pytest.approx(float(outs[1][1])) and float(outs[0][2]) == float(outs[1][2])
    for name, g in outs[1][3].items():
        torch.testing.assert_close(outs[0][3][name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_experts_that_are_not_plain_linears_take_the_loop():
    from minigpt.nn.model import grouped_experts_ok

    class Adapted(torch.nn.Linear):  # e.g. a LoRA-adapted or quantized Linear
        pass

    m = _moe(moe_grouped_mm=True)
    old = m.experts[1].c_fc
    m.experts[1].c_fc = Adapted(old.in_features, old.out_features, bias=old.bias is not None)
    assert not grouped_experts_ok(m.experts)
    m(torch.randn(1, 8, 16))  # runs, by the loop


def test_the_flop_counter_counts_grouped_experts_as_it_counts_the_loop():
    """The grouped matrix multiplies have a FLOP formula (nn/torch_private.flop_counter): forward and backward count
    what the loop over experts counts."""
    from minigpt.nn.torch_private import flop_counter

    counts = []
    for grouped in (True, False):
        m, x = _moe(n_expert_active=2, moe_grouped_mm=grouped), torch.randn(2, 8, 16)
        with flop_counter() as fc:
            y, aux = m(x)
            (y.square().sum() + aux).backward()
        counts.append(fc.get_total_flops())
    assert counts[0] == counts[1] > 0


def test_expert_parallel_layers_run_eager_inside_a_compiled_model():
    """torch.compile of a model whose MoE layers are expert-parallel (a one-rank ep group here): the exchanged slot
    counts size the all-to-alls, which dynamo cannot trace (a data-dependent error, on every --plan ep run with
    train.compile on, before), so the layer runs eager inside the compiled model: the eager model's loss. Dynamo with
    the "eager" backend: the tracing alone, which is where it failed."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from minigpt.nn.model import GPT
    from minigpt.nn.torch_private import capture_data_dependent_shapes
    from minigpt.parallel.expert import apply_expert_parallel

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        c = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=64, n_expert=4, n_expert_active=2)
        model = apply_expert_parallel(GPT(c), init_device_mesh("cpu", (1,), mesh_dim_names=("ep",))["ep"])
        x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
        want = model(x, x).loss
        capture_data_dependent_shapes()  # as parallelize() sets it for a mixture
        got = torch.compile(model, backend="eager")(x, x).loss
        got.backward()
        assert got.item() == pytest.approx(want.item(), rel=1e-6)
        assert model.blocks[0].mlp.experts[0].c_fc.weight.grad is not None
    finally:
        if created:
            dist.destroy_process_group()


def test_each_tensor_parallel_rank_dispatches_a_consecutive_share_of_every_experts_slots():
    """parallel/expert._tp_share: tp rank r's slots of each expert are the r-th of t consecutive, near-equal pieces
    (uneven counts included), rank 0's first; together a permutation of all the slots."""
    from minigpt.parallel.expert import _tp_share

    for counts, t in (([5, 0, 3, 7], 2), ([4, 4], 4), ([1, 2, 3], 3)):
        perm, sizes = _tp_share(counts, t)
        assert sorted(perm.tolist()) == list(range(sum(counts))) and sum(sizes) == sum(counts)
        blocks = perm.split(sizes)
        starts = [sum(counts[:e]) for e in range(len(counts))]
        for e, (start, c) in enumerate(zip(starts, counts)):
            pieces = [[i for i in b.tolist() if start <= i < start + c] for b in blocks]
            assert [i for p in pieces for i in p] == list(range(start, start + c)), e  # rank order, consecutive
            assert max(map(len, pieces)) - min(map(len, pieces)) <= 1
