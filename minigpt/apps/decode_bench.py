"""`minigpt bench decode`: decode tokens/s (total and per sequence) against batch and context, beside the
bandwidth and compute rooflines of this device (measured here), written as JSON and a PNG."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from minigpt.analytic.memory import inference_bytes, model_bytes
from minigpt.core.atomic import atomic_write_text
from minigpt.core.device import check_fits, device_name
from minigpt.core.errors import UserError
from minigpt.core.plots import plot_decode_curve
from minigpt.measure.bench import bench_hardware, decode_curve
from minigpt.nn.optim import DTYPES

CONVENTION = ("bandwidth bound: weights + the batch's KV cache at the mean context read once per decode step / "
              "measured copy bandwidth; compute bound: decode FLOPs (2 N_mm + attention) / measured matmul peak; "
              "measured: best of 2 runs after a warm-up, greedy, static KV cache")


def decode_bench(model, name: str, device: torch.device, dtype: str, batches: list[int], contexts: list[int] | None,
                 new_tokens: int, compile: bool, out: str) -> dict:
    """Measure the curve, write `out` (JSON) and the PNG beside it; returns the result."""
    model.to(DTYPES[dtype])
    c = model.config
    contexts = contexts or sorted({16, c.block_size // 2})
    if max(contexts) + new_tokens > c.block_size and c.pos_emb != "rope":
        raise UserError(f"context {max(contexts)} + --new-tokens {new_tokens} exceeds block_size {c.block_size}: "
                        f"lower them")
    check_fits(inference_bytes(c, max(batches), max(contexts) + new_tokens) - model_bytes(c), device,
               f"KV caches for batch {max(batches)} x {max(contexts) + new_tokens} tokens", "lower --batch or --context")
    hw = bench_hardware(str(device), dtypes=[dtype])
    rows = decode_curve(model, batches, contexts, new_tokens, hw["copy_bandwidth_gbs"], hw["matmul_tflops"][dtype],
                        compile)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    result = {"bench": "decode_curve", "model": name, "params": sum(p.numel() for p in model.parameters()),
              "device": str(device), "device_name": device_name(device), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "dtype": dtype, "copy_bandwidth_gbs": hw["copy_bandwidth_gbs"],
              "matmul_tflops": hw["matmul_tflops"][dtype], "rows": rows, "convention": CONVENTION}
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    plot_decode_curve(rows, str(path.with_suffix(".png")),
                      f"decode speed of {name} ({result['params']:,} parameters, {dtype}) on {result['device_name']}, "
                      f"{torch.get_num_threads()} thread(s)")
    return result
