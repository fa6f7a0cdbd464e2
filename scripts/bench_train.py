"""Time minigpt's training step against the obvious modern PyTorch GPT, side by side; one JSON line.

    python scripts/bench_train.py [--config tiny] [--steps 15] [--warmup 3] [--set k=v ...]

Four steps are timed in one process, interleaved round by round in a shuffled order (so machine
noise and cache state hit all alike):
  minigpt_compiled   the step exactly as `minigpt train` runs it: the model after
                     parallelize() with train.compile = true, the backend's
                     forward/backward and step (clipping, AdamW), one micro-batch per step
  minigpt_eager      the same with train.compile = false
  (`minigpt_default` says which of the two `minigpt train` picks for the config's max_steps, and why)
  baseline         a plain GPT of the same shape, written the obvious modern way: fused QKV,
                   F.scaled_dot_product_attention(is_causal=True), GELU MLP, tied head,
                   F.cross_entropy on the full logits, torch.optim.AdamW, clip_grad_norm_
  baseline_compiled  the baseline under torch.compile
Each timed step ends with loss.item() (the step is finished). Reported: the median ms per step of
each, speed-ups over the baseline (ratios of those medians), and the paired speed-up: the median over
rounds of baseline time / variant time within the same round (robust to the machine slowing down
or speeding up between rounds). Data loading is excluded for all: the same random tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from minigpt.analytic.flops import param_counts, train_flops_per_token
from minigpt.core.config import load_config, resolve_preset
from minigpt.core.device import configure_device, device_name, resolve_precision
from minigpt.core.errors import UserError
from minigpt.core.hardware import choose_peak
from minigpt.core.plan import ParallelPlan, batch_layout
from minigpt.core.progress import Progress, note
from minigpt.nn.model import GPT
from minigpt.nn.optim import autocast_context, lr_at
from minigpt.parallel.distributed import init_distributed
from minigpt.parallel.parallelize import parallelize
from minigpt.parallel.registry import backend_class, make_backend, resolve_plan


class BaselineGPT(nn.Module):
    """The straightforward modern implementation (nanoGPT with SDPA), same shapes as minigpt's."""

    def __init__(self, c):
        super().__init__()
        self.c = c
        h, b = c.n_embd, c.bias
        self.wte = nn.Embedding(c.padded_vocab_size, h)
        self.wpe = nn.Embedding(c.block_size, h)
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(
            ln1=nn.LayerNorm(h, bias=b), qkv=nn.Linear(h, 3 * h, bias=b), proj=nn.Linear(h, h, bias=b),
            ln2=nn.LayerNorm(h, bias=b), fc=nn.Linear(h, 4 * h, bias=b), out=nn.Linear(4 * h, h, bias=b),
        )) for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(h, bias=b)
        self.head = nn.Linear(h, c.padded_vocab_size, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, idx, targets):
        B, T = idx.shape
        H = self.c.n_head
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for b in self.blocks:
            q, k, v = b["qkv"](b["ln1"](x)).split(self.c.n_embd, dim=2)
            q, k, v = (t.view(B, T, H, -1).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).contiguous().view(B, T, -1)
            x = x + b["proj"](y)
            x = x + b["out"](F.gelu(b["fc"](b["ln2"](x)), approximate="tanh"))
        logits = self.head(self.ln_f(x))[..., : self.c.vocab_size]
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


