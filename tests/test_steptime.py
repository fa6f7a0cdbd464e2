"""The step-time model (analytic/steptime.py): its parts add up, each part answers to its input, the
predicted MFU moves the right way, and the backtest against published runs is computed, not typed in."""

import dataclasses
import json

import pytest
from conftest import run_cli

from minigpt.analytic import flops as F, steptime as T
from minigpt.analytic.published import TABLE, backtest, load_runs, predict, run_inputs
from minigpt.core.config import ModelConfig
from minigpt.core.errors import UserError
from minigpt.core.hardware import gpu_by_name
from minigpt.core.plan import ParallelPlan

GPT_13B = ModelConfig(n_layer=40, n_head=40, n_embd=5120, block_size=2048, vocab_size=51200)
A100 = T.gpu_rates(gpu_by_name("A100"), "bf16")


def step(c=GPT_13B, plan=ParallelPlan(dp=64, tp=8, zero=1), rates=A100, **kw):
    setup = T.Setup(**{"seq_len": c.block_size, "global_batch": 512, "recompute": "full", **kw})
    return T.step_time(c, plan, setup, rates)


def test_parts_add_up_and_mfu_is_the_exact_flops_over_the_step():
    st = step()
    assert st["step_s"] == pytest.approx(sum(st["parts_s"].values()))
    flops = F.train_flops_per_token(GPT_13B, 2048, "exact") * st["tokens_per_step"]
    assert st["mfu"] == pytest.approx(flops / st["step_s"] / 512 / 312e12)
    assert st["hfu"] > st["mfu"]  # full recompute: one more forward of the layers
    assert st["tokens_per_s_per_gpu"] == pytest.approx(512 * 2048 / st["step_s"] / 512)


def test_a_timed_norm_or_activation_pass_counts_where_it_is_slower_than_its_bytes():
    c = ModelConfig(n_layer=4, n_head=4, n_embd=128, block_size=128, vocab_size=2048)
    plan, setup = ParallelPlan(), T.Setup(seq_len=128, micro_batch=32, global_batch=32, act_bytes=4)
    cpu = T.Rates(name="cpu", peak_flops=1e11, matmul_flops=1e11, attention_flops=5e10, hbm_bytes_per_s=5e10,
                  nvlink_bytes_per_s=1.0, internode_bytes_per_s=1.0)
    base = T.step_time(c, plan, setup, cpu)["parts_s"]["memory"]
    slow = {"norm": 1e-3, "activation": 5e-3}  # seconds forward + backward, slower than their bytes here
    timed = T.step_time(c, plan, setup, dataclasses.replace(cpu, pass_time=lambda kind, rows, width, name: slow[kind]))
    rows, h, f = 32 * 128, c.n_embd, c.ffn_hidden
    norm_bytes_s, act_bytes_s = 3 * 2 * rows * h * 4 / 5e10, 3 * 2 * rows * f * 4 / 5e10
    extra = c.n_layer * (2 * (1e-3 - norm_bytes_s) + (5e-3 - act_bytes_s)) + (1e-3 - norm_bytes_s)  # + the final norm
    assert timed["parts_s"]["memory"] == pytest.approx(base + extra)
    assert timed["step_s"] == pytest.approx(sum(timed["parts_s"].values()))
    fast = dataclasses.replace(cpu, pass_time=lambda kind, rows, width, name: 1e-9)  # faster than its bytes: the bytes count
    assert T.step_time(c, plan, setup, fast)["parts_s"]["memory"] == pytest.approx(base)


def test_a_gemm_is_compute_bound_at_the_matmul_rate_or_memory_bound_at_hbm():
    big = T.Gemm("big", 8192, 8192, 8192)
    # at the sustained share of the cited rate (the one fitted constant), and at the cited rate alone without it
    assert A100.sustained == T.SUSTAINED[0] < 1
    assert T.forward_seconds(big, A100, 2) == pytest.approx(big.flops / (A100.matmul_flops * A100.sustained), rel=0.01)
    alone = dataclasses.replace(A100, sustained=1.0)
    assert T.forward_seconds(big, alone, 2) == pytest.approx(big.flops / A100.matmul_flops, rel=0.01)
    thin = T.Gemm("thin", 1, 8192, 8192)  # a decode-like GEMV: weight bytes over HBM
    assert T.forward_seconds(thin, A100, 2) == pytest.approx(thin.bytes(2) / A100.hbm_bytes_per_s)
    # wave quantization: 218 tiles (either orientation) on 108 SMs take three waves
    assert T.wave_efficiency(256 * 109, 256, 1, 108) == pytest.approx(218 / 324)
    assert T.wave_efficiency(256 * 108, 128, 1, 108) == 1.0


def test_rates_are_one_way_links_at_a_stated_efficiency_and_cited():
    h100 = T.gpu_rates(gpu_by_name("H100"))
    assert h100.nvlink_bytes_per_s == pytest.approx(450e9 * T.LINK_EFFICIENCY[0])  # one way, not the 900 total
    assert h100.internode_bytes_per_s == pytest.approx(50e9 * T.LINK_EFFICIENCY[0])
    assert "mamf-finder" in h100.sources["matmul"] and "assumption" in h100.sources["links"]


