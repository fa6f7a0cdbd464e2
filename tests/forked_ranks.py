"""The ranks of `torchrun --standalone --nproc_per_node N -m minigpt train ...` without torchrun's start-up cost.

Each torchrun launch imports torch three times (the launcher and two ranks: ~4 s of CPU a process on the 2-core
reference machine, where a tiny run's training takes under a second), and the suite's equivalence fixtures launch
dozens. Here the ranks are forked from one server process that imported torch and minigpt once (multiprocessing's
forkserver, its preload), each given the environment torchrun gives a worker (RANK, LOCAL_RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT: rank 0 hosts the store, as env:// does) and run as `python -m minigpt`
runs. What torchrun itself does (rendezvous, restarts, killing the rest of a failed group) is tested through torchrun:
tests/test_reliability.py, the README's lines each fixture keeps on torchrun, the two-node pipeline launch."""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing import forkserver
from pathlib import Path

PRELOAD = ["torch", "minigpt.cli", "minigpt.train.loop", "minigpt.measure.simulate"]  # simulate forks from the same server
_LOCK = threading.Lock()  # one forkserver per test process, started once; starts are serialised
_CONTEXT: list = []


def torchrun_args(cmd: list[str]) -> tuple[int, list[str]] | None:
    """(ranks, minigpt's arguments) of a one-node `python -m torch.distributed.run --standalone --nproc_per_node N
    -m minigpt ...` launch, or None for any other command (other launcher options: run it through torchrun)."""
    if cmd[:3] != [sys.executable, "-m", "torch.distributed.run"] or "-m" not in cmd[3:]:
        return None
    end = cmd.index("-m", 3)
    if cmd[end + 1:end + 2] != ["minigpt"]:
        return None
    launcher, nproc = cmd[3:end], None
    i = 0
    while i < len(launcher):
        arg = launcher[i]
        if arg == "--standalone":
            i += 1
        elif arg.split("=")[0] in ("--nproc_per_node", "--nproc-per-node"):
            value = arg.split("=", 1)[1] if "=" in arg else launcher[i + 1]
            nproc, i = int(value), i + (1 if "=" in arg else 2)
        else:
            return None
    return (nproc, cmd[end + 2:]) if nproc and "--standalone" in launcher else None


def takes(cmd: list[str]) -> bool:
    """Whether the suite forks this launch's ranks: a launch torchrun_args reads, unless MINIGPT_TEST_TORCHRUN=1
    sends every launch through torchrun."""
    return not os.environ.get("MINIGPT_TEST_TORCHRUN") and torchrun_args(cmd) is not None


def _context():
    with _LOCK:
        if not _CONTEXT:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(PRELOAD)
            saved = dict(os.environ)  # the server imports torch under a rank's thread settings
            os.environ.update({"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"})
            try:
                forkserver.ensure_running()
            finally:
                os.environ.clear()
                os.environ.update(saved)
            _CONTEXT.append(ctx)
    return _CONTEXT[0]


def _rank(env: dict, argv: list[str], out: str, err: str, cwd: str) -> None:
    """One rank, in the forked child: its environment, its output to files, then `python -m minigpt ARGV`."""
    os.chdir(cwd)
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    os.environ.clear()
    os.environ.update(env)
    sys.argv = ["minigpt", *argv]
    from minigpt.cli import main

    sys.exit(main(argv))


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cmd: list[str], env: dict, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run a launch torchrun_args reads: every rank's stdout and stderr (rank order), the first failing rank's exit
    code (0 when all succeed). A failed rank stops the others, as torchrun does; past `timeout` every rank is killed
    and subprocess.TimeoutExpired raised."""
    nproc, argv = torchrun_args(cmd)
    ctx, port = _context(), free_port()
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for rank in range(nproc):
            renv = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
                    "LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": str(port)}
            p = ctx.Process(target=_rank, args=(renv, argv, f"{tmp}/{rank}.out", f"{tmp}/{rank}.err", str(cwd)))
            with _LOCK:
                p.start()
            procs.append(p)
        code = _wait(procs, time.monotonic() + timeout, cmd, timeout)
        return subprocess.CompletedProcess(cmd, code, _output(tmp, nproc, "out"), _output(tmp, nproc, "err"))


def _output(tmp: str, nproc: int, kind: str) -> str:
    """The ranks' stdout or stderr in rank order (a rank that died before redirecting wrote none)."""
    files = [Path(tmp) / f"{rank}.{kind}" for rank in range(nproc)]
    return "".join(f.read_text(errors="replace") for f in files if f.exists())


def _wait(procs, deadline: float, cmd, timeout: float) -> int:
    """Wait for every rank; once one fails, SIGTERM the rest and SIGKILL any still there 30 s later (torchrun's
    order); past the deadline kill them all and raise subprocess.TimeoutExpired."""
    while any(p.exitcode is None for p in procs):
        if any(p.exitcode not in (None, 0) for p in procs):  # one failed: the rest would wait on it
            time.sleep(1.0)
            for p in procs:
                if p.exitcode is None:
                    p.terminate()
            deadline = min(deadline, time.monotonic() + 30)
            break
        if time.monotonic() > deadline:
            _kill(procs)
            raise subprocess.TimeoutExpired(cmd, timeout)
        multiprocessing.connection.wait([p.sentinel for p in procs if p.exitcode is None], timeout=0.5)
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    _kill(procs)
    return next((p.exitcode for p in procs if p.exitcode), 0)


def _kill(procs) -> None:
    for p in procs:
        if p.exitcode is None:
            p.kill()
    for p in procs:
        p.join()
