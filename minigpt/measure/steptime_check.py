"""The step-time model against a measured `minigpt train` step on this CPU: the one place the project can
check a predicted step end to end today.

The model (analytic/steptime.py) is the one extrapolate and backtest use; only its rates change: here they
are measured on this machine (each GEMM shape of the model timed as it is, the attention kernel at the
model's shape, copy bandwidth at the size of one activation tensor), never taken from the training run the
prediction is compared with. The prediction leaves out what the model leaves out everywhere (Python,
autograd and kernel-launch overhead, data loading).
"""

from __future__ import annotations

import statistics
import time
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as Fn

from minigpt.analytic import steptime as T
from minigpt.core.config import Config
from minigpt.core.plan import ParallelPlan


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
    q, k, v = (torch.randn(b, heads, s, d, requires_grad=True) for _ in range(3))

    def step():
        out = Fn.scaled_dot_product_attention(q, k, v, is_causal=True)
        out.sum().backward()

    return 3 * 2.0 * b * s * s * heads * d / _median_time(step)


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
                   sources={"matmul": "measured here: each GEMM shape of the model timed (fp32, median of 7)",
                            "attention": f"measured here: SDPA forward+backward at the model's shape, {att / 1e9:.1f} GFLOP/s",
                            "hbm": f"measured here: copy at one activation's size, {hbm / 1e9:.1f} GB/s (read + write)",
                            "peak": f"measured here: {peak_tflops * 1e3:.1f} GFLOP/s fp32 matmul"})


def predict_cpu_step(cfg: Config, rates: T.Rates) -> dict:
    """The step-time model for one process training cfg in fp32 on this CPU."""
    c = cfg.model
    layout = ParallelPlan().batch_layout(cfg.train, c.block_size)  # what the trainer runs: micro-batch x accumulation
    setup = T.Setup(seq_len=c.block_size, micro_batch=layout.micro_batch_size,
                    global_batch=layout.tokens_per_step // c.block_size, recompute="none", attention="flash",
                    act_bytes=4, grad_bytes=4)
    return T.step_time(c, ParallelPlan(), setup, rates)


SHAPES = {  # the tiny preset, and a larger shape (more of the step in GEMMs)
    "tiny": [],
    "wide": ["model.n_layer=4", "model.n_embd=384", "model.n_head=6", "model.block_size=256",
             "train.micro_batch_size=8", "train.batch_size_tokens=4096"],
}


def measured_step_ms(cfg: Config, steps: int) -> float:
    """Median ms per step of `minigpt train` (in-process, one process), the first steps left out."""
    import contextlib
    import io
    import json

    from minigpt.train.loop import train

    with contextlib.redirect_stdout(io.StringIO()):  # the run's final line: the benchmark prints one JSON line
        train(cfg, log=lambda *a: None)
    lines = (Path(cfg.train.out_dir) / "metrics.jsonl").read_text().splitlines()
    recs = [r for r in map(json.loads, lines) if r.get("kind") == "step"]
    return statistics.median(r["ms_per_step"] for r in recs[2:steps])


def check_shape(name: str, root, steps: int, peak_tflops: float) -> dict:
    from minigpt.core.config import load_config, resolve_preset

    sets = [*SHAPES[name], f'train.out_dir="{root / name}"', f"train.max_steps={steps}", "train.eval_every=0",
            "train.checkpoint_every=0", "train.sample_every=0", "train.report=false", "train.log_every=1",
            'train.precision="fp32"', "train.compile=false"]
    cfg = load_config(resolve_preset("tiny"), sets)
    rates = cpu_rates(cfg, peak_tflops)
    predicted = predict_cpu_step(cfg, rates)
    measured = measured_step_ms(cfg, steps)
    pred_ms = predicted["step_s"] * 1e3
    return {"shape": name, "overrides": SHAPES[name], "predicted_ms": round(pred_ms, 2), "measured_ms": round(measured, 2),
            "predicted_over_measured": round(pred_ms / measured, 3),
            "predicted_parts_ms": {k: round(v * 1e3, 2) for k, v in predicted["parts_s"].items() if v > 0},
            "rates": rates.sources}
