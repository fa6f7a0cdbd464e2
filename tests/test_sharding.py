"""FSDP2 and tensor parallelism under torchrun on CPU (gloo), against DDP and one process.

The same global batch on every layout, so losses, gradient norms and the final weights agree to
float32 rounding: FSDP over 2 ranks = DDP; tensor parallel 2 = 1 process. (A (dp 2, tp 2) mesh of 4
ranks on a Llama-shaped model: tests/test_pipeline.py.)
"""

import json
import shutil
import sys

import pytest
import torch
from conftest import (
    REPO,
    assert_updates_close,
    final_weights as weights,
    initial_weights,
    readme_torchrun_lines,
    run_cli,
    run_concurrently,
    set_args,
    step_records as records,
    tiny_overrides,
    torchrun_cmd,
)

from minigpt.core.config import ModelConfig

COMMON = {"train.max_steps": 6, "train.batch_size_tokens": 256, "train.eval_every": 6, "train.checkpoint_every": 3,
          "train.grad_clip": 0.5}

MUON = {"train.optimizer": '"muon"'}
MOE = {"model.n_expert": 4}
# tokens dropped, biases moving, the local experts as grouped matrix multiplies
ROUTED = {"model.moe_capacity_factor": 1.0, "model.moe_bias_update_rate": 0.01, "model.moe_grouped_mm": "true"}


def readme_cmd(line: str, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", *line.split()[1:], *extra]


@pytest.fixture(scope="module")
def runs(corpus_dir, data_cache, tmp_path_factory):
    from minigpt.core.config import load_config
    from minigpt.train.loop import train

    root = tmp_path_factory.mktemp("sharded")

    def sets(name, **extra):
        return set_args(tiny_overrides(corpus_dir, data_cache, root / name, **{**COMMON, **extra}))

    fsdp_line, tp_line, ep_line, ep_tp_line = readme_torchrun_lines(sharded=True)  # the README's commands, made small
    assert "--plan dp=2,zero=3 " in fsdp_line and "--plan tp=2 " in tp_line and "--plan ep=2 " in ep_line
    assert "--nproc_per_node 4 " in ep_tp_line and "--plan dp=2,tp=2,ep=2 " in ep_tp_line
    jobs = {
        "fsdp": readme_cmd(fsdp_line, sets("fsdp") + ["--stop-at", "3"]),  # resumed below, to step 6
        "ep": readme_cmd(ep_line, sets("ep", **ROUTED) + ["--stop-at", "3"]),
        "ep_tp": readme_cmd(ep_tp_line, sets("ep_tp", **ROUTED)),
        "tp": readme_cmd(tp_line, sets("tp")),
        "fsdp_muon": torchrun_cmd(2, sets("fsdp_muon", **MUON) + ["--plan", "dp=2,zero=3", "--stop-at", "3"]),
        "tp_moe": torchrun_cmd(2, sets("tp_moe", **MOE) + ["--plan", "tp=2"]),
    }
    out = run_concurrently(jobs, torchrun=("ep_tp",))  # the README's 4-rank line through torchrun itself
    shutil.copytree(root / "fsdp", root / "fsdp_stopped")  # for the refused-backend check
    resumed = run_concurrently({n: torchrun_cmd(2, ["--resume", str(root / n)]) for n in ("fsdp", "fsdp_muon", "ep")})
    out["fsdp_resumed"], out["fsdp_muon_resumed"], out["ep_resumed"] = resumed["fsdp"], resumed["fsdp_muon"], resumed["ep"]
    for name, r in out.items():
        assert r.returncode == 0, f"{name}: {r.stdout[-1000:]} {r.stderr[-3000:]}"
    for name, extra in (("one", {}), ("one_muon", MUON), ("one_moe", MOE), ("one_moe_routed", {**MOE, **ROUTED})):
        cfg = load_config(REPO / "configs" / "tiny.toml", tiny_overrides(corpus_dir, data_cache, root / name,
                                                                          **{**COMMON, **extra}))
        train(cfg, log=lambda *a: None)
    out["root"] = root
    return out


def assert_same_training(a, b, rel=1e-5):
    ra, rb = records(a), records(b)
    assert len(ra) == len(rb) == 6
    assert [r["loss"] for r in ra] == pytest.approx([r["loss"] for r in rb], rel=rel)
    assert [r["grad_norm"] for r in ra] == pytest.approx([r["grad_norm"] for r in rb], rel=rel)
    wa, wb = weights(a), weights(b)
    assert sorted(wa) == sorted(wb)  # the ordinary layout: no TP row order, a tied head once
    for k in wb:  # Adam turns reduction-order rounding in near-zero gradients into updates of ~1e-6 (lr 3e-3)
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=2e-5, msg=k)


