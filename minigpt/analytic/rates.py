"""What a device achieves (not its datasheet): the rates the step-time model (analytic/steptime.py) divides counted
work by. Cited microbenchmarks per GPU (`gpu_rates`), or what `minigpt bench hardware --sweep / --collectives`
measured on the device (`measured_rates`: a GEMM curve per shape, the copy bandwidth, the all-reduce bus
bandwidth), with one fitted share of the compute rates a training step sustains (SUSTAINED). Torch-free."""

from __future__ import annotations

import dataclasses
import itertools
import math
from bisect import bisect_right
from dataclasses import dataclass, field

from minigpt.core.errors import UserError
from minigpt.core.hardware import GPUS_PER_NODE, GPUSpec

# Achievable rates of each GPU, from microbenchmarks (not from training runs). BF16/FP16 dense.
# Matmul: Bekman, "Machine Learning Engineering", the "Maximum Achievable and Sustainable Matmul FLOPS comparison
# table" (compute/accelerator/README.md of stas00/ml-engineering at commit 0359db8, mamf-finder benchmark
# version 4). Where it gives the sustained rate (MSMF: the chip saturated at its power limit, "use MSMF for
# training throughput"), measured with every GPU of the node computing (the median GPU of 8), that one: H200
# bf16 755 TFLOP/s (used for the H100 too: the same die and 700 W limit; the table has no H100 MSMF), B200
# 1439. Else the burst ceiling (MAMF, best shape, one GPU alone): A100 SXM 271 (optimistic for sustained
# training). 698.6, 1426.4 and 267.9, read from a version of the table that no longer has them, were used here
# until the figures were checked against the source again (README, "Predicted efficiency": the backtest
# before and after).
MAMF_SOURCE = "Bekman, ml-engineering mamf-finder (table at commit 0359db8)"
MAMF = {"A100-40GB": (271.0, "A100 SXM MAMF, one GPU alone (burst; the table has no A100 SXM MSMF)"),
        "A100-80GB": (271.0, "A100 SXM MAMF, one GPU alone (burst; the table has no A100 SXM MSMF)"),
        "H100": (755.0, "H200 MSMF, median GPU of 8 all busy (same die and power limit as H100 SXM; no H100 MSMF)"),
        "H200": (755.0, "H200 MSMF, median GPU of 8 all busy"),
        "B200": (1439.0, "B200 MSMF, median GPU of 8 all busy")}
# Flash attention kernel, forward+backward (the forward's figure: the backward is slower, so optimistic):
# A100 FlashAttention-2 50-73% of peak (Dao 2023, Fig. 4-6), middle 62%; H100 at head dim 128, 2k-4k tokens:
# FlashAttention-2 about 365 TFLOP/s, cuDNN / FlashAttention-3 about 615-640 (Shah et al. 2024, FlashAttention-3, Fig. 5).
FLASH = {"A100-40GB": (0.62, "FlashAttention-2 on A100: 50-73% of peak (Dao 2023), middle of the range"),
         "A100-80GB": (0.62, "FlashAttention-2 on A100: 50-73% of peak (Dao 2023), middle of the range"),
         "H100": (0.62, "cuDNN / FlashAttention-3 forward on H100, head dim 128, 2k-4k tokens: ~615 of 989 TFLOP/s (Shah et al. 2024)"),
         "H200": (0.62, "as H100 (same compute die)"),
         "B200": (0.62, "assumption: the H100 fraction (no cited B200 kernel figure)")}
FLASH2_H100 = (0.37, "FlashAttention-2 forward on H100, head dim 128, 2k-8k tokens: ~365 of 989 TFLOP/s (Shah et al. 2024)")
# The backward pass where it is cited (Shah et al. 2024, Fig. 7, H100 SXM5, head dim 128, 4k tokens): cuDNN 499 and
# FlashAttention-3 542 TFLOP/s (the middle, 520, for the "fast" class), FlashAttention-2 310. Elsewhere the forward's
# rate stands for both (optimistic: every cited backward is slower than its forward).
FLASH_BWD_H100 = {"fast": (520 / 989, "cuDNN / FlashAttention-3 backward on H100, head dim 128, 4k tokens: 499-542 of 989 TFLOP/s (Shah et al. 2024, Fig. 7)"),
                  "fa2": (310 / 989, "FlashAttention-2 backward on H100, head dim 128, 4k tokens: 310 of 989 TFLOP/s (Shah et al. 2024, Fig. 7)")}
