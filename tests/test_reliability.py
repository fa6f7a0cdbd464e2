"""Reliability: signals save, one writer per run, readers never fail during a save, runs that
never lie (pinned corpus, verified cache, no rewrites of a finished run, nothing written by a
failed start), reproducible fp32 on CPU."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO, Proc, run_cli, set_args, tiny_overrides

from minigpt.core.config import DataConfig, ModelConfig
from minigpt.data import cache as data
from minigpt.nn.weights import WEIGHTS, load_weights
from minigpt.run import files as checkpoint
from minigpt.run.load import load_run
from minigpt.train.checkpoint import RunLock
from minigpt.train.loop import train


def quiet(*a, **k):
    pass


def logged_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(l)["step"] for l in path.read_text().splitlines() if '"kind": "step"' in l]
    return max(steps, default=0)


def train_cmd(sets):
    return [sys.executable, "-m", "minigpt", "train", *set_args(sets)]


# ---- signals -------------------------------------------------------------------------------


def test_sigterm_finishes_the_step_saves_it_and_says_how_to_resume(corpus_dir, data_cache, tmp_path):
    run = tmp_path / "run"
    sets = tiny_overrides(corpus_dir, data_cache, run, **{"train.max_steps": 3000, "train.checkpoint_every": 0,
                                                          "train.eval_every": 0})
    proc = Proc(train_cmd(sets))
    proc.wait_for(lambda: logged_step(run) >= 20)
    proc.p.send_signal(signal.SIGTERM)
    code, out, err = proc.finish()
    assert code == 128 + signal.SIGTERM, err[-2000:]
    stop = [l for l in out.splitlines() if l.startswith("stopped by SIGTERM at step ")]
    assert stop == [f"stopped by SIGTERM at step {logged_step(run)}; resume with: minigpt train --resume {run}"]
    step = logged_step(run)
    assert checkpoint.latest_checkpoint(run)[1] == step  # the step in flight finished and was saved
    assert json.loads((run / "summary.json").read_text())["stopped"] == "SIGTERM"
    assert "Traceback" not in err
    r = run_cli("train", "--resume", str(run), "--stop-at", str(step + 2))
    assert r.returncode == 0, r.stderr
    assert logged_step(run) == step + 2


def test_a_second_signal_exits_at_once_and_the_checkpoint_survives(corpus_dir, data_cache, tmp_path):
    run = tmp_path / "run"
    # the tiny preset's own width: steps of a few hundred ms, so the second signal lands mid-step
    sets = [s for s in tiny_overrides(corpus_dir, data_cache, run, **{"train.max_steps": 3000, "train.checkpoint_every": 2,
                                                                      "train.eval_every": 0}) if not s.startswith("model.")]
    proc = Proc(train_cmd(sets))
    proc.wait_for(lambda: run.joinpath("latest.json").is_file() and logged_step(run) >= 3)
    proc.p.send_signal(signal.SIGINT)
    proc.wait_for(lambda: any("SIGINT received" in l for l in proc.err))
    proc.p.send_signal(signal.SIGINT)
    code, out, err = proc.finish()
    assert code == 128 + signal.SIGINT
    assert "second SIGINT: exiting now" in err and "Traceback" not in err
    folder, step = checkpoint.latest_checkpoint(run)  # verified: sizes and SHA-256
    assert step >= 2


def test_a_wall_clock_budget_stops_and_checkpoints(corpus_dir, data_cache, tmp_path):
    run = tmp_path / "run"
    sets = tiny_overrides(corpus_dir, data_cache, run, **{"train.max_steps": 100000, "train.max_minutes": 0.005,
                                                          "train.checkpoint_every": 0, "train.eval_every": 0})
    r = run_cli("train", *set_args(sets))
    assert r.returncode == 0, r.stderr  # a planned stop
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["stopped"] == "max_minutes" and 0 < summary["step"] < 100000
    assert checkpoint.latest_checkpoint(run)[1] == summary["step"]
    assert f"stopped by max_minutes at step {summary['step']}; resume with" in r.stdout


# ---- one writer, safe readers --------------------------------------------------------------


def test_two_trainers_cannot_share_a_run_and_overwrite_refuses_foreign_directories(corpus_dir, data_cache, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = RunLock(run)
    holder.acquire()  # another trainer (the lock is per open file, so this process counts as one)
    try:
        r = run_cli("train", *set_args(tiny_overrides(corpus_dir, data_cache, run)))
        assert r.returncode == 2 and f"is being trained by process {os.getpid()} on " in r.stderr
        assert sorted(p.name for p in run.iterdir()) == [".lock"]  # nothing written
    finally:
        holder.release()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    r = run_cli("train", *set_args(tiny_overrides(corpus_dir, data_cache, foreign)), "--overwrite")
    assert r.returncode == 2 and "is not a minigpt run directory (it holds thesis.tex)" in r.stderr
    assert (foreign / "thesis.tex").read_text() == "precious"


def test_readers_never_fail_while_the_run_saves(tiny_cfg, tmp_path):
    """A reader (generate, load_run) racing a training run's saves: every save commits a new
    checkpoint and deletes the old one under the reader; the reader must never fail."""
    from minigpt.nn.model import GPT

    train(tiny_cfg(**{"train.max_steps": 2}), log=quiet)
    run = tmp_path / "run"
    folder, _ = checkpoint.latest_checkpoint(run)
    weights, state = (folder / WEIGHTS).read_bytes(), (folder / checkpoint.STATE).read_bytes()
    model = GPT(tiny_cfg().model)
    done, errors, reads = threading.Event(), [], [0]

    def reader():
        while not done.is_set():
            try:
                checkpoint.load_latest(run, lambda f: load_weights(model, f))
                reads[0] += 1
            except Exception as e:  # noqa: BLE001 - any failure is the finding
                errors.append(repr(e))

    t = threading.Thread(target=reader)
    t.start()
    step = 3
    try:  # save as a training run does at every checkpoint, until the reader has raced 50 of them (a busy
        # machine slows the reader thread; the bound on saves only keeps a starved one from looping forever)
        while reads[0] < 50 and step < 5000:
            tmp = checkpoint.new_checkpoint_folder(run, step)
            (tmp / WEIGHTS).write_bytes(weights)
            (tmp / checkpoint.STATE).write_bytes(state)
            checkpoint.commit_checkpoint(run, step, tmp)
            step += 1
    finally:
        done.set()
        t.join()
    assert reads[0] >= 50 and errors == [], (reads[0], step, errors[:3])
    load_run(run)


# ---- runs that never lie -------------------------------------------------------------------


def test_resume_is_pinned_to_the_corpus_it_started_with(tmp_path, data_cache):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(8):
        (corpus / f"doc{i}.txt").write_text(f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * 60)
    run = tmp_path / "run"
    sets = tiny_overrides(corpus, data_cache, run, **{"train.max_steps": 4, "data.val_fraction": 0.3})
    assert run_cli("train", *set_args(sets), "--stop-at", "2").returncode == 0
    tokenizer = (run / "tokenizer.json").read_bytes()
    (corpus / "doc3.txt").write_text("an edited document, other words entirely: zebra quantum lattice. " * 40)
    r = run_cli("train", "--resume", str(run))
    assert r.returncode == 2 and "the corpus of" in r.stderr and "changed since the run started" in r.stderr
    assert "8 documents" in r.stderr and "allow_new_data" in r.stderr
    r = run_cli("train", "--resume", str(run), "--set", "train.allow_new_data=true")
    assert r.returncode == 0, r.stderr
    assert "continuing on a changed corpus" in r.stdout
    assert (run / "tokenizer.json").read_bytes() == tokenizer  # the run's tokenizer, not one retrained


def test_a_damaged_token_cache_is_rebuilt_and_the_split_follows_relative_paths(corpus_dir, tmp_path):
    model = ModelConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=320)
    cfg = DataConfig(source=str(corpus_dir), cache_dir=str(tmp_path / "cache"), val_fraction=0.2)
    first = data.prepare_data(cfg, model, log=quiet)
    with open(first.path / "train.bin", "r+b") as f:
        f.truncate(1000)  # a killed copy, a full disk...
    lines = []
    again = data.prepare_data(cfg, model, log=lines.append)
    assert not again.reused and any("is damaged (train.bin has 1,000 bytes" in l for l in lines)
    assert len(again.tokens("train")) == first.manifest["train_tokens"]
    moved = tmp_path / "elsewhere" / "corpus"
    moved.parent.mkdir()
    os.rename(corpus_dir, moved)
    try:
        other = data.prepare_data(DataConfig(source=str(moved), cache_dir=str(tmp_path / "cache"), val_fraction=0.2),
                                  model, log=quiet)
    finally:
        os.rename(moved, corpus_dir)
    assert other.manifest["val_documents"] == first.manifest["val_documents"]
    assert other.manifest["inputs_sha256"] == first.manifest["inputs_sha256"]  # the same corpus, wherever it is


def test_resuming_a_finished_run_changes_nothing_and_a_failed_start_writes_nothing(tiny_cfg, tmp_path):
    train(tiny_cfg(**{"train.max_steps": 2}), log=quiet)
    run = tmp_path / "run"
    def files():  # every file but the lock, which records its latest holder
        return {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}

    before = files()
    r = run_cli("train", "--resume", str(run))
    assert r.returncode == 0 and "nothing to do" in r.stdout
    assert files() == before
    r = run_cli("train", "--resume", str(run), "--set", "train.max_steps=4", "--set", "data.source=/nonexistent/corpus")
    assert r.returncode == 2 and files() == before
    fresh = tmp_path / "fresh"
    r = run_cli("train", "--set", f"train.out_dir={fresh}", "--set", "data.source=/nonexistent/corpus")
    assert r.returncode == 2 and not fresh.exists()


def test_a_restart_cleans_temporaries_and_drops_records_past_the_checkpoint(tiny_cfg, tmp_path):
    cfg = tiny_cfg(**{"train.max_steps": 8, "train.checkpoint_every": 4})
    train(cfg, stop_at=6, log=quiet)  # checkpoint at 4 and at 6
    run = tmp_path / "run"
    (run / ".config.json.abc.tmp").write_text("half")  # what kills during writes leave
    (run / "checkpoints" / ".step_0000007.partial").mkdir()
    with open(run / "metrics.jsonl", "a") as f:  # records of steps done after the checkpoint, then killed
        f.write(json.dumps({"kind": "step", "step": 7, "loss": 9.9}) + "\n")
    train(tiny_cfg(**{"train.max_steps": 8, "train.checkpoint_every": 4}), resume=True, log=quiet)
    assert not list(run.glob(".*.tmp")) and not list((run / "checkpoints").glob(".step_*"))
    steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines() if '"kind": "step"' in l]
    assert steps == list(range(1, 9))  # step 7 once, from the resumed run
    fresh = tmp_path / "fresh"  # a run that died before its first checkpoint, started again
    fresh.mkdir()
    (fresh / "metrics.jsonl").write_text(json.dumps({"kind": "step", "step": 1, "loss": 9.9}) + "\n")
    train(tiny_cfg(**{"train.max_steps": 2, "train.out_dir": f'"{fresh}"'}), log=quiet)
    records = [json.loads(l) for l in (fresh / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "step"] == [1, 2] and 9.9 not in [r.get("loss") for r in records]


def test_fp32_cpu_training_is_bit_reproducible_across_processes(corpus_dir, data_cache, tmp_path):
    """With the same thread count (2, pinned: train.threads = 0 picks the idle cores, which a loaded machine
    lowers for one run and not the other): a fresh process and this one write identical weight files, and a
    run split by a resume ends with the uninterrupted one's weights, bit for bit."""
    same = {"train.max_steps": 6, "model.dropout": 0.1, "train.threads": min(2, os.cpu_count() or 1)}
    sets = tiny_overrides(corpus_dir, data_cache, tmp_path / "a", **same)
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    r = subprocess.run(train_cmd(sets), capture_output=True, text=True, cwd=REPO, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    from minigpt.core.config import load_config

    train(load_config(REPO / "configs" / "tiny.toml", tiny_overrides(corpus_dir, data_cache, tmp_path / "b", **same)),
          log=quiet)
    split = load_config(REPO / "configs" / "tiny.toml", tiny_overrides(corpus_dir, data_cache, tmp_path / "c", **same))
    train(split, stop_at=3, log=quiet)
    train(split, resume=True, log=quiet)
    files = [checkpoint.latest_checkpoint(tmp_path / n)[0] / WEIGHTS for n in "abc"]
    assert files[0].read_bytes() == files[1].read_bytes() == files[2].read_bytes()


# ---- under torchrun ------------------------------------------------------------------------


def worker(proc: Proc, local_rank: int):
    import psutil

    kids = psutil.Process(proc.p.pid).children(recursive=True)
    return next(k for k in kids if k.environ().get("LOCAL_RANK") == str(local_rank))


def act_when_ready(jobs: dict, actions: dict, timeout: float = 120) -> None:
    """Run each action (name -> (ready, act)) once its job is ready, polling every job in turn; a job that exits
    before its action ran fails the test with its error."""
    pending, deadline = dict(actions), time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for name, (ready, act) in list(pending.items()):
            if ready():
                act()
                del pending[name]
            elif jobs[name].p.poll() is not None:
                raise AssertionError(f"{name} exited {jobs[name].p.returncode} first: {''.join(jobs[name].err)[-800:]}")
        time.sleep(0.02)
    assert not pending, f"timed out waiting for {', '.join(pending)}"


@pytest.mark.slow
def test_torchrun_ranks_stop_together_restart_after_a_death_and_name_a_hung_rank(corpus_dir, data_cache, tmp_path):
    """Four 2-rank jobs at once: an uninterrupted reference; one whose rank 1 is killed (torchrun
    --max-restarts 1 restarts it, train.auto_resume resumes from the last checkpoint); one whose
    torchrun gets SIGTERM (both ranks stop after the same step and save it; resumed later); one
    whose rank 1 hangs (SIGSTOP): its peer's collective times out with an error naming rank 1.
    The killed and the stopped runs end with the reference's losses, bit for bit."""
    def cmd(name, *extra, **sets):
        s = tiny_overrides(corpus_dir, data_cache, tmp_path / name, **{
            "train.max_steps": 40, "train.checkpoint_every": 5, "train.eval_every": 0, "train.batch_size_tokens": 1024,
            "train.micro_batch_size": 16, **sets})
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *extra,
                "-m", "minigpt", "train", *set_args(s)]

    jobs = {"ref": Proc(cmd("ref")),
            "killed": Proc(cmd("killed", "--max-restarts=1", **{"train.auto_resume": "true"})),
            "term": Proc(cmd("term")),
            "hung": Proc(cmd("hung", **{"train.max_steps": 3000, "train.dist_timeout_s": 5}))}
    stopped = {}

    def stop_hung():
        stopped["hung"] = worker(jobs["hung"], 1)
        stopped["hung"].send_signal(signal.SIGSTOP)

    # each job acted on as soon as it reaches its step, whichever comes first (a job acted on late, under load,
    # could have finished its 40 steps)
    act_when_ready(jobs, {"hung": (lambda: logged_step(tmp_path / "hung") >= 3, stop_hung),
                          "term": (lambda: logged_step(tmp_path / "term") >= 8,  # what a scheduler sends torchrun
                                   lambda: jobs["term"].p.send_signal(signal.SIGTERM)),
                          "killed": (lambda: logged_step(tmp_path / "killed") >= 12,
                                     lambda: worker(jobs["killed"], 1).kill())})
    hung = stopped["hung"]
    term = jobs.pop("term").finish()
    resumed = Proc([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                    "minigpt", "train", "--resume", str(tmp_path / "term")])
    stop = [l for l in term[1].splitlines() if l.startswith("stopped by SIGTERM at step ")]
    assert len(stop) == 1, (term[0], term[1][-3000:], term[2][-6000:])  # rank 0 says it; both ranks stopped after the same step
    step = int(stop[0].split()[5].rstrip(";"))
    assert checkpoint.latest_checkpoint(tmp_path / "term")[1] == step == logged_step(tmp_path / "term")
    jobs["hung"].wait_for(lambda: any(l.startswith("error: rank 0: rank 1") for l in jobs["hung"].err))
    hung.kill()
    results = {name: job.finish() for name, job in {**jobs, "resumed": resumed}.items()}
    assert results["ref"][0] == 0, results["ref"][2][-3000:]
    assert results["killed"][0] == 0, (results["killed"][1][-2000:], results["killed"][2][-4000:])
    assert "torchrun restart 1" in results["killed"][1]
    assert results["resumed"][0] == 0, results["resumed"][2][-2000:]
    error = next(l for l in results["hung"][2].splitlines() if l.startswith("error: rank 0: rank 1"))
    assert "(last completed step" in error and "stopped answering" in error and "dist_timeout_s = 5" in error

    def losses(name):
        return [json.loads(l)["loss"] for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
                if '"kind": "step"' in l]

    assert len(losses("ref")) == 40 and losses("killed") == losses("ref") and losses("term") == losses("ref")


def test_a_killed_torchrun_launcher_is_one_line_on_every_rank(monkeypatch):
    """When the agent dies its store goes with it: the rank's communication error, and the store it then asks,
    both fail; the rank says so in one line instead of a DistNetworkError traceback (checked by hand: kill -9 of
    torchrun during a 2-rank run leaves two such lines and no traceback)."""
    import torch

    from minigpt.parallel import distributed

    def gone():
        raise torch.distributed.DistNetworkError("Broken pipe")

    monkeypatch.setattr(distributed, "default_store", gone)
    env = distributed.DistEnv(rank=1, local_rank=1, world_size=2, device=torch.device("cpu"))
    error = distributed.silent_ranks_error(env, RuntimeError("Connection reset by peer"))
    assert isinstance(error, distributed.RankError) and "rank 1: the torchrun launcher" in str(error)
