"""ZeRO-Infinity's NVMe offload through DeepSpeed (issue 45): set from the plan like the CPU offload, it trains the
same steps as no offload (the optimizer state, the parameters or both on NVMe), swaps into files, and refuses what it
cannot do (resume exactly; other engines)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, final_weights, run_cli, set_args, step_records, tiny_overrides, torchrun

from minigpt.core.errors import UserError
from minigpt.core.plan import ParallelPlan

pytest.importorskip("deepspeed")


def _aio_built() -> bool:
    """DeepSpeed's async I/O op, built (a first build takes minutes: .ci/run builds it before the tests)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.ops.op_builder import AsyncIOBuilder

    if not AsyncIOBuilder().is_compatible(verbose=False):
        return False
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "torch_extensions"))
    return any(root.glob(f"py{sys.version_info.major}{sys.version_info.minor}_*/async_io/async_io*.so"))


needs_aio = pytest.mark.skipif(not _aio_built(), reason="DeepSpeed's async I/O op is not built here: needs libaio-dev, "
                               "then `python scripts/build_aio.py` (what .ci/run does)")


def test_nvme_needs_zero_3_an_offload_and_deepspeed():
    with pytest.raises(UserError, match="give zero=3 and offload="):
        ParallelPlan.parse("zero=2,offload=all,offload_to=nvme,backend=deepspeed")
    with pytest.raises(UserError, match="give zero=3 and offload="):
        ParallelPlan.parse("zero=3,offload_to=nvme")
    with pytest.raises(UserError, match="offload_to"):
        ParallelPlan.parse("zero=3,offload=all,offload_to=disk")
    plan = ParallelPlan.parse("zero=3,offload=optimizer,offload_to=nvme,backend=deepspeed")
    assert "offload_to=nvme" in plan.spelling() and "to nvme" in plan.describe()
    r = run_cli("train", "--config", "tiny", "--plan", "zero=3,offload=params,offload_to=nvme,backend=fsdp")
    assert r.returncode == 2 and "use backend=deepspeed" in r.stderr and "Traceback" not in r.stderr


@needs_aio
def test_nvme_offload_trains_the_steps_of_no_offload_and_swaps_to_files(corpus_dir, data_cache, tmp_path):
    """ZeRO-3 on two ranks with the parameters and the optimizer state swapped to files (offload=all, as
    ZeRO-Infinity does) equals ZeRO-3 with nothing offloaded, loss for loss (fp32, within 1e-6), through an
    evaluation and a checkpoint (its weights gathered one parameter at a time); each rank swaps its own partitions
    of both, which it does not hold in memory, and deletes its swap files at the end; resuming is refused with the
    way forward."""
    runs = {}
    for name, plan in (("plain", "zero=3,backend=deepspeed"), ("all", "zero=3,backend=deepspeed,offload=all,offload_to=nvme")):
        out = tmp_path / name
        # 512 wide: the MLP's weights are 1M elements, 2 MiB of fp32 a rank, above DeepSpeed's 1 MiB swap threshold
        sets = tiny_overrides(corpus_dir, data_cache, out, **{"train.max_steps": 3, "train.precision": '"fp32"',
                                                               "train.eval_every": 2, "train.checkpoint_every": 2,
                                                               "model.n_embd": 512, "model.n_head": 8})
        r = torchrun(2, ["--config", "tiny", "--plan", plan, *set_args(sets)], timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = out
    got, want = ([s["loss"] for s in step_records(runs[k])] for k in ("all", "plain"))
    assert got == pytest.approx(want, rel=1e-6) and len(got) == 3
    a, b = final_weights(runs["all"]), final_weights(runs["plain"])
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)
    ds = json.loads((runs["all"] / "deepspeed_config.json").read_text())["zero_optimization"]
    assert ds["offload_optimizer"]["device"] == "nvme" and ds["offload_param"]["device"] == "nvme"
    held, plain = (json.loads((runs[k] / "memory_per_rank.json").read_text())["per_rank"] for k in ("all", "plain"))
    for rank in (0, 1):  # what each rank held in memory: the swapped weights and optimizer state were not there
        assert held[rank]["parameters"] < 0.2 * plain[rank]["parameters"]
        assert held[rank]["optimizer_state"] < 0.01 * plain[rank]["optimizer_state"]
    assert not (runs["all"] / "nvme-swap").exists()  # each rank deleted its swap files at the end
    r = run_cli("train", "--resume", str(runs["all"]), "--set", "train.max_steps=6")  # one process: said first
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "does not resume exactly" in r.stderr
    assert "train.init_from" in r.stderr and "Traceback" not in r.stderr