def test_predicted_mfu_rises_with_model_size():
    small = dataclasses.replace(GPT_13B, n_layer=24, n_head=16, n_embd=2048)
    big = dataclasses.replace(GPT_13B, n_layer=48, n_head=64, n_embd=8192)
    mfus = [step(c, ParallelPlan(dp=64, tp=8, zero=1))["mfu"] for c in (small, GPT_13B, big)]
    assert mfus[0] < mfus[1] < mfus[2]


def test_more_micro_batches_shrink_the_bubble():
    plan = ParallelPlan(dp=8, tp=8, pp=8)
    few, many = step(plan=plan, global_batch=64), step(plan=plan, global_batch=1024)
    assert few["bubble_fraction"] == pytest.approx(7 / (8 + 7)) and many["bubble_fraction"] == pytest.approx(7 / (128 + 7))
    assert few["mfu"] < many["mfu"]
    looped = step(plan=ParallelPlan(dp=8, tp=8, pp=8, schedule="interleaved-1f1b", stages_per_rank=2), global_batch=64)
    assert few["mfu"] < looped["mfu"]  # interleaving halves the bubble


def test_tensor_parallel_across_nodes_costs_more_than_within_one():
    inside, across = step(plan=ParallelPlan(dp=32, tp=8)), step(plan=ParallelPlan(dp=16, tp=16))
    assert across["parts_s"]["tp_comm"] > 5 * inside["parts_s"]["tp_comm"] and across["mfu"] < inside["mfu"]
    # overlap hides what the GEMMs can cover; none hides nothing
    hidden = step(plan=ParallelPlan(dp=32, tp=8), overlap="full")
    assert hidden["parts_s"]["tp_comm"] < inside["parts_s"]["tp_comm"]


def test_data_parallel_traffic_follows_the_zero_stage_and_the_overlap():
    plan0, plan1 = ParallelPlan(dp=64, tp=8, zero=0), ParallelPlan(dp=64, tp=8, zero=1)
    z0, z1 = step(plan=plan0, grad_bytes=4, param_bytes=2), step(plan=plan1, grad_bytes=4, param_bytes=2)
    local = F.param_counts(GPT_13B).total / 8
    assert z0["traffic_s"]["dp"] * A100.internode_bytes_per_s == pytest.approx(2 * 63 / 64 * local * 4)
    assert z1["traffic_s"]["dp"] * A100.internode_bytes_per_s == pytest.approx(63 / 64 * local * (4 + 2))
    overlapped = step(plan=plan1, grad_bytes=4, overlap="full")
    assert overlapped["parts_s"]["dp_comm"] < z1["parts_s"]["dp_comm"] == pytest.approx(z1["traffic_s"]["dp"])


def test_backtest_is_computed_from_the_table_and_summarised_per_set():
    b = backtest()
    runs = load_runs()
    assert len(b["runs"]) == len(runs) >= 20
    assert {r["set"] for r in b["runs"]} == {"development", "held-out"}
    for row in b["runs"]:
        ratio = row["published"] / row["predicted"] if row["metric"] == "step_s" else row["predicted"] / row["published"]
        assert row["error"] == pytest.approx(ratio - 1)  # on throughput: a longer step is a slower prediction
    errs = sorted(abs(r["error"]) for r in b["runs"] if r["set"] == "held-out")
    assert b["summary"]["held-out"]["max_abs_error"] == errs[-1]
    # the prediction answers to its inputs: a slower GPU predicts less, the published figure is untouched
    run = next(r for r in runs if r["name"] == "Megatron-LM 1T")
    slower = predict({**run, "gpu": "V100", "dtype": "fp16"})
    assert slower["predicted"] < predict(run)["predicted"] and slower["published"] == predict(run)["published"]
    c, plan, setup, _ = run_inputs(run)
    assert (plan.tp, plan.pp, plan.dp, plan.stages_per_rank, setup.recompute) == (8, 64, 6, 2, "full")


def test_a_setup_refuses_settings_it_does_not_model():
    for bad in ({"recompute": "ful"}, {"overlap": "all"}, {"attention": "sdpa"}, {"micro_batch": 0}, {"kernels": "jit"}):
        with pytest.raises(UserError):
            T.Setup(seq_len=8, **bad)


