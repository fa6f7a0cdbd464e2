"""Shared fixtures: a small real-text corpus, one token cache for the session, a tiny config that
trains in a second, and the CLI called in-process (a subprocess only where the process is the point)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import forked_ranks
import pytest

from minigpt.core.config import load_config
from minigpt.data.sources import stdlib_files

REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    """Under pytest-xdist each worker computes on one thread: two workers on two cores, not four threads
    fighting for them (the torchrun jobs the tests start run one thread a rank already)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # what a run's train.threads = 0 takes
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on the network in tests
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


# ------------------------------------------------------------------------------------------------
# liveness bounds: how long a command may take before the test says it hung. They scale with how busy this
# machine is (the load average per core, read when the bound is set), and a bound that runs out fails in one
# line that says the load, not with a wall of tracebacks: a timeout on a busy machine is not a defect.


def load_scale() -> float:
    """MINIGPT_TEST_TIMEOUT_SCALE if set, else 1 + the 1-minute load average per core beyond the first, in [1, 4]."""
    if os.environ.get("MINIGPT_TEST_TIMEOUT_SCALE"):
        return float(os.environ["MINIGPT_TEST_TIMEOUT_SCALE"])
    try:
        per_core = os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:
        return 1.0
    return min(4.0, max(1.0, 1.0 + (per_core - 1.0)))


def liveness(seconds: float) -> float:
    return seconds * load_scale()


def busy_timeout(what: str, seconds: float):
    """Fail the test in one line: `what` outlived its liveness bound, with the machine's load beside it."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    pytest.fail(f"{what} did not finish within {seconds:.0f} s (a liveness bound, x{load_scale():.1f} for load); the "
                f"1-minute load average is {load:.1f} on {os.cpu_count()} cores: if the machine was busy, that is the "
                f"cause; rerun it alone", pytrace=False)


def _run(cmd, what: str, timeout: float, **kw):
    bound = liveness(timeout)
    try:
        return subprocess.run(cmd, timeout=bound, **kw)
    except subprocess.TimeoutExpired:
        busy_timeout(what, bound)


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """About 200 KB of real Python source copied from the standard library."""
    d = tmp_path_factory.mktemp("corpus")
    total = 0
    for path in stdlib_files():
        text = path.read_text(encoding="utf-8")
        (d / path.name).write_text(text, encoding="utf-8")
        total += len(text)
        if total > 200_000:
            break
    return d


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """One token cache for the whole session: the tiny corpus is tokenized once."""
    return tmp_path_factory.mktemp("token-cache")


@pytest.fixture(scope="session")
def good_run(corpus_dir, data_cache, tmp_path_factory) -> Path:
    """One finished 2-step run of the tiny test model for the whole session: tests that damage or craft a
    run copy it first."""
    from minigpt.core.config import load_config
    from minigpt.train.loop import train

    root = tmp_path_factory.mktemp("good")
    cfg = load_config(REPO / "configs" / "tiny.toml", tiny_overrides(corpus_dir, data_cache, root / "run",
                                                                       **{"train.max_steps": 2}))
    train(cfg, log=lambda *a, **k: None)
    return root / "run"


def tiny_overrides(corpus: Path, cache: Path, out_dir: Path, **extra) -> list[str]:
    sets = {
        "model.n_layer": 2, "model.n_head": 2, "model.n_embd": 32, "model.block_size": 32,
        "model.vocab_size": 320,
        "data.source": f'"{corpus}"', "data.cache_dir": f'"{cache}"', "data.val_fraction": 0.2,
        "train.out_dir": f'"{out_dir}"', "train.max_steps": 8, "train.micro_batch_size": 4,
        "train.batch_size_tokens": 0, "train.warmup_steps": 2, "train.eval_every": 4, "train.eval_iters": 2,
        "train.checkpoint_every": 4, "train.sample_every": 0, "train.log_every": 1, "train.lr": 3e-3,
        "train.compile": "false", "sample.max_new_tokens": 8, "train.report": "false",
    }
    sets.update(extra)
    return [f"{k}={v}" for k, v in sets.items()]


def set_args(sets: list[str]) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


@pytest.fixture
def tiny_cfg(corpus_dir, data_cache, tmp_path):
    """A factory: tiny_cfg(**overrides) -> Config writing into this test's tmp_path/run."""

    def make(**extra):
        return load_config(REPO / "configs" / "tiny.toml", tiny_overrides(corpus_dir, data_cache, tmp_path / "run", **extra))

    return make


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def run_cli(*args: str) -> Result:
    """`minigpt ARGS` in this process: exit code, stdout and stderr as a subprocess would give them."""
    from minigpt.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse
            code = e.code if isinstance(e.code, int) else 2
    return Result(code, out.getvalue(), err.getvalue())