HBM_EFFICIENCY = (0.9, "assumption: 90% of the datasheet HBM bandwidth for streaming kernels")
LINK_EFFICIENCY = (0.8, "assumption: NCCL ring bus bandwidth at 80% of the one-way link (nccl-tests on DGX systems: 75-90%)")
# The one constant of the model chosen by looking at training runs (a fit, said as such): the share of the
# microbenchmark rates above (best-shape GEMMs, a kernel alone) that a training step's GEMMs and attention
# kernels sustain between its other work. Chosen on the backtest's development runs alone (median |error| over
# a grid of 0.80-1.00 in steps of 0.01-0.05: 0.85 gives 3.1%, 1.00 gave 14.9%) and reported on the held-out sets
# committed before it (published_runs.toml). What it stands for is not modelled term by term: GEMM shapes below
# the best one, power and thermal clock limits under a whole node's load, kernel launch gaps, and stragglers at
# scale (Bekman's MAMF/MSMF gap; Phantora and estimate-train-time profile kernels instead: 3-9% error).
SUSTAINED = (0.85, "fitted on the development runs of `minigpt backtest` (analytic/rates.py SUSTAINED)")
# NCCL's own latency model (src/graph/tuning.cc, the same Ring / Simple figures in releases 2.18.3 to 2.21.5, the
# NCCL of PyTorch 2.1-2.5 and NGC 23.10-24.x), which NCCL uses to pick an algorithm, in microseconds: a ring
# collective costs a base latency plus one hop latency per ring step (all-gather and reduce-scatter: ranks - 1 steps,
# nodes - 1 of them across the network; all-reduce twice), an intra-node hop at least 3x the host's network post
# overhead once the ring leaves its node (1 us on Intel hosts, 2 us on AMD: getNetOverhead). Large transfers (the
# Simple protocol, the one training's collectives use). NCCL's tree (all-reduce only) where it is quicker:
# 2 ((ranks per node - 1) x 28 + floor(log2(nodes)) x 28) us in releases 2.19-2.21.
NCCL_RING_US = {"base": 8.4, "nvlink": 3.4, "net": 14.0}
NCCL_TREE_US = 28.0
NCCL_NET_OVERHEAD_US = {"intel": 1.0, "amd": 2.0}
# the host CPU of each GPU's 8-GPU DGX system (datasheets): DGX-1 V100 Intel Xeon E5-2698 v4, DGX A100 AMD EPYC 7742,
# DGX H100 / H200 Intel Xeon Platinum 8480C, DGX B200 Intel Xeon Platinum 8570
DGX_HOST = {"A100-40GB": "amd", "A100-80GB": "amd"}
NCCL_SOURCE = "NCCL 2.18-2.21 latency model (src/graph/tuning.cc): Ring / Simple hops, the tree for all-reduce"


def collective_latency_s(kind: str, ranks: int, per_node: int, host: str) -> float:
    """Seconds of latency NCCL's model gives one collective (`kind`: all_gather, reduce_scatter, all_reduce) over
    `ranks` ranks, `per_node` of them in each node, on a host of `host` ("intel", "amd"; "" : no NCCL, 0)."""
    if not host or ranks <= 1:
        return 0.0
    nodes = math.ceil(ranks / max(1, per_node))
    steps, inter = ranks - 1, nodes - 1
    if kind == "all_reduce":
        steps, inter = 2 * (ranks - 1), (2 * nodes if nodes > 1 else 0)
    hop = NCCL_RING_US["nvlink"] if nodes == 1 else max(NCCL_RING_US["nvlink"], 3 * NCCL_NET_OVERHEAD_US[host])
    ring = NCCL_RING_US["base"] + (steps - inter) * hop + inter * NCCL_RING_US["net"]
    if kind == "all_reduce":
        tree = 2 * ((min(ranks, per_node) - 1) * NCCL_TREE_US + (nodes.bit_length() - 1) * NCCL_TREE_US)
        ring = min(ring, tree)
    return ring * 1e-6


TILE = (256, 128)  # the output tile of a large cuBLAS BF16 GEMM (NVIDIA's GEMM performance guide)
SMS = {"V100": 80, "A100-40GB": 108, "A100-80GB": 108, "H100": 132, "H200": 132, "B200": 148}


