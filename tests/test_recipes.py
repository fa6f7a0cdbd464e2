"""The speedrun's switches: Muon for the blocks' matrices, the warmup-stable-decay schedule, QK-norm and
ReLU^2; each counted, resumable, and refused where it cannot run."""

import pytest
import torch
from conftest import run_cli, set_args, step_records, tiny_overrides

from minigpt.analytic.flops import muon_flops_per_step, param_counts
from minigpt.core.config import ModelConfig, TrainConfig
from minigpt.nn.model import GPT
from minigpt.nn.optim import Optimizers, lr_at, make_optimizer

MODERN = {"model.pos_emb": '"rope"', "model.norm": '"rmsnorm"', "model.mlp": '"relu2"', "model.qk_norm": "true",
          "model.tie_embeddings": "false", "train.optimizer": '"muon"', "train.schedule": '"wsd"'}


def test_wsd_holds_the_rate_then_decays_linearly_at_the_end():
    tc = TrainConfig(lr=1e-2, min_lr=1e-3, warmup_steps=10, max_steps=100, schedule="wsd", decay_fraction=0.2)
    assert lr_at(0, tc) == pytest.approx(1e-3) and lr_at(9, tc) == pytest.approx(1e-2)
    assert lr_at(50, tc) == lr_at(80, tc) == 1e-2
    assert lr_at(90, tc) == pytest.approx(0.5 * (1e-2 + 1e-3)) and lr_at(100, tc) == pytest.approx(1e-3)


@pytest.mark.parametrize("extra", [{"qk_norm": True}, {"mlp": "relu2"}, {"qk_norm": True, "mlp": "relu2", "n_kv_head": 2}])
def test_new_layers_are_counted_and_run(extra):
    c = ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=128, **extra)
    model = GPT(c)
    assert param_counts(c).total == model.num_params()
    x = torch.randint(0, 128, (2, 32))
    out = model(x, x)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    if c.qk_norm:
        assert model.blocks[0].attn.q_norm.weight.grad is not None


def test_muon_steps_the_block_matrices_and_adamw_the_rest():
    c = ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=128, tie_embeddings=False)
    model = GPT(c)
    opt = make_optimizer(model, TrainConfig(optimizer="muon", lr=1e-3))
    assert isinstance(opt, Optimizers)
    muon = {id(p) for g in opt.optimizers["muon"].param_groups for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in muon}
    assert names == {n for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() == 2}
    assert "wte.weight" not in names and "lm_head.weight" not in names


def test_muon_flops_are_the_newton_schulz_matmuls_torch_runs():
    """The formula against torch's FLOP counter around one torch.optim.Muon step (its 5 iterations)."""
    from torch.utils.flop_counter import FlopCounterMode

    c = ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=128, mlp="swiglu")
    model = GPT(c)
    opt = make_optimizer(model, TrainConfig(optimizer="muon"))
    model(torch.randint(0, 128, (1, 32)), torch.randint(0, 128, (1, 32))).loss.backward()
    counter = FlopCounterMode(display=False)
    with counter:
        opt.optimizers["muon"].step()
    assert counter.get_total_flops() == pytest.approx(muon_flops_per_step(c), rel=1e-6)


def test_a_modern_recipe_trains_resumes_exactly_and_says_its_optimizer(corpus_dir, data_cache, tmp_path):
    aligned = {"train.max_steps": 4, "data.align": '"document"'}  # windows start at documents, resumed exactly too
    sets = tiny_overrides(corpus_dir, data_cache, tmp_path / "run", **MODERN, **aligned)
    r = run_cli("train", *set_args(sets), "--stop-at", "2")
    assert r.returncode == 0, r.stderr
    assert "optim    Muon (5 Newton-Schulz steps) on the blocks' matrices + AdamW on the rest" in r.stdout
    assert "wsd (warmup 2, stable, linear decay over the last 20%)" in r.stdout
    assert run_cli("train", "--resume", str(tmp_path / "run")).returncode == 0
    whole = tiny_overrides(corpus_dir, data_cache, tmp_path / "whole", **MODERN, **aligned)
    assert run_cli("train", *set_args(whole)).returncode == 0
    assert [s["loss"] for s in step_records(tmp_path / "run")] == [s["loss"] for s in step_records(tmp_path / "whole")]
    r = run_cli("train", "--resume", str(tmp_path / "run"), "--set", 'train.optimizer="adamw"', "--set", "train.max_steps=5")
    assert r.returncode == 2 and "trained with train.optimizer = 'muon'; resume with --set train.optimizer=muon" in r.stderr
    r = run_cli("convert", "--to-hf", str(tmp_path / "run"), "--out", str(tmp_path / "hf"))
    assert r.returncode == 2 and "qk_norm" in r.stderr


@pytest.mark.parametrize("extra, message", [
    ({"train.optimizer": '"muon"', "train.backend": '"deepspeed"'}, "train.optimizer = 'muon' runs on one process, DDP, FSDP2"),
    ({"train.optimizer": '"sgd"'}, "train.optimizer"),
    ({"train.schedule": '"wsd"', "train.decay_fraction": 0}, "train.decay_fraction = 0.0 must be in (0, 1]"),
    ({"model.mlp": '"relu3"'}, "model.mlp"),
])
def test_bad_recipe_settings_are_one_line(corpus_dir, data_cache, tmp_path, extra, message):
    r = run_cli("train", *set_args(tiny_overrides(corpus_dir, data_cache, tmp_path / "run", **extra)))
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()