def test_backtest_cli_json_and_errors(tmp_path):
    r = run_cli("backtest", "--json")
    data = json.loads(r.stdout)
    assert r.returncode == 0 and data["summary"]["all"]["runs"] == len(data["runs"])
    bad = tmp_path / "runs.toml"
    bad.write_text('[family.a]\nseq_len = 1\n[[run]]\nname = "x"\nfamily = "a"\n')
    r = run_cli("backtest", "--table", str(bad))
    assert r.returncode == 2 and r.stderr.startswith("error:") and "plan" in r.stderr and "Traceback" not in r.stderr
    misspelled = tmp_path / "misspelled.toml"  # a misspelled setting is an error, never silently "none"
    misspelled.write_text(TABLE.read_text().replace('recompute = "full"', 'recompute = "ful"', 1))
    r = run_cli("backtest", "--table", str(misspelled))
    assert r.returncode == 2 and "recompute = 'ful'" in r.stderr and "selective" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("old, new, says", [
    ("global_batch = 512", "global_batch = 7", "not a whole number of micro-batches"),
    ('plan = "tp=1,pp=1,dp=32"', 'plan = "tp=1,pp=48,dp=32"', "more pipeline stages than the model's 24 layers"),
    ('plan = "tp=1,pp=1,dp=32"', 'plan = "tp=5,pp=1,dp=32"', "does not divide by the tensor-parallel degree 5"),
    ("n_layer = 24, n_head = 24", "n_layer = 24.5, n_head = 24", "model.n_layer = 24.5 has type float"),
    ("n_layer = 24, n_head = 24", "n_layer = 0, n_head = 24", "model.n_layer = 0 must be a positive integer"),
    ("tflops_per_gpu = 137,", "tflops_per_gpu = -137,", "published needs one positive figure"),
    ('set = "development"\nsource', 'set = "dev"\nsource', "set 'dev' is not one of development, held-out"),
    ('dtype = "fp16"', 'dtype = "fp64"', "dtype 'fp64' has no A100-80GB peak"),
    ("global_batch = 512", 'global_batch = 512\nkernels = "eager"', "do not cover dropout of this model"),
    ("global_batch = 512", 'global_batch = 512\nkernels = "jit"', "kernels = 'jit' is not one of fused, eager"),
    ("global_batch = 512", 'global_batch = 512\nkernal = "eager"', "unknown key 'kernal'; known: seq_len"),
    ('plan = "tp=1,pp=1,dp=32"', 'plan = "tp=1,pp=1,dp=16,cp=2"', "context parallelism (cp=2) runs with a flash"),
    ("global_batch = 512", "global_batch = 512\npeak_tflops_between = [312, 100]", "must be [low, high] TFLOP/s"),
    ("global_batch = 512", "global_batch = 512\npeak_tflops_between = [312]", "must be [low, high] TFLOP/s"),
    ('unknown = ["micro_batch", "stages_per_rank", "grad_bytes"]', 'unknown = ["clock"]', "is not a setting the band can"),
    ('unknown = ["micro_batch", "stages_per_rank", "grad_bytes"]', 'unknown = ["peak_tflops"]', "choose from micro_batch"),
])
def test_a_crafted_published_run_is_refused_by_name_and_fix(tmp_path, old, new, says):
    table = tmp_path / "runs.toml"
    assert old in TABLE.read_text()
    table.write_text(TABLE.read_text().replace(old, new, 1))
    with pytest.raises(UserError, match="published run 'Megatron-LM 1.7B'") as e:
        backtest(table)
    assert says in str(e.value)


def test_traffic_is_reported_before_overlap_and_the_exposed_part_in_the_parts():
    plan = ParallelPlan(dp=32, tp=8)
    hidden, exposed = step(plan=plan, overlap="full"), step(plan=plan)
    assert exposed["traffic_s"]["tp"] > 0 and hidden["traffic_s"]["tp"] == pytest.approx(exposed["traffic_s"]["tp"])
    assert exposed["parts_s"]["tp_comm"] == pytest.approx(exposed["traffic_s"]["tp"])
    assert hidden["parts_s"]["tp_comm"] < hidden["traffic_s"]["tp"]


def test_a_data_parallel_group_crosses_nodes_on_the_nics_of_its_ranks():
    from minigpt.core.hardware import collective_link_gbs
    h100 = gpu_by_name("H100")
    assert collective_link_gbs(h100, 8, 8)[0] == 450  # inside one node: NVLink one way
    assert collective_link_gbs(h100, 64, 1)[0] == 50  # tp = 8: one rank per node, one NIC
    assert collective_link_gbs(h100, 64, 4)[0] == 200  # tp = 2: four ranks, four NICs
    assert collective_link_gbs(h100, 64, 8)[0] == 400  # eight NICs, still under NVLink's 450
    assert collective_link_gbs(gpu_by_name("A100"), 64, 8)[0] == 200
    # the same gradient bytes per node take the same time whether tp splits them or the NICs do
    rates = T.gpu_rates(h100)
    wide = step(plan=ParallelPlan(dp=64, tp=1), rates=rates, recompute="none")["traffic_s"]["dp"]
    tall = step(plan=ParallelPlan(dp=8, tp=8), rates=rates, recompute="none")["traffic_s"]["dp"]
    assert wide == pytest.approx(tall * (63 / 64) / (7 / 8), rel=1e-9)


def test_a_causal_flash_kernel_computes_half_the_square():
    setup = T.Setup(seq_len=2048, attention="flash")
    mb = T.micro_batch_seconds(GPT_13B, ParallelPlan(), setup, A100)
    square = T.attention_flops(GPT_13B, ParallelPlan(), 1, 2048)
    assert mb["parts"]["attention"] == pytest.approx(40 * 3 * square / 2 / (A100.attention_flops * A100.sustained))


def test_fsdp_shard_grad_op_gathers_once_a_micro_batch_and_full_shard_twice():
    # m = 2 micro-batches; an fp32 reduce-scatter moves 2 G, each gather of bf16 parameters G
    kw = {"seq_len": 2048, "global_batch": 256, "micro_batch": 2, "grad_bytes": 4}
    dp = {(z, overlap): step(plan=ParallelPlan(dp=64, zero=z), overlap=overlap, **kw)["traffic_s"]["dp"]
          for z, overlap in ((2, "prefetch"), (3, "prefetch"), (2, "backward"))}
    assert dp[(3, "prefetch")] / dp[(2, "prefetch")] == pytest.approx(6 / 4)  # 2 G + 2 m G against 2 G + m G
    assert dp[(2, "backward")] / dp[(2, "prefetch")] == pytest.approx(3 / 4)  # ZeRO-2 elsewhere: one gather a step


