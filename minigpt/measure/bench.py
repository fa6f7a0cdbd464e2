"""Measure this device: achievable matmul FLOP/s per dtype and memory bandwidth; and decoding.

The hardware result (JSON) can be given as the peak for MFU (`train.peak_from`), which is the only
honest peak on a CPU, and an informative second one on a GPU beside its datasheet. The decode
benchmark sets measured tokens/s beside the memory-bandwidth bound of each decode step.
"""

from __future__ import annotations

import os
import time

import torch

from minigpt.analytic.flops import param_counts
from minigpt.analytic.memory import kv_cache_bytes_per_token
from minigpt.core.device import device_name, resolve_device
from minigpt.core.hardware import match_device
from minigpt.core.progress import Progress
from minigpt.infer.generate import generate_ids
from minigpt.nn.optim import DTYPES


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _times(fn, device: torch.device, repeats: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _best_time(fn, device: torch.device, repeats: int, warmup: int = 2) -> float:
    """The fastest of `repeats` timed calls: a peak is what the device can reach, and slower
    repeats are mostly interference on a shared machine."""
    return min(_times(fn, device, repeats, warmup))


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int, repeats: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = _best_time(lambda: torch.mm(a, b), device, repeats)
    return 2 * n**3 / t / 1e12


def copy_bandwidth_gbs(device: torch.device, nbytes: int, repeats: int) -> float:
    """Device memory bandwidth of a large copy: bytes read + bytes written per second."""
    src = torch.empty(nbytes // 4, device=device, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    t = _best_time(lambda: dst.copy_(src), device, repeats)
    return 2 * nbytes / t / 1e9


# GEMM shapes swept for the step-time model (m tokens x k in -> n out): transformer widths on a GPU, a small
# grid on a CPU (each product there takes up to ~10 ms at 1024)
SWEEP_GRID = {"cuda": {"m": (512, 1024, 2048, 4096, 8192, 16384), "n": (1024, 2048, 4096, 8192, 16384, 32768),
                       "k": (1024, 2048, 4096, 8192, 16384)},
              "cpu": {"m": (64, 256, 1024), "n": (64, 256, 1024), "k": (64, 256, 1024)}}


def _median_time(fn, device: torch.device, repeats: int, warmup: int = 2) -> float:
    """The median of `repeats` timed calls: a rate a training step keeps up, not the best burst."""
    times = sorted(_times(fn, device, repeats, warmup))
    return times[len(times) // 2]


def significant(x: float, digits: int = 5) -> float:
    """A measured rate kept to `digits` significant figures: a fixed number of decimals would round a small CPU
    GEMM's TFLOP/s (a 32^3 product under load: ~1e-6) to zero, which the step-time model would divide by."""
    return float(f"{x:.{digits}g}")


def gemm_sweep(dev: torch.device, dtype: str, repeats: int, grid: dict | None = None) -> dict:
    """Achieved TFLOP/s of every (m, n, k) of the grid: the efficiency curve the step-time model reads
    (analytic/steptime.py, `measured_rates`)."""
    grid = grid or SWEEP_GRID["cuda" if dev.type == "cuda" else "cpu"]
    shapes = []
    with Progress(len(grid["m"]) * len(grid["n"]) * len(grid["k"]), "GEMM sweep", "shapes") as progress:
        for m in grid["m"]:
            for n in grid["n"]:
                for k in grid["k"]:
                    a = torch.randn(m, k, device=dev, dtype=DTYPES[dtype])
                    b = torch.randn(k, n, device=dev, dtype=DTYPES[dtype])
                    t = _median_time(lambda: torch.mm(a, b), dev, repeats)
                    shapes.append([m, n, k, significant(2 * m * n * k / t / 1e12)])
                    progress.update()
    return {"dtype": dtype, "shapes": shapes,
            "convention": f"[m, n, k, TFLOP/s]: an m x k @ k x n product, 2 m n k FLOPs over the median of {repeats} "
                          f"timed runs (a sustained rate, not the best burst), one device alone"}


# The norm and MLP-activation passes swept beside them (rows x width, width the pass's output): an eager block's
# memory-bound passes at the shapes a step runs them, which analytic/steptime.py otherwise counts by bytes alone
PASS_GRID = {"cuda": {"rows": (4096, 16384, 65536), "width": (1024, 2048, 4096, 8192, 16384)},
             "cpu": {"rows": (256, 1024), "width": (128, 512)}}
PASS_KINDS = (("norm", "layernorm"), ("norm", "rmsnorm"), ("activation", "gelu"), ("activation", "swiglu"))


def pass_seconds(fn, rows: int, width: int, dev: torch.device, dtype: str, repeats: int) -> float:
    """Median seconds of a norm or activation pass `fn` forward + backward (with the sum it feeds) over rows x width
    inputs (for SwiGLU: gate and up side by side)."""
    x = torch.randn(rows, width, device=dev, dtype=DTYPES[dtype], requires_grad=True)
    return _median_time(lambda: fn(x).sum().backward(), dev, repeats)


def pass_sweep(dev: torch.device, dtype: str, repeats: int, grid: dict | None = None) -> dict:
    """Seconds of the model's own norms and MLP activations, forward + backward, at each rows x width of the grid
    (`measured_rates` reads them: a pass counts at the larger of its bytes over the copy rate and this)."""
    from minigpt.core.config import ModelConfig
    from minigpt.nn.model import MLP, make_norm

    grid = grid or PASS_GRID["cuda" if dev.type == "cuda" else "cpu"]
    passes = []
    with Progress(len(PASS_KINDS) * len(grid["width"]) * len(grid["rows"]), "pass sweep", "shapes") as progress:
        for kind, name in PASS_KINDS:
            for width in grid["width"]:
                c = ModelConfig(n_layer=1, n_head=1, n_embd=width if kind == "norm" else 64, ffn_hidden=width,
                                norm=name if kind == "norm" else "layernorm", mlp=name if kind == "activation" else "gelu")
                fn = make_norm(c) if kind == "norm" else MLP(c).activate
                if kind == "norm":
                    fn = fn.to(dev, DTYPES[dtype])
                for rows in grid["rows"]:
                    wide = 2 if name == "swiglu" else 1  # SwiGLU reads gate and up
                    passes.append([kind, name, rows, width, significant(pass_seconds(fn, rows, width * wide, dev,
                                                                                      dtype, repeats))])
                    progress.update()
    return {"dtype": dtype, "passes": passes,
            "convention": f"[kind, type, rows, width, seconds]: the pass forward + backward (with the sum it feeds and "
                          f"its gradient) over rows x width outputs, the median of {repeats} timed runs, one device alone"}


# Causal attention swept beside them: sequence lengths x head dims (a GPU runs SDPA's flash kernel)
ATTENTION_GRID = {"cuda": {"seq": (1024, 2048, 4096, 8192), "head_dim": (64, 128)},
                  "cpu": {"seq": (64, 256), "head_dim": (32, 64)}}


def attention_seconds(b: int, heads: int, s: int, d: int, dev: torch.device, dtype: str, repeats: int,
                      forward: bool = True) -> tuple[float, float]:
    """Median seconds of causal scaled_dot_product_attention over (b, heads, s, d): (the forward alone, 0.0 unless
    `forward`; the forward and backward with the sum it feeds)."""
    import torch.nn.functional as Fn

    q, k, v = (torch.randn(b, heads, s, d, device=dev, dtype=DTYPES[dtype], requires_grad=True) for _ in range(3))
    fwd = 0.0
    with torch.no_grad():
        if forward:
            fwd = _median_time(lambda: Fn.scaled_dot_product_attention(q, k, v, is_causal=True), dev, repeats)
    both = _median_time(lambda: Fn.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward(), dev, repeats)
    return fwd, both


def attention_sweep(dev: torch.device, dtype: str, repeats: int, grid: dict | None = None) -> dict:
    """Causal scaled_dot_product_attention forward and backward at each sequence length and head dim of the grid,
    as FLOP/s of what a causal flash kernel computes (the step-time model's count: half the square, 2 b s^2 heads d
    forward, twice that backward), about 64K tokens (a GPU) or 256 (a CPU) a call."""
    grid = grid or ATTENTION_GRID["cuda" if dev.type == "cuda" else "cpu"]
    shapes, tokens = [], 65536 if dev.type == "cuda" else 256
    with Progress(len(grid["seq"]) * len(grid["head_dim"]), "attention sweep", "shapes") as progress:
        for d in grid["head_dim"]:
            for s in grid["seq"]:
                heads, b = max(1, 2048 // d), max(1, tokens // s)
                fwd, both = attention_seconds(b, heads, s, d, dev, dtype, repeats)
                flops = 2.0 * b * s * s * heads * d
                shapes.append([s, d, significant(flops / fwd / 1e12), significant(2 * flops / max(both - fwd, 1e-9) / 1e12)])
                progress.update()
    return {"dtype": dtype, "shapes": shapes,
            "convention": f"[seq, head_dim, forward TFLOP/s, backward TFLOP/s]: causal SDPA, half the square counted "
                          f"(2 b s^2 heads d forward, twice that backward; backward = forward + backward less the "
                          f"forward), the median of {repeats} timed runs, one device alone"}


def bench_hardware(device: str = "auto", size: int = 0, repeats: int = 0, dtypes: list[str] | None = None,
                   sweep: bool = False) -> dict:
    dev = resolve_device(device)
    gpu = dev.type == "cuda"
    n = size or (8192 if gpu else 2048)
    reps = repeats or (20 if gpu else 8)
    dtypes = dtypes or (["fp32", "bf16", "fp16"] if gpu else ["fp32", "bf16"])
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 figure is plain FP32, not TF32
    name = device_name(dev)
    spec = match_device(name) if gpu else None
    result = {
        "bench": "hardware",
        "device": str(dev),
        "device_name": name,
        "cpu_cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "measured_at": round(time.time(), 1),
        # CPUs without 16-bit matmul units run bf16 ~100x slower: a smaller size keeps it short
        "matmul_size": {d: (n if gpu or d == "fp32" else min(n, 512)) for d in dtypes},
        "matmul_tflops": {},
        "copy_bandwidth_gbs": None,
        "datasheet": {"name": spec.name, "tflops": spec.tflops, "bandwidth_tbs": spec.bandwidth_tbs} if spec else None,
        "convention": f"best of {reps} n x n x n matmuls (n: matmul_size), 2 n^3 FLOPs each; copy bandwidth (best of {reps}) counts read + write bytes",
    }
    with Progress(len(dtypes) + 1, "hardware benchmark", "measurements") as progress:
        for d in dtypes:
            result["matmul_tflops"][d] = significant(matmul_tflops(dev, DTYPES[d], result["matmul_size"][d], reps))
            progress.update()
        result["copy_bandwidth_gbs"] = round(copy_bandwidth_gbs(dev, (1 << 30) if gpu else (256 << 20), reps), 1)
        progress.update()
    if sweep:  # the compute dtype of training there: bf16 on a GPU, fp32 on a CPU
        result["gemm_sweep"] = gemm_sweep(dev, "bf16" if gpu else "fp32", max(5, reps // 2))
        result["pass_sweep"] = pass_sweep(dev, "bf16" if gpu else "fp32", max(5, reps // 2))
        result["attention_sweep"] = attention_sweep(dev, "bf16" if gpu else "fp32", max(5, reps // 2))
    if spec:
        result["fraction_of_datasheet"] = {
            d: round(v / spec.tflops[d], 3) for d, v in result["matmul_tflops"].items() if d in spec.tflops
        }
    return result


# ----------------------------------------------------------------------------------------------
# decoding


def decode_bound(c, batch: int, context: int, bandwidth_gbs: float, bytes_per_el: int,
                 weight_bytes: float | None = None) -> dict:
    """The memory-bandwidth bound of one decode step: every weight and the batch's KV cache up to
    `context` are read once per step; tokens/s <= batch x bandwidth / those bytes. `weight_bytes`: what
    a quantized model reads (nn/quantize.weight_bytes), else every parameter at bytes_per_el."""
    weights = weight_bytes if weight_bytes is not None else param_counts(c).total * bytes_per_el
    kv = batch * context * kv_cache_bytes_per_token(c, bytes_per_el)
    step_s = (weights + kv) / (bandwidth_gbs * 1e9)
    return {"weight_bytes": weights, "kv_bytes": kv, "bound_step_ms": step_s * 1e3, "bound_tokens_per_s": batch / step_s}


def _decode_point(model, batch: int, context: int, new_tokens: int, compile: bool, repeats: int, bandwidth_gbs: float):
    """The fastest of `repeats` greedy generations from random prompts (after a warm-up run that
    also compiles), and the bandwidth bound at the generation's mean context."""
    c = model.config
    prompts = torch.randint(0, c.vocab_size, (batch, context)).tolist()
    runs = [generate_ids(model, prompts, new_tokens, temperature=0.0, compile=compile) for _ in range(repeats + 1)]
    best = min(runs[1:], key=lambda g: g.decode_s)
    weights = None
    if getattr(model, "quantization", None):
        from minigpt.nn.quantize import weight_bytes

        weights = weight_bytes(model)["read_per_decode_step_bytes"]
    return best, decode_bound(c, batch, context + new_tokens // 2, bandwidth_gbs, model.wte.weight.element_size(), weights)


def bench_decode(model, batches: list[int], prompt_len: int, new_tokens: int, compiled: list[bool],
                 bandwidth_gbs: float, repeats: int = 3) -> list[dict]:
    """Decode tokens/s of `model` (random prompts) per batch size, eager and compiled, beside the
    bandwidth bound at the mean context of the generation. Best of `repeats` (after a warm-up run
    that also compiles)."""
    rows = []
    for compile in compiled:
        for b in batches:
            best, bound = _decode_point(model, b, prompt_len, new_tokens, compile, repeats, bandwidth_gbs)
            s = best.stats()
            rows.append({"batch": b, "compiled": compile, "prompt_tokens": prompt_len, "new_tokens": new_tokens,
                         "decode_tokens_per_s": s["tokens_per_s"], "ms_per_step": s["ms_per_token_step"],
                         "prefill_ms": s["prefill_ms"], **bound,
                         "fraction_of_bound": round(s["tokens_per_s"] / bound["bound_tokens_per_s"], 4)})
    return rows


def decode_curve(model, batches: list[int], contexts: list[int], new_tokens: int, bandwidth_gbs: float,
                 peak_tflops: float | None, compile: bool = False, repeats: int = 2) -> list[dict]:
    """Prefill and decode speed at each (context, batch), beside the rooflines: the bandwidth bound
    (weights + KV cache read once per decode step / measured copy bandwidth) and the compute bound
    (decode FLOPs / measured matmul peak). Best of `repeats` after a warm-up run."""
    from minigpt.analytic.flops import decode_flops

    c, rows = model.config, []
    for context in contexts:
        for b in batches:
            best, bound = _decode_point(model, b, context, new_tokens, compile, repeats, bandwidth_gbs)
            step_s = best.decode_s / best.steps
            mean_ctx = context + new_tokens // 2
            flops_step = b * decode_flops(c, mean_ctx)
            compute_tps = b / (flops_step / (peak_tflops * 1e12)) if peak_tflops else None
            roof = min(bound["bound_tokens_per_s"], compute_tps) if compute_tps else bound["bound_tokens_per_s"]
            rows.append({"context": context, "batch": b, "new_tokens": new_tokens, "compiled": compile,
                         "prefill_tokens_per_s": round(b * context / best.prefill_s, 1),
                         "decode_tokens_per_s_total": round(b / step_s, 1),
                         "decode_tokens_per_s_per_sequence": round(1 / step_s, 2), "ms_per_token": round(step_s * 1e3, 3),
                         "bandwidth_bound_tokens_per_s": round(bound["bound_tokens_per_s"], 1),
                         "compute_bound_tokens_per_s": round(compute_tps, 1) if compute_tps else None,
                         "fraction_of_bandwidth_bound": round(b / step_s / bound["bound_tokens_per_s"], 4),
                         "fraction_of_roofline": round(b / step_s / roof, 4)})
    return rows


def engine_step_cost(model, max_batch: int, context: int, steps: int = 40) -> tuple[float, float]:
    """A serving engine's decode step as fixed seconds + seconds per row (measured: the median step at 1 row and at
    max_batch rows, each row at `context` tokens, the least of 5 tries each, the two sizes taken in turn so a burst of
    load from elsewhere falls on both, fitted through both). Greedy, this process's threads."""
    from minigpt.infer.engine import Engine, Sampling, Sequence

    def median_step(rows: int) -> float:
        engine = Engine(model, rows, prefix_cache=False)
        engine.add([Sequence([1 + i % 50 for i in range(context)], steps + 8, Sampling(0)) for _ in range(rows)])
        while not all(s.tokens for s in engine.running):  # the prompt prefilled (and copied to the other rows) first
            engine.step()
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t)
        return sorted(times)[len(times) // 2]

    tries = [(median_step(1), median_step(max_batch)) for _ in range(5)]
    one, full = min(t[0] for t in tries), min(t[1] for t in tries)
    per_row = max(0.0, (full - one) / (max_batch - 1)) if max_batch > 1 else 0.0
    return one - per_row, per_row


def predict_batching(run: str, lengths: list[int], prompts: list[int], max_batch: int, paged_rows: int) -> dict:
    """Continuous against static batching, predicted for these output lengths all sent at once
    (analytic/serving.batching_tokens_per_s) from this machine's measured engine steps on one thread, the run's
    Linears packed as the server packs them: static and continuous at max_batch rows, and continuous at paged_rows
    (the rows a paged cache of the same memory runs on this load; its memory assumed to hold them)."""
    from minigpt.analytic.serving import batching_tokens_per_s
    from minigpt.nn.torch_private import prepack_linears
    from minigpt.run.load import load_run

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = load_run(run, "cpu")[0]
        prepack_linears(model)
        mean_context = round(sum(prompts) / len(prompts) + sum(lengths) / len(lengths) / 2)
        fixed, per_row = engine_step_cost(model, max(max_batch, paged_rows), mean_context)
    finally:
        torch.set_num_threads(threads)
    out = {b: round(batching_tokens_per_s(lengths, max_batch, fixed, per_row, b, sum(prompts)), 2)
           for b in ("static", "continuous")}
    out["continuous_same_memory"] = round(batching_tokens_per_s(lengths, paged_rows, fixed, per_row, "continuous",
                                                                sum(prompts)), 2)
    free = [batching_tokens_per_s(lengths, max_batch, 1.0, 0.0, b) for b in ("static", "continuous")]
    return {"output_tokens_per_s": out, "continuous_over_static": round(out["continuous"] / out["static"], 3),
            "continuous_same_memory_over_static": round(out["continuous_same_memory"] / out["static"], 3),
            "continuous_same_memory_rows": paged_rows,
            # the same lengths and rows where a step costs the same whatever its rows (a memory-bound GPU decode): the
            # most continuous batching can gain on this load by scheduling alone
            "continuous_over_static_rows_free": round(free[1] / free[0], 3),
            "step_fixed_ms": round(fixed * 1e3, 3), "step_per_row_ms": round(per_row * 1e3, 4),
            "context_tokens": mean_context,
            "convention": "predicted: every request at once, a decode step = fixed + per row x rows (measured here, "
                          "median engine steps at 1 and at the most rows at the mean context), each prompt token a row "
                          "of a step; preemptions and the server's HTTP work left out"}


def all_at_once(run: str, load, sweeps: dict, max_batch: int) -> dict:
    """Each continuous server against static batching with every request sent at once: the sweeps' measured points
    beside `predict_batching` for the same lengths (the load's own plan; the paged server's rows: the requests in
    flight, at most its max_batch)."""
    from minigpt.measure.serve_bench import load_plan

    plan, _ = load_plan(load, sweeps["continuous"]["vocab_size"])
    lengths = [n for _, n in plan]
    paged_rows = min(load.concurrency, len(plan), sweeps["continuous_same_memory"]["server"]["max_batch"])
    predicted = predict_batching(run, lengths, [len(p) for p, _ in plan], max_batch, paged_rows)
    measured = {b: next((q["output_throughput_tokens_per_s"] for q in s["points"] if not q["rate_requests_per_s"]), None)
                for b, s in sweeps.items()}
    for b in ("continuous", "continuous_same_memory"):
        if measured["static"] and measured[b]:
            measured[f"{b}_over_static"] = round(measured[b] / measured["static"], 3)
            measured[f"{b}_measured_over_predicted"] = round(measured[f"{b}_over_static"]
                                                             / predicted[f"{b}_over_static"], 3)
    return {"all_at_once_measured": measured, "all_at_once_predicted": predicted,
            "output_tokens_mean": round(sum(lengths) / len(lengths), 1)}


def linear_kernels(shapes: list[tuple[int, int]], rows: list[int], repeats: int = 200) -> list[dict]:
    """Seconds per fp32 Linear on this CPU, torch's dense kernel (F.linear) against the weight packed once by oneDNN
    (nn/torch_private.linear, what `minigpt serve` runs), at each (in, out) shape and batch of rows, this process's
    threads, inference (no autograd); best of 3 medians of `repeats` calls."""
    from minigpt.nn.torch_private import linear, pack_linear_weight

    device, out = torch.device("cpu"), []
    with torch.no_grad():
        for n_in, n_out in shapes:
            w = torch.randn(n_out, n_in) / n_in ** 0.5
            packed = pack_linear_weight(w)
            for m in rows:
                x = torch.randn(m, n_in)
                dense_s = min(_median_time(lambda: torch.nn.functional.linear(x, w), device, repeats) for _ in range(3))
                packed_s = min(_median_time(lambda: linear(x, w, None, packed), device, repeats) for _ in range(3))
                err = (linear(x, w, None, packed) - torch.nn.functional.linear(x, w)).abs().max().item()
                out.append({"in": n_in, "out": n_out, "rows": m, "dense_us": round(dense_s * 1e6, 2),
                            "packed_us": round(packed_s * 1e6, 2), "packed_speedup": round(dense_s / packed_s, 3),
                            "max_abs_difference": err})
    return out
