"""`minigpt flops sweep`: where does 6N stop being a good approximation, and why?

For a ladder of GPT shapes (small ones timed on this device, the GPT-3 family counted on meta),
count training FLOPs per token with PyTorch's counter at two context lengths and divide by 6N
(Kaplan, non-embedding) and by PaLM's 6N + 12LHQT. Writes sweep.json, sweep.md and sweep.png.

Reading it: counted/6N rises far above 1 at small width because the LM head (2 h V per token
forward) and attention (4 L T h) are large next to 12 L h^2; it falls towards 1 as width grows.
PaLM's formula adds the attention term and tracks the count closely except for the LM head at
small width. Long context (T = 2048+) keeps counted/6N above 1 even for wide models.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from minigpt import flops as F
from minigpt.config import GPT3_PRESETS, ModelConfig, TrainConfig, configs_dir, load_config
from minigpt.measure import count_train_flops
from minigpt.model import GPT
from minigpt.optim import make_optimizer

VOCAB = 50257  # GPT-2/3 vocabulary for every rung, so the LM head's share is realistic
# (name, n_layer, n_embd, n_head, timed?)
LADDER = [
    ("w64", 2, 64, 2, True),
    ("w128", 4, 128, 4, True),
    ("w256", 4, 256, 4, True),
    ("w384", 6, 384, 6, True),
]


def time_train_step(c: ModelConfig, batch: int, seq_len: int, device: torch.device, steps: int) -> float:
    """Median seconds of full training steps (forward, backward, AdamW) on random tokens."""
    torch.manual_seed(0)
    model = GPT(c).to(device)
    opt = make_optimizer(model, TrainConfig())
    x = torch.randint(0, c.vocab_size, (batch, seq_len), device=device)
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        loss = model(x, x)[1]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:  # the first step warms up
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_sweep(out_dir: str, device: str = "cpu", steps: int = 3, batch: int = 4, short: int = 128,
              long: int = 2048, include_gpt3: bool = True, log=print) -> list[dict]:
    dev = torch.device(device)
    rungs = [(n, L, h, a, timed) for n, L, h, a, timed in LADDER]
    if include_gpt3:  # the shapes of the presets in configs/
        for name in GPT3_PRESETS:
            m = load_config(configs_dir() / f"{name}.toml").model
            rungs.append((name, m.n_layer, m.n_embd, m.n_head, False))
    rows = []
    for name, L, h, a, timed in rungs:
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
            s = time_train_step(c, batch, short, dev, steps)
            row["timed_device"] = str(dev)
            row["step_s"] = s
            row["achieved_tflops"] = row[f"counted_T{short}"] * batch * short / s / 1e12
        rows.append(row)
        log(f"{name:<12} {p.total:>16,} params | counted/6N {row[f'counted_over_6n_T{short}']:.3f} (T={short}) "
            f"{row[f'counted_over_6n_T{long}']:.3f} (T={long}) | counted/PaLM {row[f'counted_over_palm_T{short}']:.3f} "
            f"{row[f'counted_over_palm_T{long}']:.3f}"
            + (f" | {row['achieved_tflops']:.4f} TFLOP/s on {dev}" if timed else ""))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(rows, indent=2))
    (out / "sweep.md").write_text(_markdown(rows, short, long))
    _plot(rows, short, long, out / "sweep.png")
    return rows


def _markdown(rows: list[dict], short: int, long: int) -> str:
    lines = [
        "# FLOPs sweep: counted training FLOPs per token vs 6N and PaLM", "",
        "Counted: PyTorch FlopCounterMode on meta (matmuls, full attention square, backward = 2x forward).",
        "6N: Kaplan, N non-embedding. PaLM: 6N + 12LHQT. Vocabulary 50257 throughout.", "",
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


def _plot(rows: list[dict], short: int, long: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = [r["params"] for r in rows]
    for T, style in ((short, "-"), (long, "--")):
        ax1.plot(x, [r[f"counted_over_6n_T{T}"] for r in rows], "o" + style, label=f"counted / 6N, T={T}")
        ax1.plot(x, [r[f"counted_over_palm_T{T}"] for r in rows], "s" + style, label=f"counted / PaLM, T={T}")
    ax1.axhline(1.0, color="gray", lw=0.8)
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.set_xlabel("parameters (total)")
    ax1.set_ylabel("counted training FLOPs / formula")
    ax1.set_title("Where 6N stops being a good approximation")
    ax1.legend(fontsize=8)
    timed = [r for r in rows if "achieved_tflops" in r]
    ax2.plot([r["params"] for r in timed], [r["achieved_tflops"] for r in timed], "o-")
    ax2.set_xscale("log")
    ax2.set_xlabel("parameters (total)")
    ax2.set_ylabel("achieved TFLOP/s (counted FLOPs / step time)")
    ax2.set_title(f"Achieved FLOP/s on {timed[0]['timed_device'] if timed else '-'}, T={short}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
