"""Accelerator datasheet figures and peak selection (torch-free).

Dense peaks (NVIDIA's headline Hopper/Blackwell tensor figures are 2:4-sparse, twice these), HBM
capacity and bandwidth, NVLink bandwidth per GPU: NVIDIA's V100, A100, H100, H200 and B200 datasheets.
NVLink is kept per direction: the datasheets' 300 / 600 / 900 / 1,800 GB/s count both directions, and a
ring collective's bandwidth term runs at what one GPU sends one way (its neighbour sends back at the same
time), the unit the inter-node NIC figures below are in.
Inter-node bandwidth per GPU is an assumption taken from each GPU's 8-GPU DGX system datasheet
(one NIC per GPU): DGX-1 V100 4 x 100 Gb/s EDR for 8 GPUs = 6.25 GB/s; DGX A100 200 Gb/s HDR = 25 GB/s;
DGX H100/H200/B200 400 Gb/s NDR = 50 GB/s. The fabric is rail-optimized (DGX SuperPOD: GPU i of every
node on NIC i's switch) and NCCL spreads a ring's channels over the group's NICs, so a collective whose
group has g ranks in each node leaves the node on g NICs at once (`collective_link_gbs`).
A device that matches no entry has no datasheet peak: MFU is then reported as unknown unless
the user gives a peak (`peak_tflops`) or a measured one (`minigpt bench hardware`).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from minigpt.core.config import read_json
from minigpt.core.errors import UserError

GPUS_PER_NODE = 8  # the DGX/HGX building block the layout and the links assume


@dataclass(frozen=True)
class GPUSpec:
    name: str
    match: str  # regex on the device name torch reports
    tflops: dict = field(default_factory=dict)  # dense TFLOP/s by dtype: bf16, fp16, tf32, fp32, fp8
    memory_gb: float = 0.0
    bandwidth_tbs: float = 0.0  # HBM, TB/s
    nvlink_gbs: float = 0.0  # per GPU and direction, GB/s (half the datasheet's bidirectional total)
    internode_gbs: float = 0.0  # per GPU, GB/s, between nodes: the NICs of the vendor's 8-GPU system
    price_usd_per_hour: float = 0.0  # assumption for extrapolation: an on-demand cloud rate, overridable


GPUS: dict[str, GPUSpec] = {
    g.name: g
    for g in (
        GPUSpec("V100", r"V100", {"fp16": 125, "fp32": 15.7}, 32, 0.90, 150, 6.25, 2.0),
        GPUSpec("A100-40GB", r"A100.*40", {"bf16": 312, "fp16": 312, "tf32": 156, "fp32": 19.5}, 40, 1.555, 300, 25, 1.0),
        GPUSpec("A100-80GB", r"A100", {"bf16": 312, "fp16": 312, "tf32": 156, "fp32": 19.5}, 80, 2.039, 300, 25, 1.5),
        GPUSpec("H100", r"H100", {"bf16": 989, "fp16": 989, "tf32": 495, "fp32": 67, "fp8": 1979}, 80, 3.35, 450, 50, 2.0),
        GPUSpec("H200", r"H200", {"bf16": 989, "fp16": 989, "tf32": 495, "fp32": 67, "fp8": 1979}, 141, 4.8, 450, 50, 3.0),
        GPUSpec("B200", r"B200", {"bf16": 2250, "fp16": 2250, "tf32": 1100, "fp32": 80, "fp8": 4500}, 192, 8.0, 900, 50, 5.0),
    )
}
GPU_ALIASES = {"A100": "A100-80GB", "A100-40": "A100-40GB", "A100-80": "A100-80GB"}


def group_ranks_per_node(tp: int, dp: int) -> int:
    """Ranks of one data-parallel group in a node under Megatron's rank order (tensor innermost, then data)."""
    return min(dp, max(1, GPUS_PER_NODE // tp))


def ring_link_rate(nvlink: float, internode: float, ranks: int, per_node: int) -> float:
    """The rule of `collective_link_gbs` on any pair of link rates (datasheet or achievable)."""
    return nvlink if ranks <= per_node else min(nvlink, per_node * internode)


def collective_link_gbs(gpu: GPUSpec, ranks: int, per_node: int) -> tuple[float, str]:
    """One-way GB/s at which each rank of a ring collective over `ranks` ranks, `per_node` of them in each
    node, sends its ring bytes, and the link in words. Within one node: NVLink. Across nodes a node's
    share leaves on its per_node NICs at once; NVLink still carries every rank's bytes, so it caps the rate."""
    rate = ring_link_rate(gpu.nvlink_gbs, gpu.internode_gbs, ranks, per_node)
    if ranks <= per_node:
        return rate, f"{gpu.name} NVLink {gpu.nvlink_gbs:g} GB/s per GPU per direction (the group fits in one node)"
    return rate, (f"inter-node {rate:g} GB/s per rank: {per_node} of the group's GPUs per node, each on its own "
                  f"{gpu.internode_gbs:g} GB/s NIC (assumption: the {gpu.name} DGX system, rail-optimized)"
                  + (", capped by NVLink" if rate < per_node * gpu.internode_gbs else ""))


def gpu_by_name(name: str) -> GPUSpec:
    """A table entry by its name (case-insensitive), e.g. 'A100', 'h100'."""
    key = {k.lower(): k for k in GPUS}.get(name.lower()) or GPU_ALIASES.get(name.upper())
    if key is None:
        raise UserError(f"unknown GPU {name!r}; known: {', '.join(GPUS)}")
    return GPUS[key]


def match_device(device_name: str) -> GPUSpec | None:
    """The table entry for a device name as torch reports it ('NVIDIA H100 80GB HBM3'), or None."""
    for spec in GPUS.values():
        if re.search(spec.match, device_name, re.IGNORECASE):
            return spec
    return None


@dataclass(frozen=True)
class Peak:
    tflops: float | None  # None: unknown, so no MFU
    source: str  # how it was chosen, printed beside every MFU

    @property
    def known(self) -> bool:
        return self.tflops is not None and self.tflops > 0


def choose_peak(device_name: str, dtype: str, given_tflops: float = 0.0, bench_file: str = "",
                threads: int | None = None) -> Peak:
    """The peak MFU divides by: given > measured (bench file) > datasheet > unknown.

    dtype is the matmul dtype: "bf16", "fp16", or "fp32" (fp32 uses the plain FP32 peak, not TF32).
    A bench file must describe this machine as it is now (see check_bench_fresh).
    """
    if given_tflops and given_tflops > 0:
        return Peak(given_tflops, f"given {given_tflops:g} TFLOP/s {dtype}")
    if bench_file:
        data = read_bench(bench_file)
        measured = bench_peak(data, bench_file, dtype)
        age_h = check_bench_fresh(data, bench_file, device_name, threads)
        return Peak(measured, f"measured {dtype} matmul peak from {bench_file} ({age_h:.1f} h old)")
    spec = match_device(device_name)
    if spec is None or dtype not in spec.tflops:
        return Peak(None, f"unknown peak for {device_name} {dtype}")
    return Peak(spec.tflops[dtype], f"{spec.name} datasheet dense {dtype}")


def read_bench(path: str) -> dict:
    """A `minigpt bench hardware --out` result."""
    try:
        return read_json(Path(path), "hardware benchmark")
    except UserError as e:
        raise UserError(f"{e}; write one with 'minigpt bench hardware --out {path}'") from None


def bench_peak(data: dict, path: str, dtype: str) -> float:
    value = data.get("matmul_tflops", {}).get(dtype)
    if not value:
        raise UserError(f"{path} has no measured {dtype} matmul peak; it has {list(data.get('matmul_tflops', {}))}")
    return float(value)


MAX_BENCH_AGE_H = 24.0  # a CPU's achievable peak moves with load, clocks and threads: re-measure daily


def check_bench_fresh(data: dict, path: str, device_name: str, threads: int | None = None, now: float | None = None) -> float:
    """Refuse a stored peak (`data`, read from `path`) measured on another device, with another
    thread count, or more than MAX_BENCH_AGE_H hours ago (its `measured_at`, else the file's time);
    returns its age in hours. A stale CPU peak once made a run print "fp32 MFU 259.4%"."""
    fix = f"re-measure with 'minigpt bench hardware --out {path}' (or unset train.peak_from)"
    if data.get("device_name") and data["device_name"] != device_name:
        raise UserError(f"{path} measured {data['device_name']}, this run is on {device_name}: {fix}")
    if threads and data.get("threads") and data["threads"] != threads and data.get("device") == "cpu":
        raise UserError(f"{path} measured the CPU with {data['threads']} threads, this run uses {threads}: {fix}")
    measured_at = data.get("measured_at") or Path(path).stat().st_mtime
    age_h = ((now if now is not None else time.time()) - measured_at) / 3600
    if age_h > MAX_BENCH_AGE_H:
        raise UserError(f"{path} is {age_h:.0f} h old (more than {MAX_BENCH_AGE_H:g} h): {fix}")
    return age_h


def mfu_warning(mfu: float | None, peak_source: str) -> str | None:
    """A line to print when an MFU is over 100%: the peak cannot be this device's real one."""
    if mfu is None or mfu <= 1.0:
        return None
    return (f"warning: MFU {mfu:.1%} is over 100%: the peak ({peak_source}) is below what this run achieved, so it "
            f"is not this device's peak (a CPU benchmark taken under load, or another machine's); measure it again "
            f"on an idle machine with 'minigpt bench hardware --out hw.json' and set train.peak_from=hw.json")
