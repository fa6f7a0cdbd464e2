"""Structured pruning (issue 45): heads, MLP channels and layers removed by importance, the smaller model written as
an ordinary run that every reader loads."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli

from minigpt.core.config import ModelConfig
from minigpt.core.errors import UserError
from minigpt.nn import prune as P
from minigpt.nn.model import GPT

SHAPES = [dict(), dict(mlp="swiglu", n_kv_head=2, norm="rmsnorm", pos_emb="rope", qk_norm=True, bias=True)]


def _model(**kw) -> GPT:
    c = ModelConfig(n_layer=3, n_head=4, n_embd=64, block_size=32, vocab_size=128, **kw)
    c.validate()
    torch.manual_seed(0)
    return GPT(c)


@pytest.mark.parametrize("kw", SHAPES, ids=["gelu-mha", "swiglu-gqa-rope-qknorm"])
def test_pruning_nothing_keeps_the_function_and_pruning_shrinks_the_shapes(kw):
    m = _model(**kw)
    idx = torch.randint(0, 128, (2, 16))
    imp = P.importance(m, [idx])
    c = m.config
    same = P.prune(m, imp, c.n_kv_head, c.ffn_hidden, c.n_layer)
    assert torch.equal(same(idx).logits, m(idx).logits)
    small = P.prune(m, imp, *P.plan_sizes(c, 0.5, 0.5, 1))
    s = small.config
    assert (s.n_layer, s.n_kv_head, s.n_head // s.n_kv_head, s.head_dim) == (2, c.n_kv_head // 2, c.n_head // c.n_kv_head,
                                                                               c.head_dim)
    assert s.ffn_hidden < c.ffn_hidden and small(idx).logits.shape == m(idx).logits.shape
    assert sum(p.numel() for p in small.parameters()) < 0.6 * sum(p.numel() for p in m.parameters())


def test_the_criteria_pick_what_contributes_nothing():
    """A head whose values are zero, MLP channels whose down projection is zero, and a block whose output projections
    are zero (it passes its input through: Block Influence 0) are the ones removed."""
    m = _model()
    c, D = m.config, m.config.head_dim
    with torch.no_grad():
        b = m.blocks[0]
        b.attn.c_attn.weight[c.n_head * D + c.n_kv_head * D + 2 * D:c.n_head * D + c.n_kv_head * D + 3 * D] = 0  # v of head 2
        b.mlp.c_fc.weight[:7] = 0  # channels 0-6 never activate (GELU(0) = 0)
        for proj in (m.blocks[1].attn.c_proj, m.blocks[1].mlp.c_proj):
            proj.weight.zero_()
    imp = P.importance(m, [torch.randint(0, 128, (4, 32))])
    assert int(imp.groups[0].argmin()) == 2 and set(imp.channels[0].argsort()[:7].tolist()) == set(range(7))
    assert int(imp.layers.argmin()) == 1 and float(imp.layers[1]) == pytest.approx(0.0, abs=1e-6)
    small = P.prune(m, imp, c.n_kv_head - 1, c.ffn_hidden - 8, c.n_layer - 1)
    assert small.config.n_layer == 2


def test_sizes_are_checked_and_a_mixture_is_refused():
    c = _model().config
    with pytest.raises(UserError, match="fraction to remove"):
        P.plan_sizes(c, 1.0, 0, 0)
    with pytest.raises(UserError, match="removes whole layers"):
        P.plan_sizes(c, 0, 0, 3)
    with pytest.raises(UserError, match="mixture of experts"):
        P.check_prunable(ModelConfig(n_expert=4))


def test_prune_writes_a_run_every_reader_loads(good_run, tmp_path):
    out = tmp_path / "pruned"
    r = run_cli("prune", "--run", str(good_run), "--heads", "0.5", "--mlp", "0.5", "--out", str(out), "--json",
                "--calibration-batches", "2")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["params_after"] < info["params_before"] and (out / "pruned.json").exists()
    assert json.loads((out / "config.json").read_text())["model"]["n_head"] == info["kept"]["n_head"]
    r = run_cli("eval", "--run", str(out), "--data", "val", "--max-tokens", "2000", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["bits_per_byte"] > 0, r.stderr
    r = run_cli("generate", "--run", str(out), "--prompt", "def", "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr
    # HF's GPT-2 ties the head width to n_embd / n_head: a head-pruned GPT-2-layout run says so (a Llama layout exports)
    r = run_cli("convert", "--to-hf", str(out), "--out", str(tmp_path / "hf"))
    assert r.returncode == 2 and "GPT-2 has neither" in r.stderr and not (tmp_path / "hf").exists()
    again = run_cli("prune", "--run", str(good_run), "--out", str(out))  # not over an existing run
    assert again.returncode == 2 and "not an empty folder" in again.stderr
    bad = run_cli("prune", "--run", str(good_run), "--heads", "1.5", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and not (tmp_path / "x").exists()


def test_a_pruned_run_recovers_by_distillation_from_the_unpruned(good_run, corpus_dir, data_cache, tmp_path):
    """Minitron's recipe: prune, then train the pruned model on the unpruned one's soft targets (init_from + distill_from)."""
    pruned = tmp_path / "pruned"
    assert run_cli("prune", "--run", str(good_run), "--mlp", "0.5", "--out", str(pruned)).returncode == 0
    sets = {"train.init_from": f'"{pruned}"', "train.distill_from": f'"{good_run}"', "train.out_dir": f'"{tmp_path / "rec"}"',
            "train.max_steps": 2, "train.eval_every": 0, "train.sample_every": 0, "train.report": "false",
            "train.micro_batch_size": 4, "train.batch_size_tokens": 0, "train.compile": "false",
            "data.source": f'"{corpus_dir}"', "data.cache_dir": f'"{data_cache}"', "data.val_fraction": 0.2}
    r = run_cli("train", "--json", *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")])
    assert r.returncode == 0, r.stderr[-2000:]
    final = json.loads(r.stdout.strip().splitlines()[-1])
    assert final["step"] == 2 and final["params"] == json.loads((pruned / "pruned.json").read_text())["params_after"]
