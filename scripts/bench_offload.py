"""How large a model trains here with no offload, CPU offload and NVMe offload (DeepSpeed ZeRO-3, one rank, fp32):
each setting at each width is a real `minigpt train` process; its peak resident memory, median step time and the
bytes it wrote are measured, and beside them the bytes ZeRO-Infinity's model says a step moves to the swap
(Rajbhandari et al. 2021, Sec. 4: with the optimizer state on NVMe, the fp32 gradients written and read and the
fp32 master, momentum and variance read and written each step; with the parameters there too, each read in the
forward and the backward and written back after the step) and the I/O time it predicts at the disk's measured
write rate. The largest model each setting holds in this machine's memory is extrapolated from the measured bytes per
parameter (a line through the widths timed) and said as such.

    python scripts/bench_offload.py [--widths 512,1024,1536] [--layers 4] [--steps 3] [--out FILE]

Prints one JSON line (rows + the fit); --out also writes it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from minigpt.core.progress import note

MODES = {"none": "zero=3,backend=deepspeed", "cpu": "zero=3,backend=deepspeed,offload=all",
         "nvme": "zero=3,backend=deepspeed,offload=optimizer,offload_to=nvme",
         "nvme_all": "zero=3,backend=deepspeed,offload=all,offload_to=nvme"}
# bytes a step writes to the swap per parameter: its fp32 gradient, fp32 master + m + v; with the parameters on
# NVMe too, their fp32 copy written back after the step (4)
WRITTEN_PER_PARAM = {"nvme": 4 + 12, "nvme_all": 4 + 12 + 4}
# and reads back: the gradient and the optimizer's three; with the parameters on NVMe, each read in the forward and
# again in the backward (2 x 4)
READ_PER_PARAM = {"nvme": 4 + 12, "nvme_all": 4 + 12 + 8}
FIRST_SWAP_OUT = {"nvme": 12, "nvme_all": 12 + 4}  # written once when the run starts: the optimizer's state (+ weights)


def disk_write_gbs(folder: Path, size: int = 512 << 20) -> float:
    """GB/s of one large write made durable (fsync) in `folder`: the swap disk's rate."""
    path = folder / "probe.bin"
    block = os.urandom(1 << 20)
    start = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(size >> 20):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    path.unlink()
    return size / seconds / 1e9


# each run under a fresh parent of its own, so that its children's peak is this run's alone
WRAP = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); u = resource.getrusage("
        "resource.RUSAGE_CHILDREN); sys.stderr.write(f'\\nrusage {u.ru_maxrss} {u.ru_oublock} {u.ru_inblock}\\n'); "
        "sys.exit(r.returncode)")


def one_run(mode: str, width: int, layers: int, steps: int, root: Path) -> dict:
    """One `minigpt train` process (one rank, no torchrun): peak RSS, bytes written, median step."""
    out = root / f"{mode}-{width}-{steps}"
    sets = {"model.n_layer": layers, "model.n_embd": width, "model.n_head": max(1, width // 64), "model.block_size": 128,
            "train.max_steps": steps, "train.micro_batch_size": 1, "train.batch_size_tokens": 0, "train.log_every": 1,
            "train.eval_every": 0, "train.eval_iters": 1, "train.sample_every": 0, "train.checkpoint_every": 0,
            "train.report": "false", "train.precision": '"fp32"', "train.out_dir": f'"{out}"'}
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29600 + width % 97), "OMP_NUM_THREADS": "2"}
    cmd = [sys.executable, "-c", WRAP, sys.executable, "-m", "minigpt", "train", "--config", "tiny", "--plan", MODES[mode],
           *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    shutil.rmtree(out / "nvme-swap", ignore_errors=True)  # a failed run's swap (a finished run deletes its own)
    if r.returncode:
        return {"mode": mode, "width": width, "error": [line for line in r.stderr.splitlines() if line.strip()][-2][:300]}
    maxrss_kib, out_blocks, in_blocks = (int(x) for x in r.stderr.strip().splitlines()[-1].split()[1:])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"kind": "step"' in line]
    final = json.loads([line for line in r.stdout.splitlines() if '"event": "final"' in line][-1])
    files = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())  # the swap is deleted above
    return {"mode": mode, "width": width, "layers": layers, "params": final["params"],
            "peak_rss_bytes": maxrss_kib * 1024, "step_rss_bytes": max(rec["memory_gib"] for rec in records) * 2**30,
            "written_bytes": out_blocks * 512, "read_bytes": in_blocks * 512, "run_files_bytes": files,
            "swap_written_bytes": out_blocks * 512 - files if mode.startswith("nvme") else 0,
            "median_step_s": statistics.median(rec["ms_per_step"] for rec in records[1:] or records) / 1e3,
            "losses": [rec["loss"] for rec in records]}