@dataclass(frozen=True)
class Rates:
    """What one device achieves (not its datasheet): FLOP/s and bytes/s, each with its source."""
    name: str
    peak_flops: float  # datasheet dense figure MFU divides by
    matmul_flops: float  # large-GEMM ceiling
    attention_flops: float  # flash kernel, forward (and backward where attention_bwd_flops is 0)
    hbm_bytes_per_s: float
    nvlink_bytes_per_s: float  # per GPU per direction, achievable
    internode_bytes_per_s: float
    sms: int = 0  # 0: no wave quantization (a CPU)
    sustained: float = 1.0  # share of the matmul and attention rates a training step sustains (SUSTAINED on a GPU)
    attention_bwd_flops: float = 0.0  # flash kernel, backward, where cited (0: the forward's rate)
    gemm_time: object = None  # optional callable (m, n, k, batch) -> seconds, measured per shape (CPU)
    pass_time: object = None  # optional callable (kind, rows, width, type) -> seconds of a norm or activation pass
    # (type: the norm's or the MLP's), forward + backward, measured at that shape (a CPU; a GPU's pass sweep)
    attention_time: object = None  # optional callable (seq, head_dim) -> (forward, backward) FLOP/s of the flash
    # kernel, measured per shape (a GPU's attention sweep)
    nccl_host: str = ""  # the host CPU NCCL's latency model reads ("intel", "amd"); "": no NCCL latency (a CPU)
    sources: dict = field(default_factory=dict)


def gpu_rates(gpu: GPUSpec, dtype: str = "bf16", flash: str = "fast", hbm_tbs: float | None = None,
              internode_gbs: float | None = None, peak_tflops: float | None = None) -> Rates:
    """A GPU's achievable rates from cited microbenchmarks. `flash`: "fast" (cuDNN / FlashAttention-3
    class kernels) or "fa2" (FlashAttention-2, e.g. PyTorch's SDPA flash backend in 2024). `internode_gbs`:
    the GB/s per GPU per direction between nodes when not the GPU's DGX default (one NIC per GPU).
    `peak_tflops`: the dense peak in `dtype` of a part that does not run at the datasheet's (a lower power
    limit): the matmul and attention rates scale with it."""
    if internode_gbs is not None:
        gpu = dataclasses.replace(gpu, internode_gbs=float(internode_gbs))
    scale = 1.0 if peak_tflops is None else peak_tflops / gpu.tflops[dtype]
    peak = gpu.tflops[dtype] * 1e12 * scale
    mamf, mamf_what = MAMF.get(gpu.name, (0.0, ""))
    matmul = (mamf / gpu.tflops["bf16"]) * peak if mamf else 0.8 * peak
    hopper = gpu.name in ("H100", "H200")  # the GPUs with cited FlashAttention-2 and backward figures
    att_frac, att_src = FLASH2_H100 if flash == "fa2" and hopper else FLASH.get(
        gpu.name, (0.5, "assumption: half of peak (no cited kernel figure)"))
    hbm = (hbm_tbs or gpu.bandwidth_tbs) * 1e12 * HBM_EFFICIENCY[0]
    bwd_frac, bwd_src = FLASH_BWD_H100[flash if flash == "fa2" else "fast"] if hopper else (
        0.0, "the forward's rate (no cited backward figure for this GPU)")
    return Rates(
        name=gpu.name, peak_flops=peak, matmul_flops=matmul, attention_flops=att_frac * peak, hbm_bytes_per_s=hbm,
        nvlink_bytes_per_s=gpu.nvlink_gbs * 1e9 * LINK_EFFICIENCY[0],
        internode_bytes_per_s=gpu.internode_gbs * 1e9 * LINK_EFFICIENCY[0], sms=SMS.get(gpu.name, 0),
        sustained=SUSTAINED[0], attention_bwd_flops=bwd_frac * peak, nccl_host=DGX_HOST.get(gpu.name, "intel"),
        sources={"attention_backward": bwd_src, "sustained": f"{SUSTAINED[0]:g} of the matmul and attention rates, {SUSTAINED[1]}","peak": f"{gpu.name} datasheet dense {dtype} {gpu.tflops[dtype]:g} TFLOP/s" if scale == 1.0 else
                 f"{gpu.name} at {peak / 1e12:g} dense {dtype} TFLOP/s (given for this part; the datasheet's {gpu.tflops[dtype]:g})",
                 "matmul": (f"{MAMF_SOURCE}: {mamf_what}, {mamf:g} TFLOP/s bf16" if mamf else "assumption: 80% of peak (no mamf-finder figure)"),
                 "attention": att_src, "hbm": f"{HBM_EFFICIENCY[1]} ({hbm / 1e12:.2f} TB/s)",
                 "links": f"{LINK_EFFICIENCY[1]}; NVLink {gpu.nvlink_gbs:g} GB/s per direction, inter-node "
                          f"{gpu.internode_gbs:g} GB/s per GPU",
                 "latency": f"counted only with latency = nccl (--latency nccl): {NCCL_SOURCE}; the DGX host "
                            f"({DGX_HOST.get(gpu.name, 'intel')})"})


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_row(row) -> bool:
    return isinstance(row, list) and len(row) == 4 and all(_is_number(x) for x in row)


