"""`minigpt flops sweep`: where does 6N stop being a good approximation, and why?

For a ladder of GPT shapes (small ones timed on this device, the GPT-3 family counted on meta),
count training FLOPs per token with PyTorch's counter at two context lengths and divide by 6N
(Kaplan, non-embedding) and by PaLM's 6N + 12LHQT (N all parameters, App. B). Writes sweep.json,
sweep.md and sweep.png.

Reading it: counted/6N rises far above 1 at small width because the LM head (2 h V per token
forward) and attention (4 L T h) are large next to 12 L h^2; it falls towards 1 as width grows.
PaLM's formula counts the embedding (so the LM head's matmul, when tied) and the attention term,
and tracks the count at every width. Long context (T = 2048+) keeps counted/6N above 1 even for
wide models.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from minigpt.analytic import flops as F
from minigpt.core.config import GPT3_PRESETS, ModelConfig, TrainConfig, configs_dir, load_config
from minigpt.core.plots import plot_sweep
from minigpt.core.progress import Progress
from minigpt.measure.counted import count_train_flops
from minigpt.nn.model import GPT
from minigpt.nn.optim import make_optimizer

VOCAB = 50257  # GPT-2/3 vocabulary for every rung, so the LM head's share is realistic
# (name, n_layer, n_embd, n_head, timed?)
LADDER = [
    ("w64", 2, 64, 2, True),
    ("w128", 4, 128, 4, True),
    ("w256", 4, 256, 4, True),
    ("w384", 6, 384, 6, True),
]


def time_train_step(c: ModelConfig, batch: int, seq_len: int, device: torch.device, steps: int) -> list[float]:
    """Seconds of full training steps (forward, backward, AdamW) on random tokens, after one warm-up."""
    torch.manual_seed(0)
    model = GPT(c).to(device)
    opt = make_optimizer(model, TrainConfig())
    x = torch.randint(0, c.vocab_size, (batch, seq_len), device=device)
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        loss = model(x, x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:  # the first step warms up
            times.append(time.perf_counter() - t0)
    return times


def run_sweep(out_dir: str, device: str = "cpu", steps: int = 7, batch: int = 4, short: int = 128,
              long: int = 2048, include_gpt3: bool = True, log=print) -> list[dict]:
    dev = torch.device(device)
    rungs = [(n, L, h, a, timed) for n, L, h, a, timed in LADDER]
    if include_gpt3:  # the shapes of the presets in configs/
        for name in GPT3_PRESETS:
            m = load_config(configs_dir() / f"{name}.toml").model
            rungs.append((name, m.n_layer, m.n_embd, m.n_head, False))
    rows = []
    with Progress(len(rungs), "flop sweep", "models") as progress:
        for rung in rungs:
            rows.append(_sweep_row(*rung, dev, steps, batch, short, long, log))
            progress.update()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(rows, indent=2))
    (out / "sweep.md").write_text(_markdown(rows, short, long))
    plot_sweep(rows, short, long, out / "sweep.png", str(dev))
    return rows


def _sweep_row(name: str, L: int, h: int, a: int, timed: bool, dev: torch.device, steps: int, batch: int,
               short: int, long: int, log) -> dict:
    """One rung: counted FLOPs per token at both lengths, their ratios to 6N and PaLM, and (timed
    rungs) the achieved TFLOP/s."""
    c = ModelConfig(n_layer=L, n_embd=h, n_head=a, block_size=long, vocab_size=VOCAB, bias=True)
    p = F.param_counts(c)
    row = {"name": name, "params": p.total, "params_non_embedding": p.non_embedding, "n_layer": L, "n_embd": h}
    for T in (short, long):
        counted = count_train_flops(c, 1, T, "meta").per_token
        row[f"counted_T{T}"] = counted
        row[f"counted_over_6n_T{T}"] = counted / F.train_flops_per_token(c, T, "kaplan_6n")
        row[f"counted_over_palm_T{T}"] = counted / F.train_flops_per_token(c, T, "palm")
        row[f"lm_head_share_T{T}"] = 6 * c.padded_vocab_size * h / counted
        row[f"attention_share_T{T}"] = 12 * L * T * h / counted
    if timed:
        times = time_train_step(c, batch, short, dev, steps)
        flops = row[f"counted_T{short}"] * batch * short / 1e12
        row.update(timed_device=str(dev), timed_steps=steps, step_s=statistics.median(times),
                   achieved_tflops=flops / statistics.median(times), achieved_tflops_min=flops / max(times),
                   achieved_tflops_max=flops / min(times))
    log(f"{name:<12} {p.total:>16,} params | counted/6N {row[f'counted_over_6n_T{short}']:.3f} (T={short}) "
        f"{row[f'counted_over_6n_T{long}']:.3f} (T={long}) | counted/PaLM {row[f'counted_over_palm_T{short}']:.3f} "
        f"{row[f'counted_over_palm_T{long}']:.3f}"
        + (f" | {row['achieved_tflops']:.4f} TFLOP/s on {dev}" if timed else ""))
    return row


def _markdown(rows: list[dict], short: int, long: int) -> str:
    lines = [
        "# FLOPs sweep: counted training FLOPs per token vs 6N and PaLM", "",
        "Counted: PyTorch FlopCounterMode on meta (matmuls, full attention square, backward = 2x forward).",
        "6N: Kaplan, N non-embedding. PaLM: 6N + 12LHQT, N all parameters (App. B). Vocabulary 50257 throughout.", "",
        f"| model | params | counted/6N T={short} | counted/6N T={long} | counted/PaLM T={short} | counted/PaLM T={long} "
        f"| LM head share T={short} | attention share T={long} | achieved TFLOP/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ach = f"{r['achieved_tflops']:.4f} ({r['timed_device']})" if "achieved_tflops" in r else "-"
        lines.append(
            f"| {r['name']} | {r['params']:,} | {r[f'counted_over_6n_T{short}']:.3f} | {r[f'counted_over_6n_T{long}']:.3f} "
            f"| {r[f'counted_over_palm_T{short}']:.3f} | {r[f'counted_over_palm_T{long}']:.3f} "
            f"| {r[f'lm_head_share_T{short}']:.1%} | {r[f'attention_share_T{long}']:.1%} | {ach} |"
        )
    return "\n".join(lines) + "\n"