def test_the_flash_backward_runs_at_its_cited_rate_where_one_is_cited():
    h100 = T.gpu_rates(gpu_by_name("H100"), "bf16")
    assert A100.attention_bwd_flops == 0 and h100.attention_bwd_flops < h100.attention_flops  # Shah et al. 2024, Fig. 7
    fa2 = T.gpu_rates(gpu_by_name("H100"), "bf16", flash="fa2")
    assert fa2.attention_bwd_flops < fa2.attention_flops < h100.attention_flops
    per = T.flash_attention_flops(GPT_13B, ParallelPlan(), 1, 2048) / h100.sustained
    for recompute, forwards in (("none", 1), ("full", 2)):  # a recomputed forward at the forward's rate
        mb = T.micro_batch_seconds(GPT_13B, ParallelPlan(), T.Setup(seq_len=2048, recompute=recompute), h100)
        expect = 40 * per * (forwards / h100.attention_flops + 2 / h100.attention_bwd_flops)
        assert mb["parts"]["attention"] == pytest.approx(expect)


def test_the_loss_moves_the_bytes_its_code_moves_over_the_logits():
    c = ModelConfig(n_layer=2, n_head=16, n_embd=2048, block_size=4096, vocab_size=131072)
    h100, plan = T.gpu_rates(gpu_by_name("H100"), "bf16"), ParallelPlan(tp=2)
    logits = 4096 * 131072 / 2  # T x V / t elements on a rank
    parts = {loss: T.micro_batch_seconds(c, plan, T.Setup(seq_len=4096, loss=loss), h100)["parts"]["memory"]
             for loss in T.LOSS_BYTES}
    for loss, moved in (("megatron", 52), ("torch", 48)):
        assert parts[loss] - parts["fused"] == pytest.approx(logits * (moved - 16) / h100.hbm_bytes_per_s)
    with pytest.raises(UserError, match="loss = 'chunked' is not one of fused, megatron, torch"):
        T.Setup(seq_len=8, loss="chunked")


def test_recompute_policies_run_again_what_they_say():
    llama = ModelConfig(n_layer=2, n_head=32, n_kv_head=8, n_embd=4096, ffn_hidden=14336, mlp="swiglu",
                        norm="rmsnorm", pos_emb="rope", bias=False, block_size=8192, vocab_size=128256)
    plan, kw = ParallelPlan(), {"seq_len": 8192}
    op = T.recomputed_gemms(llama, plan, 1, 8192, T.Setup(recompute="op", **kw))
    # torchtitan saves every other matmul: the 2nd, 4th, 6th (wk, wo, w3: blocks of the fused q/k/v and gate/up)
    assert [g.name for g in op] == ["attn.c_attn[1]", "attn.c_proj", "mlp.c_fc[1]"]
    assert T.recomputed_gemms(llama, plan, 1, 8192, T.Setup(recompute="selective", **kw)) == []  # flash recomputes itself
    sel = T.recomputed_gemms(GPT_13B, plan, 1, 2048, T.Setup(recompute="selective", seq_len=2048, attention="materialized"))
    assert {g.name for g in sel} == {"scores", "scores_x_v"}  # Korthikanti et al.: the attention core only
    rates = T.gpu_rates(gpu_by_name("H100"))
    none, opt = (step(llama, plan, rates, recompute=r, seq_len=8192, global_batch=2) for r in ("none", "op"))
    assert none["hfu"] == pytest.approx(none["mfu"]) and opt["hfu"] > opt["mfu"]
    assert opt["step_s"] > none["step_s"]


def test_sequence_parallelism_gathers_the_gemm_inputs_again_in_the_backward():
    setup = T.Setup(seq_len=2048)
    plain = T.tp_bytes_per_layer(GPT_13B, ParallelPlan(tp=8), 1, 2048, setup)
    sp = T.tp_bytes_per_layer(GPT_13B, ParallelPlan(tp=8, sp=True), 1, 2048, setup)
    assert sp == pytest.approx(plain * 5 / 4)


def _sweep_file(tmp_path, gpu="H100", dtype="bf16", rate=600.0, name="sweep.json"):
    hw = {"bench": "hardware", "device_name": f"NVIDIA {gpu} (synthetic)", "datasheet": {"name": gpu},
          "copy_bandwidth_gbs": 3000.0,
          "gemm_sweep": {"dtype": dtype, "shapes": [[m, n, k, rate] for m in (512, 8192) for n in (1024, 32768)
                                                    for k in (1024, 16384)]}}
    path = tmp_path / name
    path.write_text(json.dumps(hw))
    return path, hw


def test_a_measured_gemm_table_interpolates_in_log_size_and_clamps():
    shapes = [[m, n, k, (100.0 if m == 64 else 400.0)] for m in (64, 1024) for n in (64, 1024) for k in (64, 1024)]
    table = T.GemmTable(shapes, "t")
    assert table.flops_per_s(64, 64, 64) == pytest.approx(100e12)  # a grid point: as measured
    assert table.flops_per_s(256, 100, 500) == pytest.approx(200e12)  # halfway in log m: the geometric mean
    assert table.flops_per_s(10**6, 10**6, 10**6) == pytest.approx(400e12)  # beyond the grid: its edge
    assert table(1024, 64, 64, batch=3) == pytest.approx(3 * 2 * 1024 * 64 * 64 / 400e12)
    not_a_grid = [[64, 64, 64, 1.0], [1024, 64, 64, 1.0], [64, 1024, 64, 1.0]]
    twice = [[64, 64, 64, 1.0], [64, 64, 64, 9.0]]  # one shape timed twice: which one counts is not for us to pick
    for bad in ([[64, 64, 64, "x"]], [[True, 64, 64, 1.0]], [[64, 64, 64]], not_a_grid, [[64, 64, 64, -1.0]], twice):
        with pytest.raises(UserError):
            T.GemmTable(bad, "t")


