"""Every figure minigpt draws (matplotlib, Agg; torch-free): training curves of runs, the FLOP
sweep, training cost against model size. Each is titled, with units on labelled axes, a legend,
and ticks that show the values a reader needs."""

from __future__ import annotations

import math
import os
from pathlib import Path

from minigpt.core.config import read_json
from minigpt.core.errors import UserError
from minigpt.core.files import iter_jsonl


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_run_curves(run_dir: Path) -> dict:
    """Step and eval records of a run (metrics.jsonl), with tokens seen and minutes since start."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not os.path.lexists(path):
        raise UserError(f"{run_dir} has no metrics.jsonl: give a run directory written by 'minigpt train'")
    records = [_curve_point(r) for r in iter_jsonl(path, "metrics")]  # streamed, each kept small
    records = [r for r in records if r is not None]
    summary = read_json(run_dir / "summary.json", "run summary") if (run_dir / "summary.json").is_file() else {}
    data = read_json(run_dir / "data.json", "run corpus record") if (run_dir / "data.json").is_file() else {}
    t0 = min((r["time"] for r in records if "time" in r), default=None)
    for r in records:
        r.setdefault("kind", "step" if "loss" in r else "eval")
        r["minutes"] = (r["time"] - t0) / 60 if t0 is not None and "time" in r else None
    entropy = summary.get("unigram_entropy_nats") or data.get("unigram_entropy_nats")
    return {"name": run_dir.name, "steps": [r for r in records if r["kind"] == "step" and "tokens" in r and "loss" in r],
            "evals": [r for r in records if r["kind"] == "eval" and "tokens" in r and "val_loss" in r],
            "entropy": entropy if isinstance(entropy, (int, float)) and math.isfinite(entropy) else None,
            "tokenizer": data.get("tokenizer_sha256")}


CURVE_FIELDS = ("kind", "step", "tokens", "time", "loss", "val_loss", "val_bpb", "train_bpb", "train_loss")


def _curve_point(r: dict) -> dict | None:
    """The fields a loss curve reads, each a finite number (kind a string); None for a damaged record."""
    out = {}
    for k in CURVE_FIELDS:
        v = r.get(k)
        if v is None:
            continue
        ok = isinstance(v, str) if k == "kind" else (isinstance(v, (int, float)) and not isinstance(v, bool)
                                                       and math.isfinite(v))
        if not ok:
            return None
        out[k] = v
    return out


IMAGE_SUFFIXES = (".png", ".pdf", ".svg", ".jpg")


def check_image_path(out: str, flag: str = "--out", make_parents: bool = False) -> None:
    """An image path a plot may write, checked before any work: a known image type, not a directory, in a
    folder that exists (unless make_parents, for minigpt's own default paths)."""
    path = Path(out)
    if path.is_dir():
        raise UserError(f"{flag} {out} is a directory: give a file name such as {path / 'loss.png'}")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise UserError(f"{flag} {out}: a plot is written as {', '.join(IMAGE_SUFFIXES)}; give a name ending in one")
    if not make_parents and not path.parent.is_dir():
        raise UserError(f"{flag} {out}: the folder {path.parent} does not exist; create it or write elsewhere")


def _plot_run(ax, run: dict, x: str, c, bpb: bool, shared: bool) -> None:
    """One run's curves on one axis: step losses and validation in nats per token, or (bpb) the evaluations'
    train and validation bits per byte."""
    evals = [r for r in run["evals"] if r.get(x) is not None]
    if bpb:
        pts = [r for r in evals if r.get("val_bpb") is not None]
        ax.plot([r[x] for r in pts], [r.get("train_bpb") for r in pts], "s--", color=c, ms=3, alpha=0.6,
                label=f"{run['name']}: train (evaluation batches)")
        ax.plot([r[x] for r in pts], [r["val_bpb"] for r in pts], "o-", color=c, ms=4, label=f"{run['name']}: validation")
        return
    steps = [r for r in run["steps"] if r.get(x) is not None]
    ax.plot([r[x] for r in steps], [r["loss"] for r in steps], color=c, lw=1, alpha=0.6,
            label=f"{run['name']}: train (step batches)")
    if evals:  # a run stopped before its first evaluation has no validation curve to list
        ax.plot([r[x] for r in evals], [r["val_loss"] for r in evals], "o-", color=c, ms=4,
                label=f"{run['name']}: validation")
    if run["entropy"] and not shared:
        ax.axhline(run["entropy"], color=c, ls="--", lw=0.9,
                   label=f"{run['name']}: unigram entropy {run['entropy']:.2f} (a model ignoring context)")


def plot_runs(run_dirs: list[str], out: str) -> list[dict]:
    """Train and validation loss against tokens seen and against wall time, runs overlaid."""
    from matplotlib.ticker import EngFormatter

    plt = _pyplot()
    runs = [read_run_curves(Path(d)) for d in run_dirs]
    if not any(r["steps"] for r in runs):
        raise UserError("no step records with token counts in these runs (metrics.jsonl from minigpt >= 0.2)")
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    entropies = {round(r["entropy"], 6) for r in runs if r["entropy"]}
    shared = len(entropies) == 1 and all(r["entropy"] for r in runs)  # one corpus: one reference line
    if shared and len({r["tokenizer"] for r in runs}) <= 1:
        for ax in axes:
            ax.axhline(runs[0]["entropy"], color="gray", ls="--", lw=1,
                       label=f"unigram entropy {runs[0]['entropy']:.2f} of the corpus (a model ignoring context)")
    # runs with different tokenizers: nats per token do not compare, bits per byte do (the evaluations')
    bpb = len({r["tokenizer"] for r in runs}) > 1
    for i, run in enumerate(runs):
        c = colors[i % len(colors)]
        for ax, x in zip(axes, ("tokens", "minutes")):
            _plot_run(ax, run, x, c, bpb, shared)
    axes[0].set_xlabel("tokens seen")
    axes[0].xaxis.set_major_formatter(EngFormatter(sep=""))
    axes[1].set_xlabel("wall-clock time since the run's first record (minutes)")
    axes[0].set_ylabel("bits per byte (evaluations)" if bpb else "cross-entropy (nats per token)")
    axes[0].set_title("Loss against tokens seen")
    axes[1].set_title("Loss against wall-clock time")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.set_xlim(left=0)
    axes[1].legend(fontsize=8, loc="upper right")
    fig.suptitle(f"minigpt training curves: {', '.join(r['name'] for r in runs)}"
                 + ("\n(their tokenizers differ, so nats per token would not compare: bits per byte)" if bpb else ""))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return runs


def plot_sweep(rows: list[dict], short: int, long: int, path: Path, device: str) -> None:
    """counted FLOPs / formula against size (readable ratio ticks), and achieved FLOP/s of the
    timed rungs as medians with their spread, on a zero-based axis."""
    from matplotlib.ticker import FixedLocator, FormatStrFormatter, NullLocator

    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    x = [r["params"] for r in rows]
    for T, style in ((short, "-"), (long, "--")):
        ax1.plot(x, [r[f"counted_over_6n_T{T}"] for r in rows], "o" + style, label=f"counted / 6N (Kaplan), T = {T}")
        ax1.plot(x, [r[f"counted_over_palm_T{T}"] for r in rows], "s" + style, label=f"counted / PaLM 6N + 12LHQT, T = {T}")
    last = rows[-1]  # the largest model's ratios, written out: 1.03 cannot be read off a log axis
    ax1.text(0.42, 0.42, f"{last['name']} ({last['params']:.3g} parameters):\n"
             f"counted / 6N: {last[f'counted_over_6n_T{short}']:.3f} (T = {short}), "
             f"{last[f'counted_over_6n_T{long}']:.3f} (T = {long})\n"
             f"counted / PaLM: {last[f'counted_over_palm_T{short}']:.3f} (T = {short}), "
             f"{last[f'counted_over_palm_T{long}']:.3f} (T = {long})",
             transform=ax1.transAxes, fontsize=8, bbox=dict(boxstyle="round", fc="white", ec="0.7"))
    ax1.axhline(1.0, color="gray", lw=0.8)
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ticks = [1, 1.1, 1.25, 1.5, 2, 3, 5, 10, 20, 50]
    ax1.yaxis.set_major_locator(FixedLocator(ticks))
    ax1.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax1.yaxis.set_minor_locator(NullLocator())
    ax1.set_xlabel("parameters (total)")
    ax1.set_ylabel("counted training FLOPs / formula (1 = the formula is exact)")
    ax1.set_title("Where 6N stops being a good approximation")
    ax1.grid(alpha=0.3, which="major")
    ax1.legend(fontsize=8)
    timed = [r for r in rows if "achieved_tflops" in r]
    if timed:
        mid = [r["achieved_tflops"] for r in timed]
        lo = [r["achieved_tflops"] - r.get("achieved_tflops_min", r["achieved_tflops"]) for r in timed]
        hi = [r.get("achieved_tflops_max", r["achieved_tflops"]) - r["achieved_tflops"] for r in timed]
        ax2.errorbar([r["params"] for r in timed], mid, yerr=[lo, hi], fmt="o-", capsize=4,
                     label=f"median of {timed[0].get('timed_steps', '?')} steps, bars: min to max")
        ax2.set_xscale("log")
        ax2.set_ylim(bottom=0, top=max(r.get("achieved_tflops_max", r["achieved_tflops"]) for r in timed) * 1.15)
        ax2.legend(fontsize=8, loc="lower right")
    ax2.set_xlabel("parameters (total)")
    ax2.set_ylabel("achieved TFLOP/s (counted FLOPs / step time)")
    ax2.set_title(f"Achieved FLOP/s of a training step on {device}, T = {short}")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def count(n: float) -> str:
    """1.64M, 300B, 13T: a count as a reader says it."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def plot_costs(points: list[dict], path: str, gpu: str, mfu: float | None, num_gpus: int) -> None:
    """Training cost against parameters, log-log: extrapolated targets (at their own token counts,
    on the stated GPUs, at a given MFU or each at its predicted one) and runs measured here (wall-clock x
    processes, their tokens)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 6))
    at = f"MFU {mfu:.0%} (given)" if mfu else "MFU predicted per model (step-time model)"
    styles = {"extrapolated": ("s", f"extrapolated: {num_gpus:,} x {gpu} (bf16 datasheet peak)"),
              "measured": ("o", "measured here: wall-clock x processes of a minigpt run")}
    for kind, (marker, label) in styles.items():
        pts = [p for p in points if p["kind"] == kind]
        if pts:
            ax.scatter([p["params"] for p in pts], [p["gpu_hours"] for p in pts], marker=marker, s=45, label=label)
            for i, p in enumerate(sorted(pts, key=lambda q: q["params"])):
                mfu_note = f", MFU {p['mfu']:.0%}" if "mfu" in p and not mfu else ""
                # neighbours' labels alternate right-below and left-above their points: close sizes never overlap
                right = i % 2 == 0
                ax.annotate(f"{p['name']} ({count(p['tokens'])} tokens{mfu_note})", (p["params"], p["gpu_hours"]), fontsize=7,
                            xytext=(6, -9) if right else (-6, 5), textcoords="offset points",
                            ha="left" if right else "right")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(left=min(p["params"] for p in points) / 12, right=max(p["params"] for p in points) * 30)  # labels' room
    measured = any(p["kind"] == "measured" for p in points)
    ax.set_xlabel("parameters active per token (a mixture of experts: its shared weights and the experts it uses)")
    ax.set_ylabel("training cost (device-hours; each point at its own token count)")
    ax.set_title(f"Training cost against model size: GPT-3 family at 300B tokens, GPT-4 estimate at 13T\n"
                 f"extrapolated on {gpu} at {at}" + ("; measured runs are tiny CPU runs, on the same axis"
                                                              if measured else ""))
    ax.grid(alpha=0.3, which="major")
    ax.legend(fontsize=8, loc="lower right")  # the points run bottom left to top right: that corner is empty
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_decode_curve(rows: list[dict], path: str, title: str, user_target: float = 30.0) -> None:
    """Total decode tokens/s and tokens/s per sequence against batch, one line per context, with
    the bandwidth bound dashed and the per-user target (30 tokens/s) marked."""
    plt = _pyplot()
    fig, (total, user) = plt.subplots(1, 2, figsize=(12, 5))
    for ctx in sorted({r["context"] for r in rows}):
        pts = sorted((r for r in rows if r["context"] == ctx), key=lambda r: r["batch"])
        b = [r["batch"] for r in pts]
        line = total.plot(b, [r["decode_tokens_per_s_total"] for r in pts], "o-", label=f"measured, context {ctx}")[0]
        total.plot(b, [r["bandwidth_bound_tokens_per_s"] for r in pts], "--", color=line.get_color(),
                   label=f"bandwidth bound, context {ctx}")
        user.plot(b, [r["decode_tokens_per_s_per_sequence"] for r in pts], "o-", color=line.get_color(), label=f"context {ctx}")
    user.axhline(user_target, color="grey", linestyle=":", label=f"{user_target:g} tokens/s a reader needs")
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator, ScalarFormatter

    batches = sorted({r["batch"] for r in rows})
    for ax, ylabel in ((total, "decode tokens/s, all sequences"), (user, "decode tokens/s per sequence (per user)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(FixedLocator(batches))  # the batches measured, as plain numbers (not 2^k)
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("batch (concurrent sequences)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _stacked_bars(ax, parts: dict[str, list[float]]) -> list[float]:
    """One bar per position, its parts stacked in the dict's order; returns each bar's height."""
    bottom = [0.0] * len(next(iter(parts.values())))
    for part, values in parts.items():
        ax.bar(range(len(values)), values, bottom=bottom, label=part)
        bottom = [b + v for b, v in zip(bottom, values)]
    return bottom


def plot_step_parts(rows: list[dict], path: str, title: str) -> None:
    """Horizontal stacked bars, one run a row (readable whatever the count): each run's predicted step split into its
    parts (share of the step), the predicted/published ratio at the end of each bar, the legend above the bars."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 1.6 + 0.24 * len(rows)))
    parts = list(rows[0]["parts_fraction"])
    left = [0.0] * len(rows)
    for part in parts:
        values = [r["parts_fraction"][part] for r in rows]
        ax.barh(range(len(rows)), values, left=left, label=part, height=0.75)
        left = [a + v for a, v in zip(left, values)]
    for i, r in enumerate(rows):
        ax.text(1.01, i, f"{1 + r['error']:.2f}", va="center", fontsize=7)
    ax.set_yticks(range(len(rows)), [r["name"] for r in rows], fontsize=7)
    ax.set_ylim(len(rows) - 0.5, -0.5)  # the table's order, top to bottom, no empty margin
    ax.set_xlim(0, 1.08)
    ax.set_xlabel("share of the predicted step; the number after a bar: predicted / published throughput")
    ax.set_title(title, fontsize=10, pad=34)
    ax.legend(fontsize=7, ncol=min(5, len(parts)), loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_serve_sweep(curves: dict[str, list[dict]], path: str, title: str, user_target: float = 30.0) -> None:
    """Output throughput (all users) against the typical user's speed over a sweep of arrival rates, one line per
    server (e.g. continuous and static batching), each point labelled with its rate; the reader's speed marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    for n, (label, points) in enumerate(curves.items()):
        pts = [p for p in points if p.get("per_user_tokens_per_s")]
        x = [p["per_user_tokens_per_s"]["p50"] for p in pts]
        y = [p["output_throughput_tokens_per_s"] for p in pts]
        ax.plot(x, y, "o-", label=label)
        for xi, yi, p in zip(x, y, pts):
            # each curve labels its points on its own side (the first right-above, the next left-below): the curves
            # run close together, so shared offsets overlap
            ax.annotate(f"{p['rate_requests_per_s'] or 'all'}/s", (xi, yi), fontsize=7,
                        xytext=(4, 4) if n % 2 == 0 else (-4, -11), ha="left" if n % 2 == 0 else "right",
                        textcoords="offset points")
    ax.axvline(user_target, color="grey", linestyle=":", label=f"{user_target:g} tokens/s a reader needs")
    ax.set_xlabel("tokens/s per user (median request, measured: 1 / time per output token)")
    ax.set_ylabel("output tokens/s, all users (measured)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_layout_steps(alternatives: list[dict], path: str, title: str) -> None:
    """Stacked bars: the predicted step of each layout, in seconds by part, fastest first, with its MFU."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(alternatives)), 4.5))
    bottom = _stacked_bars(ax, {part: [a["parts_s"].get(part, 0.0) for a in alternatives]
                                for part in alternatives[0]["parts_s"]})
    for i, a in enumerate(alternatives):
        ax.text(i, bottom[i] * 1.01, f"MFU {a['mfu']:.1%}", ha="center", fontsize=7)
    ax.set_xticks(range(len(alternatives)), [a["plan"].replace(",", "\n") for a in alternatives], fontsize=7)
    ax.set_ylabel("predicted seconds per step")
    ax.set_title(f"{title} (predicted: step-time model; fastest first)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
