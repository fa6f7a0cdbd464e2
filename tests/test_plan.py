"""The parallel plan: one value, one spelling and the same words on train, simulate and extrapolate."""

import json

import pytest
from conftest import run_cli, set_args, tiny_overrides

from minigpt.core.config import ModelConfig, TrainConfig, config_from_dict
from minigpt.core.errors import UserError
from minigpt.core.plan import ParallelPlan, parse_keys


def test_spelling_round_trips_and_reads_the_same_everywhere():
    plan = ParallelPlan.parse("tp=8,pp=4,dp=32,zero=1,offload=optimizer")
    assert (plan.dp, plan.tp, plan.pp, plan.zero, plan.world) == (32, 8, 4, 1, 1024)
    assert ParallelPlan.parse(plan.spelling()) == plan
    assert plan.describe() == "1,024 ranks = dp 32 (ZeRO-1, offload optimizer) x tp 8 x pp 4 (1f1b)"
    assert ParallelPlan.parse("tp=2,pp=2", world=16).dp == 4  # dp from the world


def test_ranks_lie_tp_innermost_then_dp_then_pp():
    plan = ParallelPlan(dp=3, tp=2, pp=2)
    coords = [plan.coords(r) for r in range(plan.world)]
    assert coords[0] == {"pp": 0, "dp": 0, "tp": 0} and coords[1] == {"pp": 0, "dp": 0, "tp": 1}
    assert coords[2] == {"pp": 0, "dp": 1, "tp": 0} and coords[6] == {"pp": 1, "dp": 0, "tp": 0}
    assert [plan.dp_rank(r) for r in range(6)] == [0, 0, 1, 1, 2, 2]  # a tensor-parallel group reads one shard
    assert sorted({tuple(c.values()) for c in coords}) == sorted(
        (p, d, t) for p in range(2) for d in range(3) for t in range(2))  # every position once
    assert dict(zip(plan.mesh_names, plan.mesh_shape)) == {"pp": 2, "dp_replicate": 3, "dp_shard": 1, "tp": 2}
    sharded = ParallelPlan(dp=3, zero=2)
    assert (sharded.dp_replicate, sharded.dp_shard) == (1, 3)


@pytest.mark.parametrize("text, message", [
    ("tp=8,tq=2", "'tq=2' is not KEY=VALUE"),
    ("tp=eight", "tp='eight' is not an integer"),
    ("zero=4", "zero=4 must be 0, 1, 2 or 3"),
    ("tp=0", "tp=0 must be an integer in [1,"),
    ("backend=megatron", "backend='megatron' is not one of ddp, fsdp, deepspeed"),
    ("offload=disk", "offload='disk' is not one of none, optimizer, params, all"),
    ("tp=2,tp=4", "gives tp twice"),
    ("dp=1048576,tp=2", "has 2,097,152 ranks; at most"),
])
def test_bad_spellings_are_one_clear_line(text, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("(", r"\(")):
        ParallelPlan.parse(text)


def test_a_plan_and_the_world_must_agree():
    with pytest.raises(UserError, match="has 4 ranks, but 8 were given"):
        ParallelPlan.parse("dp=2,tp=2", world=8)
    with pytest.raises(UserError, match="tp x pp = 4 must divide the 6 ranks"):
        ParallelPlan.parse("tp=4", world=6)


def test_train_keys_say_the_plan_and_build_it_back():
    """`train --plan` records [train] keys; the run builds the same plan from them."""
    plan = ParallelPlan.parse("dp=2,tp=2,zero=3,backend=fsdp,offload=params")
    raw = {"train": {}}
    for item in plan.train_overrides():
        key, _, value = item.partition("=")
        raw["train"][key.split(".")[1]] = json.loads(value)
    cfg = config_from_dict(raw)
    assert ParallelPlan.from_train(cfg.train, cfg.model, world=4) == plan


def test_the_engines_rules_resolve_a_plan():
    from minigpt.parallel.registry import backend_class, resolve_plan

    assert resolve_plan(ParallelPlan(dp=4, zero=3)).backend == "fsdp"
    assert resolve_plan(ParallelPlan(dp=4, zero=2)).backend == "deepspeed"
    assert resolve_plan(ParallelPlan(dp=4)).backend == "ddp"
    assert resolve_plan(ParallelPlan(dp=2, backend="fsdp")).zero == 3  # FSDP2 is ZeRO-3
    assert backend_class(ParallelPlan(tp=2)).__name__ == "ShardedBackend"  # tensor parallelism is DTensor's
    for plan, message in [(ParallelPlan(dp=2, zero=1, backend="ddp"), "ZeRO-1 shards model states"),
                          (ParallelPlan(dp=2, zero=2, backend="fsdp"), "FSDP2 is ZeRO-3"),
                          (ParallelPlan(tp=2, backend="deepspeed"), "backend=deepspeed runs data parallelism only"),
                          (ParallelPlan(dp=2, tp=2), "use backend=fsdp"),
                          (ParallelPlan(dp=2, zero=2, offload_params=True), "offload=params needs zero=3")]:
        with pytest.raises(UserError, match=message):
            resolve_plan(plan)


def test_the_model_must_split_as_the_plan_says():
    c = ModelConfig(n_layer=2, n_head=4, n_embd=64)
    with pytest.raises(UserError, match="more pipeline stages than the model's 2 layers"):
        ParallelPlan(pp=3).check_model(c)
    with pytest.raises(UserError, match="n_head = 4 does not divide by the tensor-parallel degree 3"):
        ParallelPlan(tp=3).check_model(c)
    ParallelPlan(tp=4, pp=2).check_model(c)
    assert TrainConfig().pipeline_parallel == 1


