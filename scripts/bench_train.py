"""Time training steps of a config on this machine; print one JSON line.

    python scripts/bench_train.py --config tiny [--steps 20] [--warmup 5] [--baseline]

Times full optimizer steps (forward, backward, clip, AdamW) of minigpt's GPT on random tokens
(data loading excluded) and reports the median. With --baseline it also times the obvious
PyTorch GPT of the same shape (nanoGPT-style: fused QKV, hand-written masked softmax attention,
GELU MLP, tied head), the bar not to fall below.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from minigpt.bench import device_name
from minigpt.config import load_config
from minigpt.distributed import resolve_device
from minigpt.flops import param_counts, train_flops_per_token
from minigpt.hardware import choose_peak
from minigpt.model import GPT
from minigpt.optim import autocast_context, make_optimizer
from minigpt.train import resolve_preset


class BaselineGPT(nn.Module):
    """The straightforward implementation: explicit attention matrix, no SDPA."""

    def __init__(self, c):
        super().__init__()
        self.c = c
        self.wte = nn.Embedding(c.padded_vocab_size, c.n_embd)
        self.wpe = nn.Embedding(c.block_size, c.n_embd)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(dict(
                ln1=nn.LayerNorm(c.n_embd), qkv=nn.Linear(c.n_embd, 3 * c.n_embd), proj=nn.Linear(c.n_embd, c.n_embd),
                ln2=nn.LayerNorm(c.n_embd), fc=nn.Linear(c.n_embd, 4 * c.n_embd), out=nn.Linear(4 * c.n_embd, c.n_embd),
            )) for _ in range(c.n_layer)
        )
        self.ln_f = nn.LayerNorm(c.n_embd)
        self.head = nn.Linear(c.n_embd, c.padded_vocab_size, bias=False)
        self.head.weight = self.wte.weight
        self.register_buffer("mask", torch.tril(torch.ones(c.block_size, c.block_size, dtype=torch.bool)))

    def forward(self, idx, targets):
        B, T = idx.shape
        H = self.c.n_head
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for b in self.blocks:
            q, k, v = b["qkv"](b["ln1"](x)).split(self.c.n_embd, dim=2)
            q, k, v = (t.view(B, T, H, -1).transpose(1, 2) for t in (q, k, v))
            att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))
            att = att.masked_fill(~self.mask[:T, :T], float("-inf")).softmax(dim=-1)
            y = (att @ v).transpose(1, 2).contiguous().view(B, T, -1)
            x = x + b["proj"](y)
            x = x + b["out"](F.gelu(b["fc"](b["ln2"](x))))
        logits = self.head(self.ln_f(x))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def time_steps(model, cfg, device, steps: int, warmup: int) -> list[float]:
    tc = cfg.train
    opt = make_optimizer(model, tc)
    g = torch.Generator().manual_seed(0)
    shape = (tc.micro_batch_size, cfg.model.block_size)
    x = torch.randint(0, cfg.model.vocab_size, shape, generator=g).to(device)
    y = torch.randint(0, cfg.model.vocab_size, shape, generator=g).to(device)
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast_context(device, tc.precision):
            _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="tiny")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--baseline", action="store_true", help="also time the obvious implementation")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="peak for MFU (default: datasheet of a known GPU)")
    p.add_argument("--peak-from", default="", help="a 'minigpt bench hardware --out' file to use as the peak")
    args = p.parse_args()
    cfg = load_config(resolve_preset(args.config), args.set)
    device = resolve_device(cfg.train.device)
    torch.manual_seed(0)
    tokens = cfg.train.micro_batch_size * cfg.model.block_size
    flops_tok = train_flops_per_token(cfg.model, cfg.model.block_size, "exact")
    result = {
        "bench": "train_step",
        "config": args.config,
        "overrides": args.set,
        "device": str(device),
        "device_name": device_name(device),
        "cpu_cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "precision": cfg.train.precision,
        "params": param_counts(cfg.model).total,
        "tokens_per_step": tokens,
        "model_flops_per_token": flops_tok,
        "flops_convention": "exact matmul count, full attention square, 3x forward (minigpt.flops 'exact')",
        "timed_steps": args.steps,
    }
    ms = statistics.median(time_steps(GPT(cfg.model).to(device), cfg, device, args.steps, args.warmup)) * 1e3
    result.update(ms_per_step=round(ms, 2), tokens_per_s=round(tokens / ms * 1e3, 1),
                  achieved_tflops=round(flops_tok * tokens / ms * 1e3 / 1e12, 4))
    peak = choose_peak(result["device_name"], cfg.train.precision, args.peak_tflops, args.peak_from)
    result.update(peak_tflops=peak.tflops, peak_source=peak.source,
                  mfu=round(result["achieved_tflops"] / peak.tflops, 4) if peak.known else None)
    if args.baseline:
        c = cfg.model
        if (c.mlp, c.norm, c.pos_emb, c.n_kv_head) != ("gelu", "layernorm", "learned", c.n_head):
            raise SystemExit("--baseline needs a GPT-2-shaped config (gelu, layernorm, learned positions, no GQA)")
        torch.manual_seed(0)
        base = statistics.median(time_steps(BaselineGPT(c).to(device), cfg, device, args.steps, args.warmup)) * 1e3
        result.update(baseline_ms_per_step=round(base, 2), speedup_vs_baseline=round(base / ms, 3))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