class GemmTable:
    """A measured GEMM sweep (`minigpt bench hardware --sweep`) as a time per shape: the achieved rate
    interpolated in log size between the grid's shapes (multilinear in log m, log n, log k of log rate),
    clamped at its edges (a shape beyond the largest runs at the largest's rate; below the smallest, at
    the smallest's). A batched product runs each member at its (m, n, k) rate."""

    def __init__(self, shapes: list, what: str):
        redo = "re-measure with `minigpt bench hardware --sweep --out FILE`"
        if not all(_is_row(row) for row in shapes):
            raise UserError(f"{what}: gemm_sweep.shapes must be [m, n, k, TFLOP/s] rows of numbers; {redo}")
        try:
            rates = {(int(m), int(n), int(k)): float(t) * 1e12 for m, n, k, t in shapes}
        except OverflowError:
            raise UserError(f"{what}: a gemm_sweep size is not finite; {redo}") from None
        self.axes = [sorted({key[i] for key in rates}) for i in range(3)]
        positive = all(math.isfinite(v) and v > 0 and min(key) > 0 for key, v in rates.items())
        if len(rates) != len(shapes) or len(rates) != math.prod(len(a) for a in self.axes) or not positive:
            raise UserError(f"{what}: gemm_sweep must time every (m, n, k) of a grid once, each positive; {redo}")
        self.rates = rates

    def flops_per_s(self, m: int, n: int, k: int) -> float:
        corners = []
        for axis, x in zip(self.axes, (m, n, k)):
            x = min(max(x, axis[0]), axis[-1])
            i = min(max(bisect_right(axis, x) - 1, 0), max(len(axis) - 2, 0))
            lo, hi = axis[i], axis[min(i + 1, len(axis) - 1)]
            w = 0.0 if hi == lo else (math.log(x) - math.log(lo)) / (math.log(hi) - math.log(lo))
            corners.append(((lo, 1 - w), (hi, w)))
        log_rate = sum(wa * wb * wc * math.log(self.rates[(a, b, c)])
                       for (a, wa), (b, wb), (c, wc) in itertools.product(*corners))
        return math.exp(log_rate)

    def __call__(self, m: int, n: int, k: int, batch: int = 1) -> float:
        return 2.0 * m * n * k * batch / self.flops_per_s(m, n, k)


def measured_on(hw: dict) -> str | None:
    """The table GPU a `bench hardware` file was measured on (its datasheet entry), or None."""
    sheet = hw.get("datasheet") if isinstance(hw, dict) else None
    return sheet.get("name") if isinstance(sheet, dict) else None


# A GEMM sweep measured on one of a pair stands for the other's GEMMs: the same GH100 die, 132 SMs, clocks and
# 700 W limit (the cited rates already use the H200's sustained matmul rate for the H100). Not for its memory
# (H200 HBM3e 4.8 TB/s, H100 HBM3 3.35) nor its links: those stay the GPU's own.
SAME_COMPUTE = {("H200", "H100"), ("H100", "H200")}


def stands_for(hw: dict, gpu_name: str) -> str | None:
    """How a `bench hardware` file stands for `gpu_name`: "all" (measured on it), "gemms" (measured on a GPU
    of the same compute: its GEMM curve only), or None."""
    on = measured_on(hw)
    if on == gpu_name:
        return "all"
    return "gemms" if (on, gpu_name) in SAME_COMPUTE and isinstance(hw.get("gemm_sweep"), dict) else None