def predicted_io(mode: str, params: int, steps: int, disk_gbs: float) -> dict:
    """ZeRO-Infinity's swap traffic for `mode` (0 without NVMe): bytes a step, the whole run's writes (the first
    swap-out included) and the seconds a step's writes take at the disk's measured rate."""
    step = WRITTEN_PER_PARAM.get(mode, 0) * params
    return {"predicted_written_bytes_per_step": step,
            "predicted_written_bytes_run": step * steps + FIRST_SWAP_OUT.get(mode, 0) * params,
            "predicted_read_bytes_per_step": READ_PER_PARAM.get(mode, 0) * params,
            "predicted_io_s_per_step": step / (disk_gbs * 1e9)}


def per_step_io(row: dict, one_step: dict, steps: int) -> dict:
    """Bytes a step reads and writes, measured: the run's less a one-step run's of the same model, over the steps
    between (what starting, the final evaluation and the checkpoint move cancels)."""
    if "error" in one_step:
        return {"one_step_error": one_step["error"]}
    return {f"measured_{k}_per_step": (row[k] - one_step[k]) / (steps - 1) for k in ("read_bytes", "written_bytes")}


def fit(rows: list[dict], memory: float) -> dict:
    """Per mode: bytes per parameter (the slope of the peak through its widths) and the largest model that fits
    `memory`."""
    out = {}
    for mode in MODES:
        pts = [(r["params"], r["peak_rss_bytes"]) for r in rows if r["mode"] == mode and "error" not in r]
        if len(pts) < 2:
            continue
        (p0, m0), (p1, m1) = pts[0], pts[-1]
        slope = (m1 - m0) / (p1 - p0)
        base = m0 - slope * p0
        out[mode] = {"bytes_per_param": slope, "base_bytes": base,
                     "largest_params": (0.9 * memory - base) / slope if slope > 0 else None}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default="512,1024,1536")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--out")
    args = ap.parse_args()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    rows = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("MINIGPT_OFFLOAD_DIR")) as tmp:
        root = Path(tmp)
        disk = disk_write_gbs(root)
        for width in (int(w) for w in args.widths.split(",")):
            for mode in args.modes.split(","):
                note(f"offload bench: {mode} at width {width} x {args.layers} layers")
                row = one_run(mode, width, args.layers, args.steps, root)
                if "params" in row:
                    row.update(predicted_io(mode, row["params"], args.steps, disk))
                if "params" in row and mode.startswith("nvme") and args.steps > 1:
                    row.update(per_step_io(row, one_run(mode, width, args.layers, 1, root), args.steps))
                rows.append(row)
    result = {"bench": "offload", "machine": {"memory_bytes": memory, "cpus": os.cpu_count(), "disk_write_gbs": disk,
                                              "load_1min": os.getloadavg()[0]},
              "rows": rows, "fit": fit(rows, memory),
              "convention": ("measured: peak RSS of the training process (ru_maxrss: building the model and the final "
                             "checkpoint included), the largest RSS when a step was logged (step_rss_bytes: between "
                             "steps; a step's transient peak is higher), bytes it wrote (ru_oublock x 512: page-cache "
                             "writes included) and read from the disk (ru_inblock x 512: "
                             "reads the page cache served not counted), the swap's writes (written less the run "
                             "folder's files), bytes a step reads and writes (NVMe: the run's less a one-step run's, over "
                             "the steps between), median step after the first; predicted: ZeRO-Infinity's movement, bytes "
                             f"written per parameter a step {WRITTEN_PER_PARAM} and read {READ_PER_PARAM} by mode, plus "
                             f"{FIRST_SWAP_OUT} once, at the measured disk write rate; largest_params: extrapolated from "
                             "the first and last widths' bytes per parameter to 90% of memory (not trained)")}
    line = json.dumps(result)
    if args.out:
        Path(args.out).write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
