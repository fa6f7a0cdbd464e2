"""`minigpt simulate` with pipeline, sequence and expert parallelism: the real stage, the real
sequence-parallel plan and the real all-to-all dispatch on fake ranks, counted beside the formulas.

The published layouts: GPT-4's estimated 8-way tensor x 15-way pipeline (a mixture of 16 experts, each
split over tp) and MT-NLG 530B's 8 x 35 (Smith et al. 2022), point-to-point bytes per boundary per
micro-batch against b*s*h (Narayanan et al. 2021) within 1% (how long they take is said in the README,
measured, not asserted here).
"""

import json

import pytest
from conftest import run_cli

from minigpt.core.config import ModelConfig
from minigpt.core.hardware import gpu_by_name
from minigpt.core.plan import ParallelPlan
from minigpt.core.resolve import model_config
from minigpt.measure.simulate import SimSpec, simulate

H100 = gpu_by_name("H100")


# MT-NLG's 8 x 35 layout: counted beside its formula in test_the_table_shows_the_pipeline_beside_its_formulas
@pytest.mark.parametrize("target, spelling", [("gpt4", "dp=1,tp=8,pp=15,zero=1")])
def test_published_layouts_simulate_in_seconds_with_p2p_on_the_formula(target, spelling):
    c = model_config(target).model
    r = simulate(c, SimSpec(ParallelPlan.parse(spelling), micro_batches=16), H100)
    p = r["pipeline"]
    assert p["p2p_ratio"] == pytest.approx(1.0, abs=0.01)
    assert p["p2p_activation_bytes_per_boundary_per_micro_batch"] == c.block_size * c.n_embd * 2  # b=1, bf16
    assert p["bubble_formula"] == pytest.approx((r["pp"] - 1) / (16 + r["pp"] - 1))
    assert r["comm_bytes_per_rank_by_group"]["tp"] == pytest.approx(r["predicted_comm_bytes_per_rank_by_group"]["tp"],
                                                                    rel=0.01)
    assert r["stage_layers"] == -(-c.n_layer // r["pp"])  # the real split: earlier stages take the extra layer


def test_expert_parallel_all_to_all_is_counted_beside_the_formula():
    c = model_config("gpt4").model
    r = simulate(c, SimSpec(ParallelPlan.parse("dp=16,ep=16,pp=15,zero=1"), seq_len=1024), H100)
    counted, formula = r["comm_bytes_per_rank_by_group"], r["predicted_comm_bytes_per_rank_by_group"]
    assert counted["ep"] > 0 and counted["ep"] == pytest.approx(formula["ep"], rel=0.01)
    assert counted["dp"] == pytest.approx(formula["dp"], rel=0.01)  # experts reduced over the dp/ep ranks holding them
    assert next(row for row in r["collectives"] if row["op"] == "all_to_all")["group"] == "ep"
    assert r["memory_ratio"]["params"] == pytest.approx(1.0, rel=0.01)  # 1/16 of the experts per rank


def test_sequence_parallel_shards_activations_and_keeps_the_traffic():
    """Per layer (2 layers minus 1): without sp, Korthikanti's s*b*h*(10+24/t) (flash attention) within
    15%; with sp, his s*b*h*34/t plus the gathered inputs of QKV and MLP-in (2 x 2*s*b*h bytes, (t-1)/t
    of them beyond his), which torch's SequenceParallel keeps where Megatron gathers them again in
    backward, within 10%; the tensor-parallel traffic the same bytes either way."""
    def per_layer(sp):
        runs = []
        for n in (1, 2):
            c = ModelConfig(n_layer=n, n_head=12, n_embd=768, block_size=1024, vocab_size=512, bias=False)
            runs.append(simulate(c, SimSpec(ParallelPlan(tp=4, zero=3, sp=sp), micro_batch=2), H100))
        for r in runs:
            tp = r["comm_bytes_per_rank_by_group"]["tp"], r["predicted_comm_bytes_per_rank_by_group"]["tp"]
            assert tp[0] == pytest.approx(tp[1], rel=0.01)
        a, b = runs
        return [b["memory_per_rank"]["activations_peak"] - a["memory_per_rank"]["activations_peak"],
                b["predicted_memory_per_rank"]["activations_peak"] - a["predicted_memory_per_rank"]["activations_peak"]]
    (plain, plain_formula), (seq, seq_formula) = per_layer(False), per_layer(True)
    assert plain == pytest.approx(plain_formula, rel=0.15)
    gathered = 2 * 2 * 1024 * 768 * 2 * (1 - 1 / 4)
    assert seq == pytest.approx(seq_formula + gathered, rel=0.10)
    assert seq < 0.85 * plain


def test_the_table_shows_the_pipeline_beside_its_formulas():
    r = run_cli("simulate", "--config", "mt-nlg-530b", "--plan", "dp=1,tp=8,pp=35,sp=1", "--micro-batches", "1920")
    assert r.returncode == 0, r.stderr
    for text in ("pipeline: 35 stages (1f1b, 1 per rank), m = 1920 micro-batches per step (given (--micro-batches))",
                 "counted/formula 1.0000", "bubble (predicted, formula): 1.7% of the step", "/ tp (sequence parallel)"):
        assert text in r.stdout, text


def test_extrapolate_shows_the_published_layout_and_why_it_prefers_its_own():
    r = run_cli("extrapolate", "--target", "mt-nlg-530b", "--gpu", "A100-80GB", "--num-gpus", "2240", "--json")
    assert r.returncode == 0, r.stderr
    p = json.loads(r.stdout)["published_layout"]
    assert p["published"]["plan"].startswith("dp=8,tp=8,pp=35") and p["source"].startswith("Smith et al. 2022")
    assert p["own"]["plan"] != p["published"]["plan"] and p["reasons"][0].startswith("the search takes the fastest predicted")
    assert p["own"]["predicted_step_s"] <= p["published"]["predicted_step_s"]
    assert p["published"]["p2p_bytes"] > p["own"]["p2p_bytes"] > 0
    r = run_cli("extrapolate", "--target", "mt-nlg-530b", "--gpu", "A100-80GB", "--num-gpus", "2240", "--plan", "published")
    assert r.returncode == 0 and "layout: 2,240 ranks = dp 8 (ZeRO-1) x tp 8 x pp 35" in r.stdout
    assert "why: the layout is the published one, as --plan asked" in r.stdout
    r = run_cli("extrapolate", "--target", "gpt3-175b", "--plan", "published")
    assert r.returncode == 2 and "this target has no published layout" in r.stderr


def test_extrapolate_counts_the_pipeline_traffic_it_simulates():
    r = run_cli("extrapolate", "--target", "mt-nlg-530b", "--gpu", "A100-80GB", "--num-gpus", "2240", "--plan",
                "published", "--comm", "counted", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)["memory"]
    comm, lay = out["communication"], out["layout"]
    # simulated with sequence parallelism, as the extrapolation assumes: the stage sends b*s*h/tp per micro-batch
    assert comm["source"].startswith("counted: minigpt simulate --plan dp=8,tp=8,pp=35,zero=1,sp=1 --recompute")
    assert comm["counted_pp_bytes_per_gpu_per_step"] == pytest.approx(lay["pipeline_p2p_bytes_per_gpu_per_step"], rel=1e-6)
    assert lay["pipeline_p2p_bytes_per_gpu_per_step"] == 2 * 240 * 2048 * 20480 * 2 / 8  # 2 m b s h bf16 / tp


@pytest.mark.parametrize("args, message", [
    (["--config", "tiny", "--plan", "dp=4,ep=2"], "splits a mixture's experts"),
    (["--config", "gpt4", "--plan", "dp=6,ep=4", "--set", "model.n_layer=2"], "it must divide dp = 6"),
    (["--config", "gpt4", "--plan", "dp=16,tp=2,ep=16,zero=0", "--set", "model.n_layer=2"], "use zero=1 or more"),
    (["--config", "gpt4", "--plan", "dp=2,sp=1,tp=8", "--set", "model.n_layer=2"], "does not run with a mixture of experts"),
])
def test_bad_3d_simulations_are_one_line(args, message):
    r = run_cli("simulate", *args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_training_refuses_an_expert_parallel_plan_it_cannot_run_before_work(tmp_path):
    """ep must divide the data-parallel ranks (one process here; tests/test_sharding.py trains ep=2 under torchrun)."""
    out = f"train.out_dir={tmp_path / 'run'}"
    r = run_cli("train", "--config", "tiny", "--set", "model.n_expert=4", "--plan", "ep=2", "--set", out)
    assert r.returncode == 2 and "it must divide dp = 1" in r.stderr and not (tmp_path / "run").exists()
