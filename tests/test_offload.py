"""ZeRO-Infinity's NVMe offload through DeepSpeed (issue 45): set from the plan like the CPU offload, it trains the
same steps as no offload, swaps into files, and refuses what it cannot do (resume exactly; other engines)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_cli, set_args, step_records, tiny_overrides, torchrun

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
    r = run_cli("train", "--config", "tiny", "--plan", "zero=3,offload=all,offload_to=nvme,backend=deepspeed")
    assert r.returncode == 2 and "parameter swapper fails here" in r.stderr and "Traceback" not in r.stderr


@needs_aio
def test_nvme_offload_trains_the_steps_of_no_offload_and_swaps_to_files(corpus_dir, data_cache, tmp_path):
    """ZeRO-3 with the optimizer state swapped to files equals ZeRO-3 with nothing offloaded, loss for loss (fp32,
    one rank, within 1e-6); the swap folder holds the master weights, momentum and variance; resuming is refused
    with the way forward."""
    runs = {}
    for name, plan in (("plain", "zero=3,backend=deepspeed"),
                       ("nvme", "zero=3,backend=deepspeed,offload=optimizer,offload_to=nvme")):
        out = tmp_path / name
        # wide enough that DeepSpeed swaps them (it keeps tensors under 1 MiB in memory)
        sets = tiny_overrides(corpus_dir, data_cache, out, **{"train.max_steps": 4, "train.precision": '"fp32"',
                                                               "model.n_embd": 256, "model.n_head": 4})
        r = torchrun(1, ["--config", "tiny", "--plan", plan, *set_args(sets)], timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = out
    nvme, plain = ([s["loss"] for s in step_records(runs[k])] for k in ("nvme", "plain"))
    assert nvme == pytest.approx(plain, rel=1e-6) and len(nvme) == 4
    ds = json.loads((runs["nvme"] / "deepspeed_config.json").read_text())["zero_optimization"]
    assert ds["offload_optimizer"]["device"] == "nvme" and "offload_param" not in ds
    names = {p.name.split("-")[0] for p in (runs["nvme"] / "nvme-swap" / "zero_stage_3" / "optimizer").rglob("*.swp")}
    assert {"exp_avg", "exp_avg_sq"} <= names
    r = torchrun(1, ["--resume", str(runs["nvme"]), "--set", "train.max_steps=6"], timeout=300)
    assert r.returncode != 0 and "error: " in r.stderr and "does not resume exactly" in r.stderr  # torchrun exits 1
    assert "train.init_from" in r.stderr


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