def baseline_step(cfg, device, compiled: bool):
    """The baseline's step: under the same autocast as minigpt's (bf16 on a GPU), plain AdamW."""
    torch.manual_seed(0)
    model = BaselineGPT(cfg.model).to(device)
    net = torch.compile(model) if compiled else model
    tc = cfg.train
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=(tc.beta1, tc.beta2), weight_decay=tc.weight_decay)

    def step(x, y):
        with autocast_context(device, tc.precision):
            loss = net(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


def minigpt_step(path, overrides: list[str], env, layout, compiled: bool):
    """minigpt's step as `minigpt train` builds it, with train.compile set to `compiled`."""
    cfg = load_config(path, overrides + [f"train.compile={str(compiled).lower()}"])
    cfg.train.precision = resolve_precision(cfg.train.precision, env.device)
    torch.manual_seed(0)
    plan = resolve_plan(ParallelPlan.from_train(cfg.train, cfg.model, 1))
    backend = make_backend(parallelize(GPT(cfg.model), plan, cfg.train, env.device), cfg, env, plan)
    state = {"step": 0}

    def step(x, y):
        backend.set_lr(lr_at(state["step"], cfg.train))
        state["step"] += 1
        loss, _ = backend.step([(x, y)])
        return loss
    return step


def mfu_fields(flops: float, ms: dict, peaks: list) -> dict:
    """Each variant's MFU: its counted FLOPs per second over each peak (None where it is unknown)."""
    return {p.source: ({k: round(flops / v * 1e3 / (p.tflops * 1e12), 4) for k, v in ms.items()} if p.known else None)
            for p in peaks}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="tiny")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--steps", type=int, default=30, help="timed rounds (each times every variant once)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak-from", default="", help="a 'minigpt bench hardware --out' file: MFU against its measured peak too")
    args = p.parse_args()
    path = resolve_preset(args.config)
    cfg = load_config(path, args.set)
    env = init_distributed(cfg.train.device)
    precision = cfg.train.precision = resolve_precision(cfg.train.precision, env.device)
    if precision == "fp16":
        raise UserError("bench_train compares fp32 or bf16 steps (the baseline has no grad scaler); "
                        "use --set train.precision=bf16")
    configure_device(cfg.train, env.device)  # as minigpt train does: TF32 for fp32 on Ampere+, threads
    dev_name = device_name(env.device)  # MFU against the datasheet's dense peak, and the measured one if given
    peaks = [choose_peak(dev_name, precision)] + ([choose_peak(dev_name, precision, bench_file=args.peak_from)] if args.peak_from else [])
    layout = batch_layout(cfg.train, cfg.model.block_size, 1)
    x = torch.randint(0, cfg.model.vocab_size, (layout.micro_batch_size, cfg.model.block_size), device=env.device)
    y = torch.randint(0, cfg.model.vocab_size, x.shape, device=env.device)
    default, why = backend_class(resolve_plan(ParallelPlan.from_train(cfg.train, cfg.model, 1))).compile_rule(cfg.train, env.device, cfg.train.max_steps)
    variants = {"minigpt_compiled": minigpt_step(path, args.set, env, layout, True),
                "minigpt_eager": minigpt_step(path, args.set, env, layout, False),
                "baseline": baseline_step(cfg, env.device, False), "baseline_compiled": baseline_step(cfg, env.device, True)}
    times = {k: [] for k in variants}
    order = random.Random(0)
    note(f"bench_train: {len(variants)} step variants x {args.warmup + args.steps} rounds ({args.warmup} warmup), "
         f"interleaved; progress every few seconds, the result one JSON line on stdout")
    progress = Progress(args.warmup + args.steps, "bench_train", "rounds")
    for i in range(args.warmup + args.steps):
        progress.update()
        names = list(variants)
        order.shuffle(names)  # no variant always runs right after the same one
        for name in names:
            step = variants[name]
            t0 = time.perf_counter()
            step(x, y).item()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    tokens = x.numel()
    flops = train_flops_per_token(cfg.model, cfg.model.block_size, "exact") * tokens
    print(json.dumps({
        "bench": "train_step", "config": args.config, "overrides": args.set, "device": str(env.device),
        "device_name": dev_name, "cpu_cores": os.cpu_count(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "precision": precision, "params": param_counts(cfg.model).total,
        "tokens_per_step": tokens, "timed_rounds": args.steps,
        "minigpt_default": "minigpt_compiled" if default else "minigpt_eager", "minigpt_default_why": why,
        "ms_per_step": {k: round(v, 2) for k, v in ms.items()},
        "spread_ms": {k: [round(min(v) * 1e3, 2), round(max(v) * 1e3, 2)] for k, v in times.items()},
        "speedup_vs_baseline": {k: round(ms["baseline"] / v, 3) for k, v in ms.items()},
        "speedup_vs_baseline_compiled": {k: round(ms["baseline_compiled"] / v, 3) for k, v in ms.items()},
        "paired_speedup_vs_baseline": {k: round(statistics.median(b / t for b, t in zip(times["baseline"], v)), 3)
                                       for k, v in times.items()},
        "achieved_tflops": {k: round(flops / v * 1e3 / 1e12, 4) for k, v in ms.items()},
        "flops_convention": "exact matmul count, full attention square, 3x forward (minigpt.flops 'exact')",
        "mfu": mfu_fields(flops, ms, peaks),
        "method": "median of interleaved rounds (shuffled order) after warm-up; each step ends with loss.item(); "
                  "same random tokens; the same allocator for all (see allocator)",
        "allocator": f"GLIBC_TUNABLES={tunables} (both sides)" if (tunables := os.environ.get("GLIBC_TUNABLES"))
                     else "default glibc allocator",
    }))


if __name__ == "__main__":
    try:
        main()
    except UserError as e:  # a bad --config, --set or --peak-from: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