def test_measured_rates_time_every_gemm_from_the_sweep(tmp_path):
    _, hw = _sweep_file(tmp_path)
    cited = T.gpu_rates(gpu_by_name("H100"))
    measured = T.measured_rates(hw, cited, "sweep.json")
    g = T.Gemm("qkv", 4096, 12288, 4096)
    # the sweep's rate for this shape, at the share a training step sustains (a sweep is a microbenchmark too)
    assert T.forward_seconds(g, measured, 2) == pytest.approx(g.flops / (600e12 * measured.sustained))
    assert measured.hbm_bytes_per_s == 3000e9 and "measured" in measured.sources["matmul"]
    assert step(GPT_13B, rates=measured)["step_s"] != step(GPT_13B, rates=cited)["step_s"]
    for copy in (-1, "fast", float("nan")):  # a crafted copy bandwidth is refused, not silently replaced
        with pytest.raises(UserError, match="copy_bandwidth_gbs"):
            T.measured_rates({**hw, "copy_bandwidth_gbs": copy}, cited, "sweep.json")


def test_backtest_and_extrapolate_read_a_sweep_only_for_its_gpu_and_dtype(tmp_path):
    path, _ = _sweep_file(tmp_path)
    b = json.loads(run_cli("backtest", "--hardware", str(path), "--json").stdout)
    assert {r["gpu"] for r in b["runs"] if r["rates_measured"]} == {"H100"}
    assert any(not r["rates_measured"] for r in b["runs"]) and str(path) in b["rates"]
    r = run_cli("extrapolate", "--target", "gpt3-13b", "--gpu", "H100", "--hardware", str(path), "--json")
    assert r.returncode == 0 and "measured" in json.loads(r.stdout)["step_time"]["sources"]["matmul"]
    r = run_cli("extrapolate", "--target", "gpt3-13b", "--gpu", "A100", "--hardware", str(path))
    assert r.returncode == 2 and "not A100-80GB" in r.stderr and r.stdout == ""
    r = run_cli("extrapolate", "--target", "gpt3-13b", "--gpu", "H100", "--dtype", "fp8", "--hardware", str(path))
    assert r.returncode == 2 and "not fp8" in r.stderr
    cpu, _ = _sweep_file(tmp_path, gpu="V100", name="v100.json")
    r = run_cli("backtest", "--hardware", str(cpu))
    assert r.returncode == 2 and "no run of the table trained on it" in r.stderr
    (tmp_path / "empty.json").write_text("{}")
    r = run_cli("backtest", "--hardware", str(tmp_path / "empty.json"))
    assert r.returncode == 2 and r.stderr.startswith("error:") and "no GEMM sweep" in r.stderr


def test_an_h200_sweep_stands_for_the_h100s_gemms_but_not_its_memory(tmp_path):
    """The GPU lent to this project is an H200; the published runs trained on H100s (the same die and power
    limit): its GEMM curve stands for theirs, its HBM3e bandwidth and its links do not."""
    path, hw = _sweep_file(tmp_path, gpu="H200", name="h200.json")
    b = json.loads(run_cli("backtest", "--hardware", str(path), "--json").stdout)
    h100 = [r for r in b["runs"] if r["gpu"] == "H100"]
    assert h100 and all(r["rates_measured"] for r in h100) and "GEMMs alone for those on H100" in b["rates"]
    assert all("standing for the H100's GEMMs" in r["rates"]["matmul"] and "measured" not in r["rates"]["hbm"] for r in h100)
    cited = T.gpu_rates(gpu_by_name("H100"))
    twin = T.measured_rates(hw, cited, "h200.json", gemms_only=True)
    assert twin.hbm_bytes_per_s == cited.hbm_bytes_per_s and twin.gemm_time is not None
    assert T.measured_rates(hw, T.gpu_rates(gpu_by_name("H200")), "h200.json").hbm_bytes_per_s == 3000e9  # its own: all
    r = run_cli("extrapolate", "--target", "gpt3-13b", "--gpu", "H100", "--hardware", str(path), "--json")
    assert r.returncode == 0 and "standing for the H100" in json.loads(r.stdout)["step_time"]["sources"]["matmul"]
    links_only = tmp_path / "links.json"
    links_only.write_text(json.dumps({k: v for k, v in hw.items() if k != "gemm_sweep"}))
    r = run_cli("extrapolate", "--target", "gpt3-13b", "--gpu", "H100", "--hardware", str(links_only))
    assert r.returncode == 2 and "not H100" in r.stderr