def test_train_simulate_and_extrapolate_take_one_spelling_and_print_one_description(corpus_dir, data_cache, tmp_path):
    out = tmp_path / "run"
    r = run_cli("train", "--plan", "dp=1,tp=1,zero=3", *set_args(tiny_overrides(corpus_dir, data_cache, out,
                                                                                  **{"train.max_steps": 2})))
    assert r.returncode == 0, r.stderr
    assert "plan     1 ranks = dp 1 (ZeRO-3, fsdp) x tp 1 x pp 1 (--plan dp=1,tp=1,pp=1,zero=3,backend=fsdp)" in r.stdout
    saved = json.loads((out / "config.json").read_text())["train"]
    assert (saved["backend"], saved["zero_stage"], saved["tensor_parallel"]) == ("fsdp", 3, 1)
    r = run_cli("simulate", "--config", "tiny", "--set", "model.n_layer=2", "--plan", "dp=2,tp=2,pp=2,zero=1")
    assert r.returncode == 0, r.stderr
    assert "plan: 8 ranks = dp 2 (ZeRO-1) x tp 2 x pp 2 (1f1b) (--plan dp=2,tp=2,pp=2,zero=1)" in r.stdout
    assert "memory per GPU, simulated" in r.stdout and "beside extrapolate's" in r.stdout
    r = run_cli("extrapolate", "--target", "gpt3-175b", "--plan", "dp=16,tp=8,pp=8,zero=1", "--json")
    assert r.returncode == 0, r.stderr
    layout = json.loads(r.stdout)["memory"]["layout"]
    assert layout["plan_description"] == "1,024 ranks = dp 16 (ZeRO-1) x tp 8 x pp 8 (1f1b)"
    assert layout["plan"] == "dp=16,tp=8,pp=8,zero=1"


def test_simulate_sets_its_memory_beside_extrapolates_for_the_same_plan():
    """The one place both figures meet: simulate's memory per GPU beside extrapolate's per_gpu_bytes for the
    same model and plan, with their ratio (both count 16 bytes per parameter of model states)."""
    r = run_cli("simulate", "--config", "gpt3-xl", "--plan", "dp=16,zero=3", "--recompute", "--json")
    assert r.returncode == 0, r.stderr
    g = json.loads(r.stdout)["memory_per_gpu"]
    assert g["simulated_over_extrapolate"] == pytest.approx(g["simulated_bytes"] / g["extrapolate_bytes"])
    assert 0.5 < g["simulated_over_extrapolate"] < 3  # same order: transient buffers and the head aside


def test_plan_keys_are_checked_by_the_parser():
    assert parse_keys(" tp=2 , pp=3 ") == {"tp": 2, "pp": 3}
    r = run_cli("extrapolate", "--plan", "tp=2,pq=1")
    assert r.returncode == 2 and "error:" in r.stderr and "'pq=1' is not KEY=VALUE" in r.stderr


def test_context_parallelism_is_a_plan_dimension_that_training_and_simulate_refuse(tmp_path):
    plan = ParallelPlan.parse("tp=4,cp=2,pp=2", world=64)
    assert (plan.dp, plan.cp, plan.world) == (4, 2, 64) and ParallelPlan.parse(plan.spelling()) == plan
    assert plan.describe() == "64 ranks = dp 4 (ZeRO-0) x tp 4 x cp 2 x pp 2 (1f1b)"
    with pytest.raises(UserError, match="tp x pp x cp = 16 must divide the 24 ranks"):
        ParallelPlan.parse("tp=4,pp=2,cp=2", world=24)
    from minigpt.parallel.registry import plan_overrides

    with pytest.raises(UserError, match="context parallelism is predicted .* not trained yet; train with cp=1"):
        plan_overrides("dp=2,cp=2", 4)
    for cmd, says in ((("simulate", "--config", "tiny", "--plan", "dp=2,cp=2"), "not simulated yet; use cp=1"),
                      (("extrapolate", "--plan", "tp=2,cp=2", "--comm", "counted"), "does not run context parallelism")):
        r = run_cli(*cmd)
        assert r.returncode == 2 and r.stderr.startswith("error:") and says in r.stderr and "Traceback" not in r.stderr


def test_a_given_plan_that_does_not_fit_says_what_one_gpu_would_hold():
    """A plan with its dp given that cannot hold the model: what one GPU would need beside what it has (the search
    used to run dp past the rank limit and name a 2,097,152-rank plan nobody gave)."""
    r = run_cli("extrapolate", "--target", "gpt3-175b", "--gpu", "A100", "--plan", "dp=124,tp=8,pp=1,zero=1")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--plan dp=124,tp=8,pp=1,zero=1 needs" in r.stderr and "GiB per GPU" in r.stderr and "2,097,152" not in r.stderr


def test_backend_ddp_means_zero_0_unless_a_stage_is_given():
    r = run_cli("simulate", "--config", "tiny", "--plan", "dp=2,backend=ddp")
    assert r.returncode == 0 and "(ZeRO-0, ddp)" in r.stdout and "ZeRO-3, ddp" not in r.stdout
    r = run_cli("extrapolate", "--target", "gpt3-13b", "--gpu", "A100", "--plan", "dp=1024,backend=ddp")
    # DDP replicates 16 bytes a parameter on every rank: said not to fit at ZeRO-0, within the ranks given
    assert r.returncode == 2 and "zero=0,backend=ddp needs" in r.stderr and "at most 1,048,576" not in r.stderr
    r = run_cli("extrapolate", "--target", "gpt3-13b", "--gpu", "A100", "--plan", "dp=128,tp=8,backend=ddp", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["memory"]["layout"]["zero_stage"] == 0