def run_cli_process(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 300):
    """`python -m minigpt ARGS` in a fresh process: for what only a process shows (exit, imports)."""
    full_env = {**os.environ, **(env or {})}
    return _run([sys.executable, "-m", "minigpt", *args], f"minigpt {' '.join(args[:2])}", timeout, capture_output=True,
                text=True, cwd=cwd or REPO, env=full_env)


def torchrun(nproc: int, args: list[str], env: dict | None = None, timeout: int = 300, module: str = "minigpt"):
    """`torchrun --standalone --nproc_per_node N -m minigpt train ARGS` on CPU (gloo): minigpt's ranks forked
    (tests/forked_ranks.py) unless MINIGPT_TEST_TORCHRUN=1."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", module,
           *(["train"] if module == "minigpt" else []), *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", **(env or {})}
    what = f"torchrun x{nproc} {' '.join(args[:3])}"
    if forked_ranks.takes(cmd):
        bound = liveness(timeout)
        try:
            return forked_ranks.launch(cmd, full_env, REPO, bound)
        except subprocess.TimeoutExpired:
            busy_timeout(what, bound)
    return _run(cmd, what, timeout, capture_output=True, text=True, cwd=REPO, env=full_env)


def step_records(run_dir) -> list[dict]:
    """The step records of a run's metrics.jsonl."""
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if '"kind": "step"' in l]


def final_weights(run_dir) -> dict:
    """The weights of a run's latest checkpoint."""
    from safetensors.torch import load_file

    from minigpt.nn.weights import WEIGHTS
    from minigpt.run import files as checkpoint

    folder, _ = checkpoint.latest_checkpoint(run_dir)
    return load_file(str(folder / WEIGHTS))


# Muon (Newton-Schulz sets every singular value of an update near 1) turns float rounding in a near-null direction of a
# gradient (summation order under FSDP's reduce-scatter, tp's split GEMMs, the all-to-all) into a visible part of
# the update, more so for an expert given few tokens (a gradient of low rank), and by how much depends on the CPU's
# kernels. So a Muon run is compared with one process by each matrix's update, final minus initial weights: the
# difference within MUON_UPDATE_RTOL of one process's update in Frobenius norm. Seen: 2.1% (FSDP, dense) and 7.1%
# (experts under tp x ep) on an Intel Xeon, where an AMD EPYC's differences were 4x smaller. What it must catch:
# each shard orthogonalised on its own instead of the whole matrix differs by 55-68% (random 64-256 x 64 gradients
# in two shards); a misplaced expert by ~100%. A missing or doubled reduction Muon normalises away: the losses and
# gradient norms, compared to 1e-4, catch it.
MUON_UPDATE_RTOL = 0.25


def assert_updates_close(got: dict, want: dict, initial: dict, names, what: str, rtol: float = MUON_UPDATE_RTOL) -> None:
    """For each of `names`: (got - initial) equals (want - initial) within rtol of the latter's Frobenius norm."""
    for k in names:
        update = want[k] - initial[k]
        gap = float((got[k] - want[k]).norm() / update.norm())
        assert gap <= rtol, f"{what}: {k}: its update differs from one process's by {gap:.1%} (bound {rtol:.0%})"


def initial_weights(model_config, seed: int) -> dict:
    """A model's weights as training starts them (train.seed set as train's _build sets it), by name."""
    import torch

    from minigpt.nn.model import GPT

    torch.manual_seed(seed)
    return {k: v.detach().clone() for k, v in GPT(model_config).state_dict().items()}


DOC_PAGES = ("README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md")))


def doc_torchrun_lines() -> list[str]:
    """Every torchrun line in a code block of the README and the docs pages."""
    out = []
    for page in DOC_PAGES:
        blocks = (REPO / page).read_text().split("```")[1::2]
        out += [l.strip() for b in blocks for l in b.splitlines() if l.strip().startswith("torchrun ")]
    return out


def readme_torchrun_lines(sharded: bool = False, pipeline: bool = False) -> list[str]:
    """The torchrun commands of the scale-out page's code blocks (docs/scale-out.md; the README shows some of
    them again, checked to be the same lines): DDP/DeepSpeed ones, (sharded=True) the FSDP / tensor-parallel
    ones, which tests/test_sharding.py runs, or (pipeline=True) the pipelined ones (tests/test_pipeline.py)."""
    blocks = (REPO / "docs" / "scale-out.md").read_text().split("```")[1::2]
    lines = [l.strip() for b in blocks for l in b.splitlines() if l.strip().startswith("torchrun ")]
    if pipeline:
        return [l for l in lines if "pp=" in l]
    return [l for l in lines if "pp=" not in l and ("fsdp" in l or "tensor_parallel" in l or "--plan" in l) == sharded]


