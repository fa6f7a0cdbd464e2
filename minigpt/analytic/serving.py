"""The serving side of an extrapolation: prefill and decode FLOPs per token, a fleet sized by peak
concurrent users, and a fleet sized at a per-user reading speed from a measured decode or serve benchmark.
Torch-free."""

from __future__ import annotations

import json
import math
from pathlib import Path

from minigpt.analytic import flops as F, memory as M
from minigpt.analytic.scenario import HOURS_PER_MONTH, MEMORY_HEADROOM, Scenario
from minigpt.core.config import ModelConfig, read_json
from minigpt.core.errors import UserError
from minigpt.core.hardware import GPUS_PER_NODE


def serving_results(c: ModelConfig, s: Scenario, peak: float, mfu: float, price: float, ctx: int) -> dict:
    """The compute-bound fleet, the per-user-speed fleet, and (--quantize) that fleet with quantized weights."""
    out = {"serving": serving(c, s, mfu_peak=peak, price=price, context=ctx),
           "serving_at_user_speed": serving_at_user_speed(c, s, mfu=mfu, price=price, context=ctx)}
    if s.serve.get("serve_bench"):
        out["serving_measured"] = serving_measured(c, s)
    if s.quantize:
        per, why = QUANTIZED_BYTES_PER_WEIGHT[s.quantize]
        q = serving_at_user_speed(c, s, mfu=mfu, price=price, context=ctx, weight_bytes_per_param=per)
        out["serving_at_user_speed_quantized"] = {**q, "quantize": s.quantize, "weight_bytes_source": f"assumed: {why}",
                                                  "quality_source": "measured on small models only: "
                                                                    "benchmarks/bench_compress_cpu.jsonl"}
    if s.student is not None:
        st = serving_at_user_speed(s.student, s, mfu=mfu, price=price, context=ctx)
        out["serving_at_user_speed_student"] = {
            **st, "student": s.student_name, "student_params": F.param_counts(s.student).total,
            "quality_source": "assumed: the student's quality is not predicted here; distillation measured on small "
                              "models only (benchmarks/bench_distill_cpu.jsonl)"}
    return out


def inference_figures(c: ModelConfig, s: Scenario, ctx: int, peak: float, mfu: float) -> dict:
    """One decode step's FLOPs and bytes at context `ctx`: the bandwidth and compute bounds, prefill."""
    flops_tok = F.decode_flops(c, ctx)
    kv = M.kv_cache_bytes_per_token(c, 2)
    weight_bytes = 2 * _weights_read(c, s.batch)
    step_bytes = weight_bytes + s.batch * ctx * kv
    mem_bound = s.batch * s.gpu.bandwidth_tbs * 1e12 / step_bytes
    compute_bound = peak / flops_tok
    return {
        "context": ctx,
        "batch": s.batch,
        "flops_per_token": flops_tok,
        "flops_convention": "one decode step: 2 x active matmul params + 4 L t h attention at context t",
        "kv_bytes_per_token": kv,
        "weights_bytes_read_per_step": weight_bytes,
        "decode_tokens_per_s_per_gpu": min(mem_bound, compute_bound),
        "decode_memory_bound_tokens_per_s_per_gpu": mem_bound,
        "decode_compute_bound_tokens_per_s_per_gpu": compute_bound,
        "prefill_tokens_per_s_per_gpu": peak * mfu / (F.prefill_flops(c, ctx, all_logits=True) / ctx),
        "bandwidth": f"{s.gpu.name} HBM {s.gpu.bandwidth_tbs:g} TB/s; bf16 weights and KV cache",
    }


def _weights_read(c: ModelConfig, batch: int) -> float:
    """Parameters read from HBM per decode step: all of a dense model; for a mixture, the shared
    weights plus the experts the batch's tokens can touch (at most batch x k of E)."""
    p = F.param_counts(c)
    if not c.is_moe:
        return p.total
    per_expert = (p.total - p.active) / (c.n_expert - c.n_expert_active)
    shared = p.total - c.n_expert * per_expert
    return shared + min(c.n_expert, batch * c.n_expert_active) * per_expert