def test_bench_hardware_sweeps_a_grid_of_gemms_on_this_cpu(tmp_path):
    import torch

    from minigpt.measure.bench import gemm_sweep
    sweep = gemm_sweep(torch.device("cpu"), "fp32", 3, {"m": (32, 64), "n": (32,), "k": (32, 64)})
    assert [s[:3] for s in sweep["shapes"]] == [[32, 32, 32], [32, 32, 64], [64, 32, 32], [64, 32, 64]]
    assert all(s[3] > 0 for s in sweep["shapes"]) and "median" in sweep["convention"]
    from minigpt.measure.bench import significant
    assert significant(3.2e-6) == 3.2e-6 and significant(123.456789) == 123.46  # small rates are not rounded to 0
    T.GemmTable(sweep["shapes"], "cpu sweep")  # a table the step-time model accepts


def test_a_pass_sweep_times_the_norms_and_activations_the_step_counts_by_bytes_otherwise(tmp_path):
    """bench hardware --sweep times each norm and activation type forward + backward; measured_rates times a model's
    passes from the nearest measured width, scaled by the elements, and only where slower than their bytes."""
    import torch

    from minigpt.measure.bench import pass_sweep
    sweep = pass_sweep(torch.device("cpu"), "fp32", 3, {"rows": (64,), "width": (32, 128)})
    assert {(k, n) for k, n, *_ in sweep["passes"]} == {("norm", "layernorm"), ("norm", "rmsnorm"),
                                                        ("activation", "gelu"), ("activation", "swiglu")}
    assert all(r[2:4] in ([64, 32], [64, 128]) and r[4] > 0 for r in sweep["passes"])
    table = T.PassTable([["norm", "layernorm", 1024, 4096, 2e-3], ["norm", "layernorm", 1024, 1024, 1e-3]], "t")
    assert table("norm", 1024, 4096, "layernorm") == pytest.approx(2e-3)
    assert table("norm", 4096, 4096, "layernorm") == pytest.approx(8e-3)  # 4x the elements at the same width
    assert table("norm", 1024, 2000, "layernorm") == pytest.approx(1e-3 * 2000 / 1024)  # nearest width in log: 1024
    assert table("norm", 1024, 4096, "rmsnorm") == 0.0  # not timed: its bytes alone
    _, hw = _sweep_file(tmp_path)
    cited = T.gpu_rates(gpu_by_name("H100"))
    plain = T.measured_rates(hw, cited, "sweep.json")
    slow = [[k, n, 8192, w, 1.0] for k, n in (("norm", "layernorm"), ("activation", "gelu")) for w in (5120, 20480)]
    timed = T.measured_rates({**hw, "pass_sweep": {"passes": slow}}, cited, "sweep.json")
    assert "layernorm" in timed.sources["passes"] and timed.gemm_time is not None
    assert step(GPT_13B, rates=timed)["parts_s"]["memory"] > step(GPT_13B, rates=plain)["parts_s"]["memory"] + 1.0
    fast = [[k, n, 8192, w, 1e-9] for k, n, _, w, _ in slow]  # faster than their bytes: the bytes count
    assert step(GPT_13B, rates=T.measured_rates({**hw, "pass_sweep": {"passes": fast}}, cited, "s"))["step_s"] == \
        pytest.approx(step(GPT_13B, rates=plain)["step_s"])
    for bad in ({"passes": []}, {"passes": [["norm", "layernorm", 8, 8, "x"]]}, {"passes": [["norm", "rmsnorm", 8, 8, -1]]}):
        with pytest.raises(UserError, match="pass_sweep"):
            T.measured_rates({**hw, "pass_sweep": bad}, cited, "sweep.json")


def test_an_attention_sweep_times_the_flash_kernel_per_shape_in_the_models_count(tmp_path):
    """bench hardware --sweep times causal SDPA forward and backward per (sequence, head dim); measured_rates times a
    run's attention at the nearest swept shape, the backward at its own rate."""
    import torch

    from minigpt.measure.bench import attention_sweep
    sweep = attention_sweep(torch.device("cpu"), "fp32", 3, {"seq": (32, 64), "head_dim": (16,)})
    assert [r[:2] for r in sweep["shapes"]] == [[32, 16], [64, 16]] and all(r[2] > 0 and r[3] > 0 for r in sweep["shapes"])
    table = T.AttentionTable([[2048, 128, 400.0, 300.0], [8192, 128, 500.0, 350.0], [2048, 64, 200.0, 150.0]], "t")
    assert table(3000, 128) == (400e12, 300e12) and table(6000, 128) == (500e12, 350e12)  # nearest in log seq
    assert table(2048, 80) == (200e12, 150e12)  # nearest head dim first
    _, hw = _sweep_file(tmp_path)
    cited = T.gpu_rates(gpu_by_name("H100"))
    plain = T.measured_rates(hw, cited, "sweep.json")
    half = [[s, 128, cited.attention_flops / 2e12, cited.attention_bwd_flops / 2e12] for s in (1024, 4096)]
    timed = T.measured_rates({**hw, "attention_sweep": {"shapes": half}}, cited, "sweep.json")
    assert "measured: causal SDPA" in timed.sources["attention"]
    assert step(GPT_13B, rates=timed)["parts_s"]["attention"] == \
        pytest.approx(2 * step(GPT_13B, rates=plain)["parts_s"]["attention"])  # half the rates: twice the time
    for bad in ({"shapes": []}, {"shapes": [[2048, 128, "x", 1.0]]}, {"shapes": [[2048, 128, 0.0, 1.0]]}):
        with pytest.raises(UserError, match="attention_sweep"):
            T.measured_rates({**hw, "attention_sweep": bad}, cited, "sweep.json")