@pytest.mark.slow
def test_a_mixture_of_experts_under_tensor_parallelism_matches_one_process(runs):
    """--plan tp=2 on a 4-expert model: each expert's MLP split as the dense MLP is (column, then row with its
    all-reduce), the router replicated: the same losses, gradient norms and weights as one process."""
    root = runs["root"]
    assert_same_training(root / "tp_moe", root / "one_moe", rel=1e-4)


@pytest.mark.slow
def test_expert_parallelism_matches_one_process_across_a_resume(runs):
    """--plan ep=2 (the docs' line): each rank holds 2 of the 4 experts, tokens go to them and back by all-to-all,
    the experts' gradients reduced by the expert backend, DDP the rest; with a capacity factor (past-capacity slots
    dropped on the sending rank), the auxiliary-loss-free bias (moved by every micro-batch's load) and grouped
    experts: one
    process's losses, gradient norms and (gathered into the ordinary layout) weights, stopped at step 3 and
    resumed; generate reads the run."""
    root = runs["root"]
    assert "4 experts over ep 2" in runs["ep"].stdout and "expert_load" in (root / "ep" / "metrics.jsonl").read_text()
    assert_same_training(root / "ep", root / "one_moe_routed", rel=1e-4)
    assert any(r["moe"]["dropped"] > 0 for r in records(root / "ep"))
    assert weights(root / "ep")["blocks.0.mlp.router_bias"].abs().sum() > 0  # the biases moved, and equal one process's
    for moe in (r["moe"] for r in records(root / "ep")):  # the bytes that left the rank, beside balanced routing's
        assert 0.5 < moe["all_to_all_bytes"] / moe["all_to_all_bytes_formula"] < 1.5
    r = run_cli("generate", "--run", str(root / "ep"), "--prompt", "def", "--max-new-tokens", "4", "--temperature", "0")
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
def test_expert_parallelism_with_tensor_parallelism_matches_one_process(runs):
    """The docs' 4-rank line (--plan dp=2,tp=2,ep=2): experts over the ep ranks of each tp index, each expert's MLP
    split over the tensor-parallel pair, the dense part's replicas averaged by the backend; with the routing options
    (capacity, moving biases): one process's losses, gradient norms and weights. Each tp rank dispatches its share of
    the slots: the all-to-all bytes are balanced routing's over tp (each slot sent once, not once per tp rank: 2x
    this formula). (Its resume: tests/test_pipeline.)"""
    root = runs["root"]
    assert "tensor parallel 2 x 2 replicas, 4 experts over ep 2" in runs["ep_tp"].stdout
    assert_same_training(root / "ep_tp", root / "one_moe_routed", rel=1e-4)
    for moe in (r["moe"] for r in records(root / "ep_tp")):
        assert 0.5 < moe["all_to_all_bytes"] / moe["all_to_all_bytes_formula"] < 1.5
    assert any(r["moe"]["dropped"] > 0 for r in records(root / "ep_tp"))


def test_a_run_resumes_only_under_the_expert_parallelism_it_was_trained_with(tmp_path):
    from minigpt.core.config import TrainConfig
    from minigpt.core.errors import UserError
    from minigpt.core.plan import ParallelPlan
    from minigpt.parallel.backend import Backend

    state = {"backend": "ddp", "optimizer_name": "adamw", "expert_parallel": 2}
    with pytest.raises(UserError, match="expert_parallel = 2; resume with --plan ep=2"):
        Backend.check_resumable(state, tmp_path, ParallelPlan(dp=2, backend="ddp"), TrainConfig())


@pytest.mark.slow
def test_muon_under_fsdp2_matches_one_process_across_a_resume(runs):
    """train.optimizer = "muon" with --plan dp=2,zero=3: each sharded matrix's update gathered whole, orthogonalised
    and sliced back (nn/optim.ShardedMuon) = Muon on one process; its momentum saved and resumed whole."""
    root = runs["root"]
    assert "Muon" in runs["fsdp_muon"].stdout
    a, b = records(root / "fsdp_muon"), records(root / "one_muon")
    assert len(a) == len(b) == 6
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-4)
    assert [r["grad_norm"] for r in a] == pytest.approx([r["grad_norm"] for r in b], rel=1e-4)
    # every parameter by its update (conftest.MUON_UPDATE_RTOL: FSDP's reduce-scatter rounds gradients unlike one
    # process, and Muon amplifies it: 1.2-2.1% seen for its matrices, 0.01-0.05% for AdamW's parameters); DDP, whose
    # gradients here equal one process's bit for bit, gives weights equal bit for bit under Muon
    wa, wb = weights(root / "fsdp_muon"), weights(root / "one_muon")
    config = json.loads((root / "one_muon" / "config.json").read_text())
    initial = initial_weights(ModelConfig(**config["model"]), config["train"]["seed"])
    assert all(not torch.equal(wb[k], initial[k]) for k in wb)
    assert_updates_close(wa, wb, initial, wb, "FSDP Muon")