def serving(c: ModelConfig, s: Scenario, mfu_peak: float, price: float, context: int) -> dict:
    """GPUs to serve a steady load at a compute utilisation, and their monthly rent."""
    sv = s.serve
    for key in ("users", "requests_per_hour", "tokens_per_request", "utilisation"):
        if sv.get(key) is None or sv[key] <= 0:
            raise UserError(f"--serve needs a positive --{key.replace('_', '-')}")
    if sv["utilisation"] > 1:
        raise UserError(f"--utilisation {sv['utilisation']} must be in (0, 1]")
    tokens_per_s = sv["users"] * sv["requests_per_hour"] * sv["tokens_per_request"] / 3600
    flops_tok = F.decode_flops(c, context)
    gpus = math.ceil(tokens_per_s * flops_tok / (mfu_peak * sv["utilisation"]))
    return {
        **{k: v for k, v in sv.items() if k != "serve_bench"},  # the bench's own figures are in serving_measured
        "tokens_per_s": tokens_per_s,
        "flops_per_token": flops_tok,
        "num_gpus": gpus,
        "nodes_8_gpus": math.ceil(gpus / GPUS_PER_NODE),
        "cost_usd_per_month": gpus * price * HOURS_PER_MONTH,
        "convention": f"compute-bound: demand tokens/s x FLOPs per token / (peak x utilisation); {HOURS_PER_MONTH} h a month",
    }


USER_TOKENS_PER_S = (30.0, "assumption: about 30 tokens/s per user, a reading speed at which a generated answer "
                          "feels acceptable (the figure industry cost estimates of LLM serving use)")


SERVED_SHAPE = ("n_layer", "n_head", "n_kv_head", "n_embd", "vocab_size", "ffn_hidden", "n_expert", "n_expert_active")


def read_serve_bench(path: str) -> tuple[dict, str]:
    """A `minigpt bench serve` result (its sweep of arrival rates), checked enough to size a fleet from."""
    try:
        data = read_json(Path(path), "serve benchmark")
        points = data["points"]
        if data.get("bench") != "serve" or not points or any("output_throughput_tokens_per_s" not in q for q in points):
            raise ValueError
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{path} is not a serve benchmark: write one with 'minigpt bench serve --out {path}'") from None
    device = (data.get("server") or {}).get("device", "an unnamed machine")
    return data, f"measured: {path} ({data['model']} on {device}, {len(points)} arrival rates)"


def best_at_user_speed(points: list[dict], per_user: float) -> dict | None:
    """The sweep point with the most output tokens/s whose median request reached per_user tokens/s and that lost no
    request; None when none did."""
    ok = [q for q in points if q.get("per_user_tokens_per_s") and not q.get("failed")
          and q["per_user_tokens_per_s"]["p50"] >= per_user]
    return max(ok, key=lambda q: q["output_throughput_tokens_per_s"]) if ok else None


def serving_measured(c: ModelConfig, s: Scenario) -> dict:
    """Servers like the benchmarked one to carry the demand: demand tokens/s / the measured output tokens/s at the
    highest arrival rate whose median user still reached the per-user speed. The bench must have served this model."""
    bench, source = s.serve["serve_bench"]
    served = (bench.get("server") or {}).get("config") or {}
    differ = [k for k in SERVED_SHAPE if k in served and served[k] != getattr(c, k)]
    if not served or differ:
        what = ", ".join(f"{k} {served.get(k)} vs {getattr(c, k)}" for k in differ) or "its config is not in the file"
        raise UserError(f"--from-serve-bench: the benchmarked server ran another model ({what}): give --target the run "
                        f"it served")
    target = s.serve.get("tokens_per_s_per_user") or USER_TOKENS_PER_S[0]
    demand = s.serve["users"] * s.serve["requests_per_hour"] * s.serve["tokens_per_request"] / 3600
    best = best_at_user_speed(bench["points"], target)
    base = {"source": source, "tokens_per_s_per_user": target, "device": bench["server"].get("device"),
            "batching": bench["server"].get("batching"), "demand_tokens_per_s": demand}
    if best is None:
        fastest = max((q["per_user_tokens_per_s"]["p50"] for q in bench["points"] if q.get("per_user_tokens_per_s")), default=0)
        return {**base, "met": False, "note": f"no measured rate kept the median user at {target:g} tokens/s (fastest "
                                                f"{fastest:.1f}): benchmark lower arrival rates or a faster server"}
    return {**base, "met": True, "rate_requests_per_s": best["rate_requests_per_s"],
            "server_tokens_per_s": best["output_throughput_tokens_per_s"],
            "per_user_tokens_per_s": best["per_user_tokens_per_s"]["p50"], "ttft_ms_p99": (best["ttft_ms"] or {}).get("p99"),
            "servers": math.ceil(demand / best["output_throughput_tokens_per_s"]),
            "convention": "measured: servers = ceil(demand tokens/s / a server's output tokens/s at the highest benchmarked "
                          "arrival rate whose median request reached the per-user speed)"}


