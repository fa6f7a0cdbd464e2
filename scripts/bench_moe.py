"""The experts as grouped matrix multiplies against the loop over experts, side by side in one process: one MoE
layer's forward and backward, median of --repeats, one JSON line (appended to --out).

    python scripts/bench_moe.py [--n-embd 256 --n-expert 8 --k 2 --tokens 4096] [--device cpu|cuda]

fp32 on the CPU; bf16 autocast on a GPU (torch's CUDA grouped GEMM takes bf16).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from minigpt.core.config import ModelConfig
from minigpt.core.device import busy_cores, device_name
from minigpt.nn.model import MoE


def timed(m: MoE, x: torch.Tensor, repeats: int) -> float:
    def once() -> float:
        m.zero_grad(set_to_none=True)
        t = time.perf_counter()
        with torch.autocast(x.device.type, torch.bfloat16, enabled=x.device.type == "cuda"):  # a GPU's grouped GEMM: bf16
            y, aux = m(x)
        (y.float().square().mean() + aux).backward()
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t
    once()  # warm
    return statistics.median(once() for _ in range(repeats))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--n-expert", type=int, default=8)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="benchmarks/bench_moe_cpu.jsonl")
    args = p.parse_args()
    device = torch.device(args.device)
    busy, how = busy_cores()
    times = {}
    for grouped in (True, False, True, False):  # interleaved: a change in the machine's load falls on both
        c = ModelConfig(n_layer=1, n_head=4, n_embd=args.n_embd, block_size=args.tokens, vocab_size=64,
                        n_expert=args.n_expert, n_expert_active=args.k, moe_grouped_mm=grouped)
        c.validate()
        torch.manual_seed(0)
        m = MoE(c).to(device).train()
        x = torch.randn(1, args.tokens, args.n_embd, device=device)
        times.setdefault("grouped_mm" if grouped else "loop", []).append(timed(m, x, args.repeats))
    ms = {k: round(min(v) * 1e3, 2) for k, v in times.items()}
    line = {"bench": "moe_experts", "device_name": device_name(device), "cpu_cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "busy_cores_before": busy, "load_source": how,
            "n_embd": args.n_embd, "n_expert": args.n_expert, "k": args.k, "tokens": args.tokens,
            "dtype": "bf16 autocast" if device.type == "cuda" else "float32",
            "forward_backward_ms": ms, "loop_over_grouped": round(ms["loop"] / ms["grouped_mm"], 3),
            "convention": "measured: one MoE layer's forward + backward, median of the repeats, the better of two "
                          "interleaved passes per method"}
    print(json.dumps(line))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