def torchrun_cmd(nproc: int, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "minigpt",
            "train", *args]


def run_concurrently(jobs: dict[str, list[str]], parallel: int = 3, timeout: int = 300,
                     torchrun: tuple[str, ...] = ()) -> dict:
    """Run commands (name -> argv) a few at a time, the next started as soon as any running one ends (each in a
    thread that drains its pipes); name -> CompletedProcess, in the jobs' order. Launch-bound jobs (imports,
    process groups) overlap well on two cores. A one-node torchrun launch of minigpt runs as forked ranks
    (tests/forked_ranks.py: torchrun's workers without its start-up), unless its name is in `torchrun` or
    MINIGPT_TEST_TORCHRUN=1 is set (every launch through torchrun)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    procs, stopping = {}, threading.Event()
    bound = liveness(timeout)

    def run(name: str, cmd: list[str]) -> subprocess.CompletedProcess:
        if stopping.is_set():
            return subprocess.CompletedProcess(cmd, -1, "", "not started: another job outlived its bound")
        if name not in torchrun and forked_ranks.takes(cmd):
            try:
                return forked_ranks.launch(cmd, env, REPO, bound)
            except subprocess.TimeoutExpired:
                stopping.set()
                raise
        procs[name] = proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                                              env=env)
        try:
            out, err = proc.communicate(timeout=bound)
        except subprocess.TimeoutExpired:
            stopping.set()
            raise
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)

    with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool:
        futures = {name: pool.submit(run, name, cmd) for name, cmd in jobs.items()}
        try:
            return {name: f.result() for name, f in futures.items()}
        except subprocess.TimeoutExpired as e:
            stopping.set()
            for proc in procs.values():
                proc.kill()
            late = next(name for name, f in futures.items() if f.done() and f.exception() is e)
            busy_timeout(f"job {late!r} of {len(jobs)} run side by side", bound)


class Proc:
    """A process whose stdout and stderr lines are collected as they come (to act on them);
    `arrivals` keeps (wall-clock time, line) of stdout lines as they arrived."""

    def __init__(self, argv, env=None):
        full = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", **(env or {})}
        self.p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=full)
        self.out, self.err, self.arrivals = [], [], []
        self.threads = [threading.Thread(target=self._read, args=(s, buf, log), daemon=True)
                        for s, buf, log in ((self.p.stdout, self.out, self.arrivals), (self.p.stderr, self.err, []))]
        for t in self.threads:
            t.start()

    @staticmethod
    def _read(stream, buf, arrivals):
        for line in stream:
            buf.append(line)
            arrivals.append((time.time(), line))

    def wait_for(self, predicate, timeout=120):
        timeout = liveness(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            if self.p.poll() is not None:
                said = [l for l in self.err if l.startswith("error") or "Error" in l][:5]
                raise AssertionError(f"exited {self.p.returncode} first: {said} {''.join(self.err)[-800:]}")
            time.sleep(0.02)
        busy_timeout("waiting for the process's line", timeout)

    def finish(self, timeout=120):
        try:
            self.p.wait(timeout=liveness(timeout))
        except subprocess.TimeoutExpired:
            self.p.kill()
            busy_timeout("the process", liveness(timeout))
        for t in self.threads:
            t.join()
        return self.p.returncode, "".join(self.out), "".join(self.err)


free_port = forked_ranks.free_port  # a TCP port of 127.0.0.1 that nothing listens on now


@contextlib.contextmanager
def serving(app):
    """An ASGI app served by uvicorn on a free port of 127.0.0.1, in a thread, for the block; yields the port."""
    import threading
    import time

    import uvicorn

    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.05)
    try:
        yield port
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


# The slowest files first (longest-processing-time first): with pytest-xdist's loadfile scheduling each file
# runs whole on one worker, so a slow file collected last would leave the other worker idle at the end.
SLOW_FIRST = ("test_distributed.py", "test_pipeline.py", "test_sharding.py", "test_reliability.py", "test_hardware.py",
              "test_simulate.py", "test_simulate_3d.py", "test_post.py", "test_offload.py", "test_layering.py",
              "test_cli.py", "test_extrapolate.py", "test_harness.py", "test_memory.py")  # by a --durations=0 run


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = item.path.name
        return SLOW_FIRST.index(name) if name in SLOW_FIRST else len(SLOW_FIRST)

    items.sort(key=rank)  # stable: the order inside a file, and of the other files, is kept
