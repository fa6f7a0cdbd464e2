"""Costs at scale a user can trust (issue 40): expert parallelism costed in step time and memory, the step's
settings given or banded, uneven pipeline stages, the backtest's band and its coverage."""

from __future__ import annotations

import dataclasses
import json

import pytest
from conftest import REPO, run_cli

from minigpt.analytic import band as B, published as P, steptime as T
from minigpt.core.config import ModelConfig
from minigpt.core.errors import UserError
from minigpt.core.hardware import gpu_by_name
from minigpt.core.plan import ParallelPlan
from minigpt.measure.simulate import SimSpec, simulate

H100 = T.gpu_rates(gpu_by_name("H100"))
MOE = ModelConfig(n_layer=4, n_head=8, n_embd=512, block_size=1024, vocab_size=4096, n_expert=8, n_expert_active=2)


def _extrapolate(*args: str) -> dict:
    r = run_cli("extrapolate", "--json", *args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_uneven_stages_time_the_busiest_and_bad_counts_are_refused():
    assert T.stage_layers(126, 16, 7, 7) == [7] + [8] * 14 + [7]  # Llama 3 (Dubey et al. 2024)
    assert T.stage_layers(126, 16) == [8] * 14 + [7] * 2  # torchtitan's split: the earliest stages one more
    c = dataclasses.replace(MOE, n_expert=0, n_layer=10)
    setup = T.Setup(seq_len=1024, global_batch=8)
    even = T.step_time(c, ParallelPlan(pp=2), setup, H100)
    uneven = T.step_time(c, ParallelPlan(pp=2), dataclasses.replace(setup, first_stage_layers=7), H100)
    assert uneven["stage_layers"] == [7, 3] and uneven["busiest_stage"] == 0
    assert uneven["step_s"] > even["step_s"]  # 7 layers a micro-batch on the busiest stage instead of 5 (+ head)
    with pytest.raises(UserError, match="each stage needs at least one layer"):
        T.stage_layers(10, 4, 5, 5)


def test_all_to_all_and_expert_states_follow_ep_and_equal_what_simulate_counts():
    """The step-time model's all-to-all bytes are the ones the real expert-parallel code sends on a fake process
    group (4 per MoE layer with no recompute, (ep-1)/ep of each rank's k routed tokens), to the byte."""
    plan = ParallelPlan(dp=4, ep=4)
    setup = T.Setup(seq_len=MOE.block_size, micro_batch=1, global_batch=4)
    near, far = T.all_to_all_bytes(MOE, plan, setup)
    r = simulate(MOE, SimSpec(plan, micro_batch=1, micro_batches=1), gpu_by_name("H100"))
    assert near + far == pytest.approx(r["comm_bytes_per_rank_by_group"]["ep"] / MOE.n_layer, rel=1e-9)
    assert T.all_to_all_bytes(MOE, ParallelPlan(dp=4), setup) == (0.0, 0.0)
    # ep within a node goes on NVLink; over 2 nodes (ep 16 at tp 1: 8 in a node) half the peers are on the NIC
    near16, far16 = T.all_to_all_bytes(MOE, ParallelPlan(dp=16, ep=16), setup)
    assert far == 0 and near16 / far16 == pytest.approx(7 / 8)
    # capacity factor and imbalance scale the busiest rank's expert GEMMs and its all-to-all
    loaded = T.all_to_all_bytes(MOE, plan, dataclasses.replace(setup, expert_imbalance=1.5))
    assert sum(loaded) == pytest.approx(1.5 * (near + far))


def test_extrapolate_costs_expert_parallelism_for_gpt4():
    rows = {ep: _extrapolate("--target", "gpt4", "--gpu", "H100", "--plan", f"dp=16,tp=8,pp=15,ep={ep}")["experts"]
            for ep in (2, 8)}
    assert rows[8]["expert_states_bytes_per_gpu"] < rows[2]["expert_states_bytes_per_gpu"]
    assert rows[8]["all_to_all_bytes_per_gpu_per_step"] > rows[2]["all_to_all_bytes_per_gpu_per_step"]  # (ep-1)/ep
    assert rows[8]["all_to_all_exposed_s_per_step"] > 0


def test_extrapolate_prints_simulates_all_to_all_count_beside_its_own(tmp_path):
    """GPT-4's width and experts on 8 layers: the all-to-all bytes simulate counts on the chosen layout equal the
    step-time model's (the step's micro-batches of one stage, full recompute: 6 a MoE layer)."""
    text = (REPO / "configs" / "gpt4.toml").read_text().replace("n_layer = 120", "n_layer = 8").replace(
        'published_plan = "tp=8,pp=15"', 'published_plan = "tp=1,pp=2"')
    target = tmp_path / "gpt4-8-layers.toml"
    target.write_text(text)
    r = _extrapolate("--target", str(target), "--gpu", "H200", "--plan", "dp=8,tp=1,pp=4,ep=4,zero=3",
                     "--num-gpus", "32", "--comm", "counted", "--tokens", "1e9")
    assert r["experts"]["ep"] == 4 and r["experts"]["counted_over_predicted"] == pytest.approx(1.0, rel=1e-6)


def test_the_band_holds_the_prediction_and_moves_days_and_cost_inversely():
    r = _extrapolate("--target", "gpt3-175b", "--gpu", "H100", "--num-gpus", "1024")
    band = r["band"]
    assert band["mfu"][0] < r["mfu"] < band["mfu"][1]
    assert band["days"][0] < r["days"] < band["days"][1] and band["cost_usd"][0] < r["cost_usd"] < band["cost_usd"][1]
    assert band["days"][1] / r["days"] == pytest.approx(r["mfu"] / band["mfu"][0])
    assert {"recompute=selective", "overlap=backward", "reduce_dtype=bf16", "loss=fused"} <= set(band["settings_tried"])
    assert band["settings_tried"]["loss=fused"] > r["mfu"]  # one fused kernel moves fewer bytes than Megatron's default
    given = _extrapolate("--target", "gpt3-175b", "--gpu", "H100", "--num-gpus", "1024", "--recompute", "selective",
                         "--overlap", "full", "--reduce-dtype", "bf16", "--micro-batch", "1", "--loss", "torch")
    assert not any(k.startswith(("recompute", "overlap", "reduce_dtype", "micro_batch", "loss"))
                   for k in given["band"]["settings_tried"])
    assert "loss torch" in given["mfu_source"] and "loss megatron (default)" in r["mfu_source"]
    assert given["mfu"] == pytest.approx(band["settings_tried"]["recompute=selective"], rel=0.05)
    assert "recompute selective" in given["mfu_source"] and "recompute full (default)" in r["mfu_source"]


def test_settings_are_checked_before_work():
    r = run_cli("extrapolate", "--target", "gpt3-175b", "--stage-layers", "7,7")
    assert r.returncode == 2 and "give --plan pp=N" in r.stderr
    r = run_cli("extrapolate", "--target", "gpt3-175b", "--recompute", "sometimes")
    assert r.returncode == 2 and "invalid choice" in r.stderr
    r = run_cli("extrapolate", "--target", "gpt3-13b", "--gpu", "A100", "--num-gpus", "64", "--plan", "backend=ddp", "--json")
    assert json.loads(r.stdout)["memory"]["layout"]["zero_stage"] == 0  # DDP replicates model states


def test_backtest_band_coverage_is_counted_and_variants_move_the_prediction():
    b = P.backtest()
    held = b["summary"]["held-out"]
    assert held["band_coverage"] >= 0.8  # issue 40: on held-out runs
    opt = next(r for r in b["runs"] if r["name"].startswith("OPT-175B"))
    lo, hi = opt["band"]["settings_error"]
    assert lo < opt["error"] < hi and opt["band"]["variants"] >= 3  # micro-batch, recompute, attention, reduce dtype
    run = next(r for r in P.load_runs() if r["name"].startswith("OPT-175B"))
    assert {v.get("micro_batch") for v in B.run_variants(run)} >= {2, 4, 8}


def test_a_peak_given_as_a_range_predicts_at_its_middle_and_the_band_tries_both_ends():
    """torchtitan's H100s run below the datasheet's peak, 'between SXM and NVL' (their footnote): the prediction is
    at the middle, slower than at the SXM's peak and faster than at the NVL's, and the band holds both ends."""
    run = next(r for r in P.load_runs() if r["name"] == "torchtitan Llama 3.1 8B FSDP+compile 8 GPUs")
    lo, hi = run["peak_tflops_between"]
    middle = P.predict(run)["predicted"]
    at = {x: P.predict({**run, "peak_tflops": x})["predicted"] for x in (lo, hi)}
    assert at[lo] < middle < at[hi]
    datasheet = {**{k: v for k, v in run.items() if k != "peak_tflops_between"}, "unknown": []}
    assert P.predict(datasheet)["predicted"] == pytest.approx(at[hi], rel=1e-9)  # 989: the SXM datasheet's
    assert {v.get("peak_tflops") for v in B.run_variants(run)} >= {lo, hi}
    rates = T.gpu_rates(gpu_by_name("H100"), "bf16", peak_tflops=lo)
    assert rates.matmul_flops == pytest.approx(H100.matmul_flops * lo / 989) and "given for this part" in rates.sources["peak"]


def test_a_published_mixture_is_predicted_with_its_all_to_alls_but_minigpt_still_refuses_to_run_it():
    """Grok 1 on 2,048 GPUs (tp 4 with sequence parallelism, ep 8): predicted with its expert all-to-alls timed; the
    same layout is still refused where minigpt would run it (its backends have no sequence parallelism with experts)."""
    run = next(r for r in P.load_runs() if r["name"] == "DGXC Grok 1 314B 2048 GPUs")
    c, plan, setup, rates = P.run_inputs(run)
    st = T.step_time(c, plan, setup, rates)
    assert plan.sp and plan.ep == 8 and st["traffic_s"]["ep"] > 0 and st["parts_s"]["ep_comm"] > 0
    with pytest.raises(UserError, match="sequence parallelism"):
        plan.check_model(c)


def test_the_fitted_share_is_said_where_the_prediction_is():
    assert "fitted" in H100.sources["sustained"] and H100.sustained == T.SUSTAINED[0]
    assert "one fitted constant" in P.backtest()["model"]


def test_a_slower_network_is_one_setting_every_figure_reads():
    """--internode-gbs (BLOOM's Omni-Path gave 6.25 GB/s per GPU) slows the predicted step and the transfers printed
    beside it alike."""
    base = _extrapolate("--target", "gpt3-175b", "--gpu", "A100", "--num-gpus", "1024", "--plan", "tp=8,pp=8")
    slow = _extrapolate("--target", "gpt3-175b", "--gpu", "A100", "--num-gpus", "1024", "--plan", "tp=8,pp=8",
                        "--internode-gbs", "6.25")
    assert slow["mfu"] < base["mfu"]
    assert slow["memory"]["communication"]["link_bytes_per_s"] < base["memory"]["communication"]["link_bytes_per_s"]
    assert slow["step_time"]["traffic_s"]["dp"] > base["step_time"]["traffic_s"]["dp"]


def test_nccl_latency_follows_nccls_own_model():
    """Ring / Simple hops of NCCL's tuning model (src/graph/tuning.cc, 2.18-2.21), worked by hand: 8.4 us base, 3.4 a
    hop in a node, 14 a hop between nodes, a hop in a node at least 3x the host's network overhead once the ring
    leaves it; all-reduce at the tree's 2 ((ranks a node - 1) x 28 + floor(log2 nodes) x 28) us where that is less."""
    lat = T.collective_latency_s
    assert lat("all_gather", 512, 8, "intel") == pytest.approx((8.4 + 448 * 3.4 + 63 * 14) * 1e-6)
    assert lat("reduce_scatter", 128, 8, "amd") == pytest.approx((8.4 + 112 * 6.0 + 15 * 14) * 1e-6)
    assert lat("all_reduce", 8, 8, "intel") == pytest.approx((8.4 + 14 * 3.4) * 1e-6)  # one node: the ring
    assert lat("all_reduce", 1024, 8, "intel") == pytest.approx(2 * (7 * 28 + 7 * 28) * 1e-6)  # 128 nodes: the tree
    assert lat("all_gather", 512, 8, "") == 0.0 == lat("all_gather", 1, 1, "intel")


def test_latency_is_a_setting_off_by_default_that_grows_with_the_fsdp_group():
    """FSDP at the same work per GPU: with bandwidth terms only its transfers barely move from 64 to 1,024
    ranks; NCCL's latency, one gather a layer, grows with the ring and comes out from under the compute."""
    c = ModelConfig(n_layer=24, n_head=16, n_embd=2048, block_size=2048, vocab_size=50304)

    def dp_comm(dp: int, latency: str) -> float:
        setup = T.Setup(seq_len=2048, micro_batch=4, global_batch=4 * dp, overlap="prefetch", latency=latency)
        return T.step_time(c, ParallelPlan(dp=dp, zero=3), setup, H100)["traffic_s"]["dp"]

    assert dp_comm(1024, "none") < 1.02 * dp_comm(64, "none")  # the ring share (n - 1) / n alone
    assert dp_comm(64, "nccl") > dp_comm(64, "none") and dp_comm(1024, "nccl") > 5 * dp_comm(64, "nccl") / 2
    with pytest.raises(UserError, match="latency"):
        T.Setup(seq_len=2048, latency="sometimes")
    base = _extrapolate("--target", "gpt3-13b", "--gpu", "A100", "--plan", "dp=1024,zero=3", "--overlap", "prefetch")
    slow = _extrapolate("--target", "gpt3-13b", "--gpu", "A100", "--plan", "dp=1024,zero=3", "--overlap", "prefetch",
                        "--latency", "nccl")
    assert slow["mfu"] < 0.9 * base["mfu"] and "latency nccl" in slow["mfu_source"]
    assert "latency none (default)" in base["mfu_source"]


def test_backtest_can_count_latency_in_every_run_and_it_worsens_the_development_fit():
    """`backtest --latency nccl`: the figure docs/extrapolate.md gives for not counting latency by default."""
    base, nccl = P.backtest(), P.backtest(latency="nccl")
    dev = lambda b: b["summary"]["development"]["median_abs_error"]
    assert dev(nccl) > dev(base) and "collective latency: nccl" in nccl["model"]
    assert all("band" in r for r in base["runs"]) and not any("band" in r for r in nccl["runs"])


def test_the_pending_held_out_set_builds_every_run_with_its_published_parameter_count():
    """Held-out set 5 (benchmarks/llm_foundry_a100_2023.toml) waits, unevaluated, for the next revision: each run's
    model, plan and rates build, and its parameter count equals the table's NumParams (its shapes are MPT's). Built
    only: predicting it would spend it."""
    import re

    from minigpt.analytic.flops import param_counts

    runs = P.load_runs(REPO / "benchmarks" / "llm_foundry_a100_2023.toml")
    assert len(runs) == 50 and {r["set"] for r in runs} == {"held-out"}
    for run in runs:
        c, plan, setup, _ = P.run_inputs(run)
        assert param_counts(c).total == int(re.search(r"NumParams (\d+)", run["source"]).group(1)), run["name"]
        assert plan.dp * plan.tp * plan.pp == int(run["name"].split()[1]) and setup.seq_len == 2048