def hardware_gpu(hw: dict, what: str, gpu_name: str, dtype: str) -> None:
    """Refuse a sweep measured on another device (other than a same-compute twin's GEMMs) or in another dtype
    than the one it would stand for (fp16 and bf16 share their tensor-core rate on A100 and Hopper)."""
    if stands_for(hw, gpu_name) is None:
        raise UserError(f"{what} was measured on {hw.get('device_name', 'an unknown device')!s:.60} "
                        f"({measured_on(hw) or 'no GPU in the table'!s:.40}), not {gpu_name}: measure on a {gpu_name} "
                        f"(`minigpt bench hardware --sweep --out FILE`) or drop --hardware")
    if not isinstance(hw.get("gemm_sweep"), dict):
        return  # links only: any dtype
    swept = hw["gemm_sweep"].get("dtype")
    half = {"bf16", "fp16"}
    if swept != dtype and not (swept in half and dtype in half):
        raise UserError(f"{what} sweeps {swept!s:.20} GEMMs, not {dtype}: re-measure in {dtype} or change --dtype")


def measured_rates(hw: dict, base: Rates, what: str, gemms_only: bool = False) -> Rates:
    """`base` (a GPU's cited rates) with what `minigpt bench hardware` measured on that device: the GEMM
    curve of `--sweep` (every GEMM timed from it) with the copy bandwidth as the HBM rate, and the
    all-reduce bus bandwidth of `--collectives` (its largest buffer) as the NVLink rate when its ranks
    shared one node. What was not measured stays cited. gemms_only (a sweep of a same-compute twin,
    `stands_for`): the GEMM curve alone."""
    sweep = hw.get("gemm_sweep") if isinstance(hw, dict) else None
    coll = hw.get("collectives") if isinstance(hw, dict) and not gemms_only else None
    if not sweep and not coll:
        raise UserError(f"{what} has no GEMM sweep or collective sweep: measure with `minigpt bench hardware --sweep "
                        f"--out FILE` (or `--collectives` under torchrun) on the GPU")
    rates = _measured_gemms(hw, sweep, base, what, gemms_only) if sweep else base
    passes = hw.get("pass_sweep") if not gemms_only else None
    rates = _measured_passes(passes, rates, what, hw.get("device_name", "?")) if passes else rates
    attention = hw.get("attention_sweep") if not gemms_only else None
    rates = _measured_attention(attention, rates, what, hw.get("device_name", "?")) if attention else rates
    return _measured_links(coll, rates, what) if coll else rates


class PassTable:
    """Seconds of a norm or activation pass (forward + backward) from a pass sweep: the measured shape of the same
    kind and type nearest in log width, scaled by the elements (a memory-bound pass takes time in proportion to
    them); 0 for a type the sweep did not time (then the pass counts by its bytes alone)."""

    def __init__(self, rows: list, what: str):
        self.table: dict[tuple[str, str], list[tuple[int, int, float]]] = {}
        for row in rows:
            try:
                kind, name, n, width, seconds = row
                n, width, seconds = int(n), int(width), float(seconds)
            except (TypeError, ValueError):
                raise UserError(f"{what}: pass_sweep rows must be [kind, type, rows, width, seconds]; re-measure with "
                                f"`minigpt bench hardware --sweep --out FILE`") from None
            if not (n > 0 and width > 0 and math.isfinite(seconds) and seconds > 0):
                raise UserError(f"{what}: pass_sweep row {row!r:.60} is not positive; re-measure")
            self.table.setdefault((str(kind), str(name)), []).append((n, width, seconds))

    def __call__(self, kind: str, rows: int, width: int, name: str) -> float:
        shapes = self.table.get((kind, name))
        if not shapes:
            return 0.0
        near = min(shapes, key=lambda r: (abs(math.log(r[1] / width)), abs(math.log(r[0] * r[1] / (rows * width)))))
        return near[2] * rows * width / (near[0] * near[1])


class AttentionTable:
    """(forward, backward) FLOP/s of the flash kernel from an attention sweep: the measured shape of the same head
    dim nearest in log sequence length (or the nearest head dim where that one was not swept)."""

    def __init__(self, rows: list, what: str):
        try:
            self.rows = [(int(s), int(d), float(f) * 1e12, float(b) * 1e12) for s, d, f, b in rows]
        except (TypeError, ValueError):
            raise UserError(f"{what}: attention_sweep rows must be [seq, head_dim, forward TFLOP/s, backward TFLOP/s]; "
                            f"re-measure with `minigpt bench hardware --sweep --out FILE`") from None
        if not self.rows or not all(s > 0 and d > 0 and math.isfinite(f) and f > 0 and math.isfinite(b) and b > 0
                                    for s, d, f, b in self.rows):
            raise UserError(f"{what}: attention_sweep needs positive rows; re-measure")

    def __call__(self, seq: int, head_dim: int) -> tuple[float, float]:
        near = min(self.rows, key=lambda r: (abs(math.log(r[1] / head_dim)), abs(math.log(r[0] / seq))))
        return near[2], near[3]