def test_the_cpu_data_parallel_check_reads_the_all_reduce_at_the_gradients_size(tmp_path):
    from minigpt.apps.steptime_check import _dp_setup, all_reduce_at
    from minigpt.core.config import load_config, resolve_preset
    path = tmp_path / "coll.json"
    rows = [{"op": op, "bytes": b, "busbw_gbs": b / 1e6} for op in ("all_reduce", "all_gather") for b in (2**12, 2**22)]
    path.write_text(json.dumps({"collectives": {"world_size": 2, "results": rows}}))
    assert all_reduce_at(path, 3e6) == rows[1] and all_reduce_at(path, 1e3) == rows[0]
    cfg = load_config(resolve_preset("tiny"))
    plan, setup = _dp_setup(cfg, 2)  # the trainer's layout on 2 ranks: half the global batch each, DDP's overlap
    layout = plan.batch_layout(cfg.train, cfg.model.block_size)
    assert (plan.dp, setup.micro_batch, setup.overlap) == (2, layout.micro_batch_size, "backward")
    assert setup.global_batch * cfg.model.block_size == cfg.train.batch_size_tokens


@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_the_cpu_check_times_the_models_own_norm_and_activation(mlp):
    from minigpt.apps.steptime_check import pass_timer

    c = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=64, mlp=mlp, norm="rmsnorm")
    timer = pass_timer(c)
    first = timer("norm", 64, 32, "rmsnorm")
    assert first > 0 and timer("activation", 64, c.ffn_hidden, mlp) > 0
    assert timer("norm", 64, 32, "rmsnorm") == first and timer.cache_info().hits == 1  # each shape measured once


def test_a_predicted_efficiency_carries_the_backtest_of_its_gpu():
    from minigpt.analytic.published import backtest_note

    rows = [r for r in backtest()["runs"] if r["gpu"] == "H100"]
    note = backtest_note("H100")
    assert f"on the {len(rows)} published H100 runs" in note
    assert f"{max(r['error'] for r in rows):+.0%}" in note and f"{min(r['error'] for r in rows):+.0%}" in note
    assert backtest_note("B200").startswith("no published run on B200")
    r = run_cli("extrapolate", "--target", "gpt3-13b", "--gpu", "H100", "--json")
    assert note in json.loads(r.stdout)["mfu_source"]


def test_the_data_parallel_check_times_its_rates_beside_busy_companions():
    import os
    from pathlib import Path

    from minigpt.apps.steptime_check import busy_companions

    def children():
        mine, found = str(os.getpid()), []
        for p in Path("/proc").iterdir():
            try:  # a process may end while we look
                if p.name.isdigit() and (p / "stat").read_text().rsplit(")", 1)[-1].split()[1] == mine:
                    found.append(p.name)
            except OSError:
                pass
        return found

    if not Path("/proc/self/stat").exists():
        pytest.skip("needs Linux's /proc to list child processes")
    before = len(children())
    with busy_companions(1):
        assert len(children()) == before + 1
    assert len(children()) == before  # killed and reaped when the block ends


# the ops a dispatch count of the eager block leaves out: GEMMs and the attention kernel (timed as compute),
# views, and allocations that move nothing
NOT_MEMORY_PASSES = frozenset({
    "mm", "addmm", "bmm", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention_for_cpu_backward", "detach", "t", "view", "_unsafe_view", "transpose",
    "split", "split_with_sizes", "slice", "expand", "permute", "unsqueeze", "squeeze", "as_strided", "alias",
    "select", "empty", "zeros_like", "ones_like"})


@pytest.mark.parametrize("shape, dtype", [
    (dict(mlp="swiglu", norm="rmsnorm", pos_emb="rope", n_kv_head=2, bias=False), "bfloat16"),
    (dict(mlp="swiglu", norm="rmsnorm", pos_emb="rope", n_kv_head=2, bias=False), "float32"),  # no casts
    (dict(mlp="gelu", norm="layernorm", pos_emb="learned", bias=True), "bfloat16"),
    (dict(mlp="relu2", norm="rmsnorm", pos_emb="learned", bias=False), "bfloat16"),
    (dict(mlp="gelu", norm="layernorm", pos_emb="rope", n_kv_head=4, bias=False), "bfloat16"),
])
def test_the_eager_byte_count_matches_a_dispatch_count_of_the_real_block(shape, dtype):
    import torch

    from minigpt.analytic import eager
    from minigpt.nn.model import Block, rope_tables
    from minigpt.nn.torch_private import op_byte_counter

    c = ModelConfig(n_layer=1, n_head=4, n_embd=128, block_size=64, vocab_size=256, dropout=0.0, **shape)
    block, (b, s), dt = Block(c, 0).to(getattr(torch, dtype)), (2, 64), getattr(torch, dtype)
    x = torch.randn(b, s, c.n_embd, dtype=dt, requires_grad=True)
    rope = tuple(t[None, None] for t in rope_tables(c.head_dim, s)) if c.pos_emb == "rope" else None
    with op_byte_counter(NOT_MEMORY_PASSES) as forward:
        y, _ = block(x, rope)
    grad = torch.randn_like(y)
    with op_byte_counter(NOT_MEMORY_PASSES) as backward:
        y.backward(grad)
    fwd, bwd = eager.layer_bytes(c, tp=1, sp=False, b=b, s=s, el=dt.itemsize)
    # layout copies (`clone`) are left out of the count: they depend on the attention kernel's memory layout;
    # LayerNorm's row statistics are fp32 in the count (CUDA), bf16 on this CPU: well under 1% of the bytes
    for counted, dispatched in ((fwd, forward.bytes), (bwd, backward.bytes)):
        assert counted == pytest.approx(sum(v for k, v in dispatched.items() if k != "clone"), rel=0.005), dispatched
    fused = T.layer_memory_bytes(c, ParallelPlan(), b, s, T.Setup(seq_len=s, act_bytes=dt.itemsize))
    ratio = (fwd + bwd) / (3 * fused)  # against the fused count, forward + backward
    if c.norm == "rmsnorm" or c.pos_emb == "rope":
        assert ratio > 2  # RMSNorm and rotary embeddings op by op in fp32
    else:
        assert 1 <= ratio < 1.3  # LayerNorm and GELU are single ATen kernels: eager is about fused


