"""Two processes on CPU under torchrun (gloo): DDP trains and matches one process exactly enough."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, tiny_overrides


def torchrun(nproc: int, sets: list[str], timeout: int = 300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "minigpt.train", *[a for s in sets for a in ("--set", s)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)


def losses(run_dir):
    return [json.loads(l)["loss"] for l in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_with_accumulation(corpus_dir, tmp_path):
    common = {"train.max_steps": 6, "train.batch_size_tokens": 256, "train.eval_every": 6}  # 2 x 4 x 32
    ddp = torchrun(2, tiny_overrides(corpus_dir, tmp_path / "cache", tmp_path / "ddp", **common))
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    finals = [l for l in ddp.stdout.splitlines() if l.startswith('{"event": "final"')]
    assert len(finals) == 1  # rank 0 alone logs
    summary = json.loads(finals[0])
    assert summary["world_size"] == 2 and summary["tokens_seen"] == 6 * 256

    single = torchrun(1, tiny_overrides(corpus_dir, tmp_path / "cache", tmp_path / "one", **common))
    assert single.returncode == 0, single.stderr[-3000:]
    a, b = losses(tmp_path / "ddp"), losses(tmp_path / "one")
    assert len(a) == len(b) == 6
    # Same global batch, same data: only the order of float additions differs (all-reduce of two
    # half-gradients vs accumulation), so the curves agree to float32 rounding, not bit for bit.
    for x, y in zip(a, b):
        assert x == pytest.approx(y, rel=1e-4)
    assert a[-1] < a[0]