def _measured_attention(sweep, base: Rates, what: str, device: str) -> Rates:
    rows = sweep.get("shapes") if isinstance(sweep, dict) else None
    if not isinstance(rows, list):
        raise UserError(f"{what}: attention_sweep has no shapes; re-measure with `minigpt bench hardware --sweep --out FILE`")
    table = AttentionTable(rows, what)
    fwd, bwd = (sorted(r[i] / 1e12 for r in table.rows) for i in (2, 3))
    return dataclasses.replace(base, attention_time=table, sources={
        **base.sources, "attention": f"measured: causal SDPA on {device!s:.60} ({what}), forward {fwd[0]:.4g}-{fwd[-1]:.4g}, "
                                     f"backward {bwd[0]:.4g}-{bwd[-1]:.4g} TFLOP/s over {len(rows)} shapes, nearest shape"})


def _measured_passes(sweep, base: Rates, what: str, device: str) -> Rates:
    if not isinstance(sweep, dict) or not isinstance(sweep.get("passes"), list) or not sweep["passes"]:
        raise UserError(f"{what}: pass_sweep has no passes; re-measure with `minigpt bench hardware --sweep --out FILE`")
    table = PassTable(sweep["passes"], what)
    kinds = ", ".join(sorted(f"{k} {n}" for k, n in table.table))
    return dataclasses.replace(base, pass_time=table, sources={
        **base.sources, "passes": f"measured: {kinds} forward + backward on {device!s:.60} ({what}), where slower than "
                                  f"their bytes over the copy rate"})


def _measured_gemms(hw: dict, sweep, base: Rates, what: str, gemms_only: bool = False) -> Rates:
    if not isinstance(sweep, dict) or not isinstance(sweep.get("shapes"), list) or not sweep["shapes"]:
        raise UserError(f"{what}: gemm_sweep has no shapes; re-measure with `minigpt bench hardware --sweep --out FILE`")
    table = GemmTable(sweep["shapes"], what)
    copy = hw.get("copy_bandwidth_gbs")
    if copy is not None and not (_is_number(copy) and math.isfinite(copy) and copy > 0):
        raise UserError(f"{what}: copy_bandwidth_gbs = {copy!r:.30} is not a positive number of GB/s; re-measure with "
                        f"`minigpt bench hardware --sweep --out FILE`")
    hbm = float(copy) * 1e9 if copy is not None and not gemms_only else base.hbm_bytes_per_s
    top = max(table.rates.values())
    device = hw.get("device_name", "?")
    twin = f", standing for the {base.name}'s GEMMs (the same die and power limit)" if gemms_only else ""
    return dataclasses.replace(base, matmul_flops=top, hbm_bytes_per_s=hbm, gemm_time=table, sources={
        **base.sources,
        "matmul": (f"measured: {len(table.rates)} GEMM shapes on {device!s:.60} ({sweep.get('dtype', '?')!s:.10}, {what}), "
                   f"{min(table.rates.values()) / 1e12:.4g}-{top / 1e12:.4g} TFLOP/s, interpolated in log size{twin}"),
        "hbm": (f"measured: copy {copy} GB/s on {device!s:.60} ({what})" if hbm != base.hbm_bytes_per_s else base.sources["hbm"])})


def _measured_links(coll, base: Rates, what: str) -> Rates:
    try:
        n = int(coll["world_size"])
        largest = max((r for r in coll["results"] if r["op"] == "all_reduce"), key=lambda r: float(r["bytes"]))
        busbw = float(largest["busbw_gbs"])
    except (KeyError, TypeError, ValueError, AttributeError):
        raise UserError(f"{what}: collectives must hold world_size and all_reduce results with bytes and busbw_gbs; "
                        f"re-measure with `minigpt bench hardware --collectives` under torchrun") from None
    if not (math.isfinite(busbw) and busbw > 0) or n < 2:
        raise UserError(f"{what}: the all-reduce bus bandwidth must be positive over 2 ranks or more; re-measure")
    if n > GPUS_PER_NODE:
        return base  # ranks over several nodes: the NVLink rate is not what it measured
    return dataclasses.replace(base, nvlink_bytes_per_s=busbw * 1e9, sources={
        **base.sources, "links": (f"measured: all-reduce bus bandwidth {busbw:g} GB/s at {float(largest['bytes']) / 2**20:g} "
                                  f"MiB over {n} ranks in one node ({what}); inter-node: {base.sources['links']}")})