def test_eager_kernels_slow_only_the_memory_part_and_cover_dense_blocks_only():
    llama = ModelConfig(n_layer=32, n_head=32, n_kv_head=8, n_embd=4096, ffn_hidden=14336, block_size=8192,
                        vocab_size=128256, mlp="swiglu", norm="rmsnorm", pos_emb="rope", bias=False, dropout=0.0)
    plan = ParallelPlan(dp=64, zero=3)
    fused, eager = (step(llama, plan, recompute="op", overlap="prefetch", global_batch=64, kernels=k) for k in ("fused", "eager"))
    assert eager["parts_s"]["memory"] > 3 * fused["parts_s"]["memory"]  # fp32 norms and rotary, op by op
    assert eager["parts_s"]["matmul"] == fused["parts_s"]["matmul"] and eager["mfu"] < fused["mfu"]
    moe = dataclasses.replace(llama, n_expert=8, n_expert_active=2)
    with pytest.raises(UserError, match="kernels = .fused"):
        step(moe, plan, overlap="prefetch", global_batch=64, kernels="eager")


def test_context_parallelism_splits_the_tokens_and_passes_keys_and_values_round_a_ring():
    c = ModelConfig(n_layer=8, n_head=32, n_kv_head=8, n_embd=4096, ffn_hidden=14336, mlp="swiglu", norm="rmsnorm",
                    pos_emb="rope", block_size=8192, vocab_size=32768, bias=False)
    h100 = T.gpu_rates(gpu_by_name("H100"))
    setup = T.Setup(seq_len=8192, global_batch=64, overlap="full", grad_bytes=4)
    one, two = ParallelPlan(dp=4, tp=2, zero=1), ParallelPlan(dp=4, tp=2, cp=2, zero=1)
    mb1, mb2 = T.micro_batch_seconds(c, one, setup, h100), T.micro_batch_seconds(c, two, setup, h100)
    half = T.micro_batch_seconds(c, one, dataclasses.replace(setup, seq_len=4096), h100)
    assert mb2["parts"]["matmul"] == pytest.approx(half["parts"]["matmul"])  # every token-linear GEMM on s / cp tokens
    assert mb2["parts"]["memory"] == pytest.approx(half["parts"]["memory"])
    assert mb2["parts"]["attention"] == pytest.approx(mb1["parts"]["attention"] / 2)  # half the causal square each
    # the ring: a neighbour's keys and values forward, again with their gradients backward: 3 (cp-1) chunks a layer
    kv = 1 * 4096 * 2 * 8 * 128 / 2 * 2  # b x s/cp tokens x (k, v) x kv heads x head dim / tp x 2 bytes
    assert mb2["cp_traffic_s"] == pytest.approx(8 * 3 * kv / h100.nvlink_bytes_per_s) and mb1["cp_traffic_s"] == 0
    across = T.micro_batch_seconds(c, ParallelPlan(dp=1, tp=8, cp=2), setup, h100)  # tp x cp > 8: the ring leaves the node
    assert across["cp_traffic_s"] == pytest.approx(8 * 3 * (kv / 4) / h100.internode_bytes_per_s)
    assert mb2["parts"]["cp_comm"] == pytest.approx(max(0.0, mb2["cp_traffic_s"] - mb2["parts"]["attention"]))
    slow = dataclasses.replace(h100, attention_flops=1e30, attention_bwd_flops=1e30)  # nothing to hide under: all exposed
    assert T.micro_batch_seconds(c, two, setup, slow)["parts"]["cp_comm"] == pytest.approx(mb2["cp_traffic_s"])
    # the gradients are reduced over dp x cp ranks: as dp = 8 without cp
    st2, st8 = T.step_time(c, two, setup, h100), T.step_time(c, ParallelPlan(dp=8, tp=2, zero=1), setup, h100)
    assert st2["traffic_s"]["dp"] == pytest.approx(st8["traffic_s"]["dp"]) and st2["tokens_per_step"] == 64 * 8192
    assert st2["step_s"] == pytest.approx(sum(st2["parts_s"].values()))
    for bad, says in (({"attention": "materialized"}, "flash attention kernel"), ({"seq_len": 8190}, "divide by 4")):
        with pytest.raises(UserError, match=says):
            T.step_time(c, two, dataclasses.replace(setup, **bad), h100)