@pytest.mark.slow
def test_fsdp_matches_one_process_as_ddp_does(runs):
    """2 FSDP ranks = 1 process accumulating 2 micro-batches (test_distributed: the same for DDP),
    across a stop at step 3 and a resume."""
    root = runs["root"]
    assert "FSDP2 over 2 rank(s)" in runs["fsdp"].stdout
    assert_same_training(root / "fsdp", root / "one", rel=1e-4)
    assert records(root / "fsdp")[0]["grad_norm"] > 0.5  # clipping at 0.5 acts, on sharded gradients


@pytest.mark.slow
def test_tensor_parallel_matches_one_process(runs):
    root = runs["root"]
    assert "tensor parallel 2" in runs["tp"].stdout and "x 1 data-parallel ranks" in runs["tp"].stdout
    assert_same_training(root / "tp", root / "one")


@pytest.mark.slow
def test_a_tensor_parallel_run_reads_like_any_run(runs):
    """Its checkpoint is the ordinary layout: generate reads it. (FSDP x tensor parallel on a 4-rank
    (dp 2, tp 2) Llama-shaped mesh, with and without sequence parallelism, is checked against one
    process in tests/test_pipeline.py, through the same parallelize() and backends.)"""
    r = run_cli("generate", "--run", str(runs["root"] / "tp"), "--prompt", "def", "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
def test_a_stopped_fsdp_run_resumes_on_its_backend_only(runs):
    """The FSDP run above stopped at step 3 and resumed to 6, and still equals one process (its
    optimizer state is saved whole and restored); another backend is refused with the setting."""
    assert json.loads(runs["fsdp"].stdout.splitlines()[-1])["step"] == 3
    assert "steps 3->6 of 6 (resumed from step 3)" in runs["fsdp_resumed"].stdout
    r = run_cli("train", "--resume", str(runs["root"] / "fsdp_stopped"), "--plan", "zero=0,backend=ddp")
    assert r.returncode == 2 and "written by the fsdp backend; resume with --set train.backend=fsdp" in r.stderr
    r = run_cli("train", "--resume", str(runs["root"] / "fsdp_stopped"), "--set", 'train.backend="ddp"')
    assert r.returncode == 2 and "ZeRO-3 shards model states" in r.stderr  # the plan's rules speak first


@pytest.mark.parametrize("extra, message", [
    ({"train.tensor_parallel": 2, "model.n_head": 3, "model.n_embd": 48}, "model.n_head = 3 does not divide by the tensor-parallel degree 2"),
    ({"train.tensor_parallel": 2, "model.n_expert": 4, "train.sequence_parallel": "true"},
     "sequence parallelism (sp=1) does not run with a mixture of experts"),
    ({"train.tensor_parallel": 0}, "train.tensor_parallel = 0 must be a positive integer"),
    ({"train.tensor_parallel": 2}, "train.tensor_parallel x train.pipeline_parallel: tp x pp = 2 must divide the 1 ranks"),
    ({"train.pipeline_parallel": 2}, "tp x pp = 2 must divide the 1 ranks"),
    ({"train.backend": '"fsdp"', "train.offload_params": "true"}, "on a CPU run set train.offload_params = false"),
    ({"train.offload_params": "true"}, "offloading needs backend=fsdp (parameters, on CUDA) or backend=deepspeed"),
])
def test_bad_sharding_settings(corpus_dir, data_cache, tmp_path, extra, message):
    r = run_cli("train", *set_args(tiny_overrides(corpus_dir, data_cache, tmp_path / "run", **extra)))
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()


def test_tp_row_order_round_trips_and_keeps_each_ranks_heads_together():
    from minigpt.parallel.sharding import _row_order, from_tp_layout, to_tp_layout

    c = ModelConfig(n_layer=1, n_head=4, n_kv_head=2, n_embd=16, block_size=8, vocab_size=64, mlp="swiglu")
    D, f = c.head_dim, c.ffn_hidden
    qkv = torch.arange((4 + 2 * 2) * D).float().unsqueeze(1)
    fc = torch.arange(2 * f).float()
    sd = {"blocks.0.attn.c_attn.weight": qkv, "blocks.0.mlp.c_fc.bias": fc, "wte.weight": torch.randn(64, 16)}
    tp = to_tp_layout(sd, c, 2)
    rank0 = tp["blocks.0.attn.c_attn.weight"][: len(qkv) // 2, 0].long().tolist()
    # rank 0: query heads 0-1, key head 0, value head 0
    assert rank0 == list(range(0, 2 * D)) + list(range(4 * D, 5 * D)) + list(range(6 * D, 7 * D))
    assert tp["blocks.0.mlp.c_fc.bias"][: f].long().tolist() == list(range(f // 2)) + list(range(f, f + f // 2))
    back = from_tp_layout(tp, c, 2)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    assert _row_order(c, "blocks.0.mlp.c_proj.weight", 2) is None