def decode_efficiency(path: str) -> tuple[dict[int, float], str]:
    """Fraction of the bandwidth bound a decode curve (`minigpt bench decode` JSON) reached at each
    batch (its longest context): measured efficiency instead of an assumed utilisation."""
    try:
        data = read_json(Path(path), "decode curve")
        rows = data["rows"]
        ctx = max(r["context"] for r in rows)
        eff = {int(r["batch"]): float(r["fraction_of_bandwidth_bound"]) for r in rows if r["context"] == ctx}
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{path} is not a decode curve: write one with 'minigpt bench decode --out {path}'") from None
    return eff, f"measured: {path} ({data.get('device_name', '?')}, context {ctx}, batches {sorted(eff)})"


def _efficiency_at(eff: dict[int, float], batch: int) -> float:
    """The measured fraction at the largest measured batch <= batch (the smallest one below it)."""
    below = [b for b in eff if b <= batch]
    return eff[max(below)] if below else eff[min(eff)]


QUANTIZED_BYTES_PER_WEIGHT = {  # weight-only quantization (nn/quantize.py): values plus their scales
    "int8": (1.0, "int8: 1 byte a weight (one bf16 scale per output row, negligible)"),
    "int4": (0.625, "int4 in groups of 32: half a byte a weight plus a bf16 scale and zero per 32 = 0.625 bytes"),
}


def serving_at_user_speed(c: ModelConfig, s: Scenario, mfu: float, price: float, context: int,
                          weight_bytes_per_param: float | None = None) -> dict:
    """GPUs to serve the load with every user decoding at >= tokens_per_s_per_user.

    A replica holds the weights (in --dtype) and its batch's KV cache on the fewest GPUs that fit
    (MEMORY_HEADROOM) or on more (up to 64, tensor parallel), their bandwidth and peak pooled;
    the replica size and batch with the most tokens/s per GPU are chosen. A decode step reads the weights and the
    batch's KV cache once: bound time = bytes / bandwidth, divided by the efficiency reached (a
    decode curve's measured fraction of that bound at this batch, or the assumed utilisation),
    and no faster than the compute bound at the MFU. The largest batch (a power of two) whose
    per-user speed, times the speculative speed-up, meets the target sets each replica's output.
    """
    sv = s.serve
    target, target_source = sv.get("tokens_per_s_per_user") or USER_TOKENS_PER_S[0], sv.get("user_speed_source") or USER_TOKENS_PER_S[1]
    eff_table, eff_source = sv.get("efficiency") or (None, f"assumption: --utilisation {sv['utilisation']:g} of the bandwidth bound")
    speedup, speedup_source = sv.get("speculate") or (1.0, "no speculative decoding")
    el = 2 if s.dtype in ("bf16", "fp16") else (1 if s.dtype == "fp8" else 4)
    wel = weight_bytes_per_param or el  # quantized weights; the KV cache stays in the compute dtype
    weights = F.param_counts(c).total * wel  # held; read per step: weights_read(batch)
    kv_tok = M.kv_cache_bytes_per_token(c, el) * context
    mem, bw = s.gpu.memory_gb * 1e9 * MEMORY_HEADROOM, s.gpu.bandwidth_tbs * 1e12
    best = None
    for g in range(max(1, math.ceil(weights / mem)), 65):  # more GPUs per replica pool more bandwidth
        for batch in (2**i for i in range(13)):
            if weights + batch * kv_tok > g * mem:
                break
            eff = _efficiency_at(eff_table, batch) if eff_table else sv["utilisation"]
            step = max((_weights_read(c, batch) * wel + batch * kv_tok) / (g * bw) / eff,
                       batch * F.decode_flops(c, context) / (g * s.gpu.tflops[s.dtype] * 1e12 * mfu))
            per_user = speedup / step
            if per_user < target:
                break
            row = {"batch_per_replica": batch, "gpus_per_replica": g, "per_user_tokens_per_s": per_user,
                   "replica_tokens_per_s": batch * per_user, "efficiency": eff}
            if best is None or row["replica_tokens_per_s"] / g > best["replica_tokens_per_s"] / best["gpus_per_replica"]:
                best = row
    if best is None:
        return {"met": False, "tokens_per_s_per_user": target, "tokens_per_s_per_user_source": target_source,
                "efficiency_source": eff_source, "note": f"no replica of up to 64 x {s.gpu.name} decodes this model at "
                f"{target:g} tokens/s per user: lower --tokens-per-s-per-user, measure the efficiency, or use a faster GPU"}
    demand = sv["users"] * sv["requests_per_hour"] * sv["tokens_per_request"] / 3600
    replicas = math.ceil(demand / best["replica_tokens_per_s"])
    gpus = replicas * best["gpus_per_replica"]
    return {**best, "met": True, "tokens_per_s_per_user": target, "tokens_per_s_per_user_source": target_source,
            "efficiency_source": eff_source, "speculative_speedup": speedup, "speculative_source": speedup_source,
            "demand_tokens_per_s": demand, "replicas": replicas, "num_gpus": gpus,
            "cost_usd_per_month": gpus * price * HOURS_PER_MONTH, "context": context,
            "convention": "decode step = max(weights + batch KV cache / (GPUs x HBM bandwidth) / efficiency, batch decode "
                          f"FLOPs / (GPUs x {s.dtype} peak x MFU)); largest power-of-two batch meeting the per-user speed; tensor-parallel "
                          "communication inside a replica not modelled"}