def test_parameters_on_nvme_are_set_to_swap_one_use_at_a_time_and_leave_the_memory_floor():
    """The generated offload_param: every parameter swappable (max_in_cpu 0), buffers the size of the largest
    weight's partition on a rank, released after each use, no prefetch; the memory a run is checked against
    drops by what goes to files (parameters, optimizer state), and only with nvme."""
    from minigpt.core.config import load_config
    from minigpt.core.plan import batch_layout
    from minigpt.parallel import zero

    sets = ["model.n_embd=512", "model.n_head=8", 'train.precision="fp32"']
    need = {}
    for spelling in ("zero=3,backend=deepspeed", "zero=3,backend=deepspeed,offload=all",
                     "zero=3,backend=deepspeed,offload=optimizer,offload_to=nvme",
                     "zero=3,backend=deepspeed,offload=all,offload_to=nvme"):
        plan = ParallelPlan.parse(spelling, world=4)
        cfg = load_config(REPO / "configs" / "tiny.toml", sets + plan.train_overrides())
        need[spelling.split(",", 2)[-1]] = zero.DeepSpeedBackend.memory_need(cfg, plan, batch_layout(cfg.train, 128, 4))
        if "nvme" in spelling:
            ds = zero.build_config(cfg, batch_layout(cfg.train, 128, 4))
            assert ("offload_param" in ds["zero_optimization"]) == spelling.endswith("all,offload_to=nvme")
            assert ds["zero_optimization"]["offload_optimizer"]["device"] == "nvme"
    param = ds["zero_optimization"]["offload_param"]
    assert param["device"] == "nvme" and param["max_in_cpu"] == 0 and param["buffer_count"] >= 1
    assert param["buffer_size"] == 2048 * 512 // 4  # the vocabulary's and the MLP's 2048 x 512, over 4 ranks
    assert ds["zero_optimization"]["stage3_max_reuse_distance"] == 0
    assert ds["zero_optimization"]["stage3_prefetch_bucket_size"] == 0
    n = 4 * 12 * 512 * 512  # the 4 blocks' weights; a rank's ZeRO-3 partition is a quarter of every state
    assert need["offload=all"] == need["backend=deepspeed"]  # CPU offload on a CPU: nothing leaves the memory
    assert need["backend=deepspeed"] - need["offload=optimizer,offload_to=nvme"] > 12 * n / 4  # fp32 master, m, v
    assert need["offload=optimizer,offload_to=nvme"] - need["offload=all,offload_to=nvme"] > 4 * n / 4  # fp32 weights


def test_a_stopped_nvme_run_is_not_told_to_resume():
    from minigpt.parallel.registry import backend_class

    nvme = ParallelPlan.parse("zero=3,offload=optimizer,offload_to=nvme,backend=deepspeed")
    assert "does not resume exactly" in backend_class(nvme).cannot_resume(nvme)
    cpu = ParallelPlan.parse("zero=3,offload=optimizer,backend=deepspeed")
    assert backend_class(cpu).cannot_resume(cpu) is None


def test_the_ci_script_builds_what_the_nvme_test_needs_and_runs_the_readmes_test_command():
    text = (REPO / ".ci" / "run").read_text()
    assert "libaio-dev" in text and "build_aio.py" in text
    readme = (REPO / "README.md").read_text()
    command = 'pip install torch==2.13.0 && pip install -e ".[dev]" && python -m pytest -q'
    assert command in readme and text.strip().splitlines()[-1] == command
