"""The suite's stand-in for one-node torchrun launches (tests/forked_ranks.py): what it takes over and what it
leaves to torchrun, and that a rank's failure comes back as torchrun would report it."""

import sys

import forked_ranks
from conftest import REPO, liveness, torchrun_cmd

RUN = [sys.executable, "-m", "torch.distributed.run"]


def test_only_one_node_standalone_launches_of_minigpt_are_forked():
    assert forked_ranks.torchrun_args(torchrun_cmd(2, ["--config", "tiny"])) == (2, ["train", "--config", "tiny"])
    assert forked_ranks.torchrun_args([*RUN, "--standalone", "--nproc_per_node", "4", "-m", "minigpt", "train"]) == \
        (4, ["train"])
    for other in ([*RUN, "--nproc_per_node=2", "-m", "minigpt", "train"],  # no --standalone: a rendezvous given
                  [*RUN, "--standalone", "--nproc_per_node=2", "--max-restarts", "1", "-m", "minigpt", "train"],
                  [*RUN, "--nnodes", "2", "--nproc_per_node", "2", "-m", "minigpt", "train"],
                  [*RUN, "--standalone", "--nproc_per_node=2", "-m", "deepspeed", "train"],
                  [sys.executable, "-m", "minigpt", "train"]):
        assert forked_ranks.torchrun_args(other) is None, other


def test_a_failed_rank_returns_its_exit_code_and_its_one_line():
    cmd = torchrun_cmd(2, ["--config", "tiny", "--set", "train.zero_stage=7"])
    r = forked_ranks.launch(cmd, {"OMP_NUM_THREADS": "1"}, REPO, liveness(120))
    lines = r.stderr.splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]  # both ranks refuse it; rank 0 says so, once
    assert lines[0].startswith("error: train.zero_stage = 7")
