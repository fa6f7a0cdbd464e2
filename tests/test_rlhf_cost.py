"""The cost of post-training at scale (analytic/rlhf.py): FLOPs per phase as the formula says, the published
DeepSpeed-Chat rows read and set beside predictions with their ratio, and the CLI's --rlhf."""

import json

import pytest
from conftest import run_cli

from minigpt.analytic.flops import forward_matmul_flops_per_token
from minigpt.analytic.rlhf import RLHFJob, backtest, opt, published_runs, step3_flops, step3_seconds
from minigpt.core.hardware import gpu_by_name


def test_step3_flops_follow_the_phases():
    actor, reward = opt(32, 4096), opt(24, 1024)
    job = RLHFJob(actor, reward, queries=10, prompt_tokens=64, answer_tokens=64, actor_recompute=False)
    f = lambda c: forward_matmul_flops_per_token(c, 128) * 128
    got = step3_flops(job)
    assert got["generation"] == pytest.approx(10 * f(actor))
    assert got["experience"] == pytest.approx(10 * (2 * f(actor) + 2 * f(reward)))
    assert got["training"] == pytest.approx(10 * 3 * (f(actor) + f(reward)))
    lora = step3_flops(RLHFJob(actor, reward, 10, 64, 64, actor_lora=True, actor_recompute=False))
    assert lora["training"] == pytest.approx(10 * (2 * f(actor) + 3 * f(reward)))  # no weight gradients
    grpo = step3_flops(RLHFJob(actor, reward, 10, 64, 64, actor_recompute=False, method="grpo", group=4))
    assert grpo["generation"] == pytest.approx(40 * f(actor)) and grpo["experience"] == pytest.approx(40 * f(actor))


def test_generation_is_bandwidth_bound_and_gathers_when_the_weights_do_not_fit():
    gpu = gpu_by_name("A100-40GB")
    small = step3_seconds(RLHFJob(opt(32, 4096), opt(24, 1024), 1024), gpu, 8, 0.3, 0.5)
    big = step3_seconds(RLHFJob(opt(48, 7168), opt(24, 1024), 1024), gpu, 8, 0.3, 0.5)
    assert not small["weights_gathered_per_step"] and big["weights_gathered_per_step"]
    faster = step3_seconds(RLHFJob(opt(32, 4096), opt(24, 1024), 1024), gpu, 8, 0.3, 1.0)
    assert faster["generation_s"] < small["generation_s"]  # more bandwidth, faster decoding


def test_backtest_sets_every_published_row_beside_its_prediction():
    rows = backtest()
    published = published_runs()
    assert len(rows) == len(published) >= 10
    for r, p in zip(rows, published):
        assert r["published_hours"] == p["hours"] and p["source"] and p["settings_source"]
        assert r["ratio"] == pytest.approx(r["predicted_hours"] / r["published_hours"])
        assert r["band_hours"][0] <= r["predicted_hours"] <= r["band_hours"][1]


def test_extrapolate_rlhf_prints_the_pipeline_and_the_published_times():
    r = run_cli("extrapolate", "--rlhf", "--target", "gpt3-13b", "--sft-tokens", "2.7e7", "--rm-pairs", "1e5", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    a, band = d["assumed"], d["band"]
    assert band["fast (high efficiency)"]["pipeline_s"] < a["pipeline_s"] < band["slow (low efficiency)"]["pipeline_s"]
    assert a["sft_s"] > 0 and a["rm_s"] > 0 and a["usd"] > 0 and d["backtest_summary"]["rows"] == len(d["backtest"])
    text = run_cli("extrapolate", "--rlhf", "--target", "gpt3-13b", "--rl", "grpo").stdout
    assert "GRPO: 8 answers per query" in text and "DeepSpeed-Chat's published step-3 times" in text
    bad = run_cli("extrapolate", "--rlhf", "--gen-tp", "0")
    assert bad.returncode == 2 and bad.stderr.startswith("error:")