def speculate_factor(value: str) -> tuple[float, str]:
    """--speculate: a speed-up factor, or a scripts/bench_speculative.py JSON file (its best K)."""
    try:
        factor = float(value)
    except ValueError:
        factor = None
    if factor is not None:
        if not 0 < factor < 100:
            raise UserError(f"--speculate {value} must be a speed-up factor in (0, 100), e.g. 1.8, or a benchmark file")
        return factor, f"given (--speculate {factor:g})"
    try:
        data = json.loads(Path(value).read_text().strip().splitlines()[-1])
        best = max((r for r in data["rows"] if r.get("speedup")), key=lambda r: r["speedup"])
    except (OSError, ValueError, KeyError, IndexError):
        raise UserError(f"--speculate {value}: neither a number nor a scripts/bench_speculative.py result") from None
    return best["speedup"], f"measured: {value} (K={best['k']}, on {data.get('device', '?')})"


def batching_tokens_per_s(lengths: list[int], max_batch: int, fixed_s: float, per_row_s: float, policy: str,
                          prompt_tokens: int = 0) -> float:
    """Predicted output tokens/s of one server given every request at once (its saturated throughput), a decode step
    costing fixed_s + per_row_s x its rows (what a step reads whatever its batch, and each row's own work), and each
    of the prompt_tokens (all requests' together) one more row of some step (a flat batch prefills beside the decodes);
    the server's own time left out. continuous: a free row takes the next request at the next step (Yu et al. 2022,
    Orca); static: a batch of max_batch requests runs until its longest ends, a finished row computing no more (the
    static server minigpt compares against). So a static batch pays fixed_s for as many steps as its longest answer,
    and the gain of continuous batching is at most E[longest] / E[length] in a batch, reached where fixed_s dominates
    (a GPU's memory-bound decode), and less where per-row work does (a CPU)."""
    if policy not in ("continuous", "static") or max_batch < 1 or not lengths or min(lengths) < 1:
        raise ValueError(f"policy {policy!r}, max_batch {max_batch}, lengths {len(lengths)}: give continuous or static, "
                         "a batch of 1 or more and positive lengths")
    seconds = 0.0
    if policy == "static":
        for i in range(0, len(lengths), max_batch):
            batch = lengths[i:i + max_batch]  # rows alive at step t: those longer than t
            seconds += max(batch) * fixed_s + sum(batch) * per_row_s
        return sum(lengths) / (seconds + prompt_tokens * per_row_s)
    waiting, left = list(lengths), []  # left: tokens each running row still has to make
    while waiting or left:
        while waiting and len(left) < max_batch:
            left.append(waiting.pop(0))
        seconds += fixed_s + per_row_s * len(left)
        left = [n - 1 for n in left if n > 1]
    return sum(lengths) / (seconds + prompt_tokens * per_row_s)
