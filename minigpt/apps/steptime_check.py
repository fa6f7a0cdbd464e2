"""The step-time model against a measured `minigpt train` step on this CPU: the one place the project can
check a predicted step end to end today.

The model (analytic/steptime.py) is the one extrapolate and backtest use; only its rates change: here they
are measured on this machine (each GEMM shape of the model timed as it is, the attention kernel at the
model's shape, copy bandwidth at the size of one activation tensor), never taken from the training run the
prediction is compared with. The prediction leaves out what the model leaves out everywhere (Python,
autograd and kernel-launch overhead, data loading).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from functools import lru_cache
from pathlib import Path

import torch

from minigpt.analytic import steptime as T
from minigpt.core.config import Config
from minigpt.core.errors import UserError
from minigpt.core.plan import ParallelPlan
from minigpt.measure.bench import attention_seconds, pass_seconds


def _median_time(fn, repeats: int = 7, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@lru_cache(maxsize=256)
def gemm_seconds(m: int, n: int, k: int, batch: int = 1) -> float:
    """Median time of one fp32 (batch x) m x k @ k x n product on this CPU."""
    a, b = torch.randn(batch, m, k), torch.randn(batch, k, n)
    if batch == 1:
        a, b = a[0], b[0]
        return _median_time(lambda: torch.mm(a, b))
    return _median_time(lambda: torch.bmm(a, b))


def attention_flops_per_s(b: int, heads: int, s: int, d: int) -> float:
    """Causal SDPA forward + backward at the model's shape, as FLOP/s of what a causal flash kernel computes
    (the step-time model's count: half the square, 2 b s^2 heads d forward, twice that backward)."""
    _, both = attention_seconds(b, heads, s, d, torch.device("cpu"), "fp32", 7, forward=False)
    return 3 * 2.0 * b * s * s * heads * d / both


def pass_timer(c):
    """(kind, rows, width, type) -> median seconds of the model's own norm ("norm") or MLP activation ("activation",
    `width` its output) forward + backward over rows x width fp32 on this CPU (the type is the model's)."""
    from minigpt.nn.model import MLP, make_norm

    norm, mlp = make_norm(c), MLP(c)
    wide = 2 if c.mlp == "swiglu" else 1  # SwiGLU reads gate and up

    @lru_cache(maxsize=64)
    def seconds(kind: str, rows: int, width: int, name: str = "") -> float:
        fn, cols = (norm, width) if kind == "norm" else (mlp.activate, width * wide)
        return pass_seconds(fn, rows, cols, torch.device("cpu"), "fp32", 7)

    return seconds


def copy_bytes_per_s(nbytes: int) -> float:
    src = torch.ones(max(1, nbytes // 4))
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / _median_time(lambda: dst.copy_(src), repeats=15)


def cpu_rates(cfg: Config, peak_tflops: float) -> T.Rates:
    c, b, s = cfg.model, cfg.train.micro_batch_size, cfg.model.block_size
    hbm = copy_bytes_per_s(b * s * c.n_embd * 4)
    att = attention_flops_per_s(b, c.n_head, s, c.head_dim)
    return T.Rates(name="cpu", peak_flops=peak_tflops * 1e12, matmul_flops=peak_tflops * 1e12, attention_flops=att,
                   hbm_bytes_per_s=hbm, nvlink_bytes_per_s=1.0, internode_bytes_per_s=1.0, gemm_time=gemm_seconds,
                   pass_time=pass_timer(c),
                   sources={"matmul": "measured here: each GEMM shape of the model timed (fp32, median of 7)",
                            "passes": f"measured here: the model's {c.norm} and {c.mlp} forward+backward at their "
                                      f"shapes, where slower than their bytes over the copy rate",
                            "attention": f"measured here: SDPA forward+backward at the model's shape, {att / 1e9:.1f} GFLOP/s",
                            "hbm": f"measured here: copy at one activation's size, {hbm / 1e9:.1f} GB/s (read + write)",
                            "peak": f"measured here: {peak_tflops * 1e3:.1f} GFLOP/s fp32 matmul"})


def cpu_setup(cfg: Config, plan: ParallelPlan, overlap: str = "none") -> T.Setup:
    """How the trainer runs cfg in fp32 on this CPU under `plan`: its micro-batch x accumulation, no recompute,
    SDPA, fp32 gradients; `overlap` what the backend hides (DDP: "backward")."""
    layout = plan.batch_layout(cfg.train, cfg.model.block_size)
    return T.Setup(seq_len=cfg.model.block_size, micro_batch=layout.micro_batch_size,
                   global_batch=layout.tokens_per_step // cfg.model.block_size, recompute="none", attention="flash",
                   overlap=overlap, act_bytes=4, grad_bytes=4)


def predict_cpu_step(cfg: Config, rates: T.Rates) -> dict:
    """The step-time model for one process training cfg in fp32 on this CPU."""
    return T.step_time(cfg.model, ParallelPlan(), cpu_setup(cfg, ParallelPlan()), rates)


SHAPES = {  # the tiny preset, and a larger shape (more of the step in GEMMs)
    "tiny": [],
    "wide": ["model.n_layer=4", "model.n_embd=384", "model.n_head=6", "model.block_size=256",
             "train.micro_batch_size=8", "train.batch_size_tokens=4096"],
}


def measured_step_ms(cfg: Config, steps: int, run: bool = True) -> float:
    """Median ms per step of `minigpt train` (in-process, one process, unless `run` is False: a run already
    made, e.g. under torchrun), the first steps left out."""
    import io
    import json

    from minigpt.train.loop import train

    if run:
        with contextlib.redirect_stdout(io.StringIO()):  # the run's final line: the benchmark prints one JSON line
            train(cfg, log=lambda *a: None)
    lines = (Path(cfg.train.out_dir) / "metrics.jsonl").read_text().splitlines()
    recs = [r for r in map(json.loads, lines) if r.get("kind") == "step"]
    return statistics.median(r["ms_per_step"] for r in recs[2:steps])


def _row(name: str, overrides: list[str], predicted: dict, measured_ms: float, rates: T.Rates) -> dict:
    """One shape's line: predicted beside measured, the predicted parts, the rates' sources."""
    pred_ms = predicted["step_s"] * 1e3
    return {"shape": name, "overrides": overrides, "predicted_ms": round(pred_ms, 2), "measured_ms": round(measured_ms, 2),
            "predicted_over_measured": round(pred_ms / measured_ms, 3),
            "predicted_parts_ms": {k: round(v * 1e3, 2) for k, v in predicted["parts_s"].items() if v > 0},
            "rates": rates.sources}


def _run_sets(name: str, overrides: list[str], root: Path, steps: int) -> list[str]:
    return [*overrides, f'train.out_dir="{root / name}"', f"train.max_steps={steps}", "train.eval_every=0",
            "train.checkpoint_every=0", "train.sample_every=0", "train.report=false", "train.log_every=1",
            'train.precision="fp32"', "train.compile=false"]


def check_shape(name: str, root, steps: int, peak_tflops: float) -> dict:
    from minigpt.core.config import load_config, resolve_preset

    cfg = load_config(resolve_preset("tiny"), _run_sets(name, SHAPES[name], root, steps))
    rates = cpu_rates(cfg, peak_tflops)
    predicted = predict_cpu_step(cfg, rates)
    return _row(name, SHAPES[name], predicted, measured_step_ms(cfg, steps), rates)


def _torchrun(ranks: int, args: list[str]) -> None:
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks), "-m", "minigpt",
           *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if done.returncode:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise UserError(f"torchrun minigpt {' '.join(args[:2])} failed (exit {done.returncode}): {tail}")


def all_reduce_at(path: Path, nbytes: float) -> dict:
    """The measured all-reduce row (`bench hardware --collectives`) nearest `nbytes` in log size."""
    import json
    import math

    rows = [r for r in json.loads(path.read_text())["collectives"]["results"] if r["op"] == "all_reduce"]
    return min(rows, key=lambda r: abs(math.log(r["bytes"] / nbytes)))


def _dp_setup(cfg: Config, ranks: int) -> tuple[ParallelPlan, T.Setup]:
    plan = ParallelPlan(dp=ranks)
    return plan, cpu_setup(cfg, plan, overlap="backward")  # DDP's buckets: the last micro-batch's backward


@contextlib.contextmanager
def busy_companions(n: int):
    """`n` other processes each computing one-thread fp32 matmuls until the block ends: rates timed in the block
    see the contention the other ranks of a data-parallel run put on the shared cores, caches and memory."""
    import subprocess
    import sys

    code = "import torch; torch.set_num_threads(1); a = torch.randn(384, 384)\nwhile True: a = (a @ a).tanh_()"
    procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(n)]
    try:
        time.sleep(1.0)  # past their import
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def check_data_parallel(root: Path, steps: int, ranks: int = 2) -> dict:
    """The tiny preset on `ranks` gloo ranks (DDP, one thread each, as torchrun sets) against the model: GEMMs
    timed here on one thread beside ranks - 1 busy processes (as each rank runs beside the others), the
    all-reduce's bus bandwidth measured by `bench hardware --collectives` at the gradients' size, DDP's bucket
    overlap (the reduce hides behind the last micro-batch's backward)."""
    import dataclasses

    from minigpt.analytic.flops import param_counts
    from minigpt.core.config import load_config, resolve_preset

    name, coll = f"tiny-dp{ranks}", root / "collectives.json"
    sets = _run_sets(name, [], root, steps)
    _torchrun(ranks, ["bench", "hardware", "--collectives", "--repeats", "20", "--out", str(coll)])
    _torchrun(ranks, ["train", "--config", "tiny", "--plan", f"dp={ranks}", *(x for s in sets for x in ("--set", s))])
    cfg = load_config(resolve_preset("tiny"), sets)
    row = all_reduce_at(coll, param_counts(cfg.model).total * 4)  # the fp32 gradients DDP reduces
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank ran; GEMMs are timed lazily, inside step_time: predict in here
    gemm_seconds.cache_clear()
    try:
        from minigpt.measure.bench import matmul_tflops

        with busy_companions(ranks - 1):  # as each rank ran: beside the others (GEMMs and passes are timed lazily)
            rates = cpu_rates(cfg, matmul_tflops(torch.device("cpu"), torch.float32, 1024, 5))
            rates = dataclasses.replace(rates, nvlink_bytes_per_s=row["busbw_gbs"] * 1e9, sources={
                **rates.sources, "links": f"measured here: gloo all-reduce bus bandwidth {row['busbw_gbs']} GB/s at "
                                          f"{row['bytes'] / 2**20:.2f} MiB ({ranks} ranks), the size nearest the gradients'",
                "contention": f"rates timed on one thread while {ranks - 1} other process(es) ran one-thread matmuls"})
            predicted = T.step_time(cfg.model, *_dp_setup(cfg, ranks), rates)
    finally:
        torch.set_num_threads(threads)
        gemm_seconds.cache_clear()
    return {**_row(name, [f"--plan dp={ranks}"], predicted, measured_step_ms(cfg, steps, run=False), rates),
            "dp_traffic_ms": round(predicted["traffic_s"]["dp"] * 1e3, 2)}
