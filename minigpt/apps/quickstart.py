"""The main job on the embedded default, reusable from Python: measure this device's peak, prepare the
standard library's text, train the tiny GPT, sample from it, plot its loss, and extrapolate its measured
efficiency to GPT-3 175B and GPT-4."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from minigpt.analytic.extrapolate import extrapolate
from minigpt.analytic.measured_mfu import mfu_from_run
from minigpt.analytic.published import backtest_note
from minigpt.analytic.scenario import REFERENCE_MFU, Scenario
from minigpt.core.atomic import atomic_write_text
from minigpt.core.device import resolve_device, resolve_precision, use_threads
from minigpt.core.errors import UserError
from minigpt.core.fmt import fmt_usd
from minigpt.core.hardware import gpu_by_name
from minigpt.core.plots import plot_runs
from minigpt.core.resolve import run_config, target_config
from minigpt.infer.generate import generate_text
from minigpt.measure.bench import bench_hardware
from minigpt.run.load import load_run
from minigpt.train.loop import train


def quickstart(config: str, overrides: list[str], out_dir: str, log=print) -> dict:
    """Run the whole job; returns the training summary."""
    cfg = run_config(config, [f"train.out_dir={out_dir}", *overrides])
    # the threads once, pinned for the run: its measured peak and its steps must use the same number
    log(f"== threads: {use_threads(cfg.train.threads)}, pinned as train.threads for the peak measurement and the run")
    cfg.train.threads = torch.get_num_threads()
    # a measured matmul peak of this device in the training dtype: an honest MFU denominator on a CPU
    precision = cfg.train.precision = resolve_precision(cfg.train.precision, resolve_device(cfg.train.device))
    hw = bench_hardware(cfg.train.device, dtypes=[precision])
    hw_path = Path(out_dir).parent / f"hardware-{hw['device'].replace(':', '')}-{hw['threads']}threads.json"
    atomic_write_text(hw_path, json.dumps(hw) + "\n")
    log(f"== measured {hw['device_name']}: {precision} matmul {hw['matmul_tflops'][precision]} "
        f"TFLOP/s, copy {hw['copy_bandwidth_gbs']} GB/s -> {hw_path}")
    if hw["datasheet"] is None and not cfg.train.peak_tflops and not cfg.train.peak_from:
        cfg.train.peak_from = str(hw_path)  # no datasheet peak for this device: MFU against the measured one
    log(f"== minigpt quickstart: {cfg.model.n_layer}-layer GPT on '{cfg.data.source}' -> {cfg.train.out_dir}")
    summary = train(cfg, overwrite=True, log=log)
    if summary.get("stopped"):
        return summary
    stats = samples(cfg.train.out_dir, log)
    plot_runs([cfg.train.out_dir], str(Path(cfg.train.out_dir) / "loss.png"))
    log(f"== loss curves: {Path(cfg.train.out_dir) / 'loss.png'} (minigpt plot RUN [RUN ...] draws any runs)")
    extrapolation(cfg.train.out_dir, log)
    gap = summary["unigram_entropy_nats"] - summary["val_loss"]
    bpb = f" = {summary['val_bpb']:.3f} bits/byte" if summary.get("val_bpb") else ""
    log(f"== validation loss {summary['val_loss']:.3f} nats/token{bpb} vs unigram entropy "
        f"{summary['unigram_entropy_nats']:.3f}: the model learned {gap:.3f} nats/token of context. "
        f"Generation: {stats['tokens_per_s']} tokens/s at batch {stats['batch']}. Score it on any text: "
        f"minigpt eval --run {summary['run_dir']} --data FILE_OR_FOLDER")
    return summary


def _cost_rows(cfg, gpu, target: str, run_dir: str, log) -> None:
    """One target on one GPU: predicted (with its band), assumed, and measured here."""
    try:
        measured = mfu_from_run(run_dir, gpu)[0]
    except UserError:
        measured = None
    choices = [("predicted (step-time model)", None),
               (f"assumed: {REFERENCE_MFU[gpu.name][1].split(',')[0]}", REFERENCE_MFU[gpu.name][0])]
    if measured:
        choices.append(("measured here (CPU, load-bound)", measured))
    for label, mfu in choices:
        r = extrapolate(cfg.model, cfg.target, Scenario(gpu, mfu=mfu, mfu_source=label, num_gpus=1024))
        band = r.get("band")
        spread = (f"{band['days'][0]:>6,.1f}-{band['days'][1]:<7,.1f} {fmt_usd(band['cost_usd'][0]):>8}-"
                  f"{fmt_usd(band['cost_usd'][1]):<8}" if band else "")
        log(f"   {target:<10} {gpu.name:<10} {r['mfu']:>6.1%}  {label[:30]:<30} {r['gpu_hours']:>11,.0f} "
            f"{r['days']:>6,.1f} {fmt_usd(r['cost_usd']):>9}  {spread}")


def samples(run_dir: str, log=print) -> dict:
    """Three samples from the trained run; their generation statistics."""
    model, tokenizer, cfg, step = load_run(run_dir)
    texts, gen = generate_text(model, tokenizer, ["import", "def __init__(self", "class"],
                               eot_id=tokenizer.token_to_id("<|endoftext|>"), max_new_tokens=80, temperature=0.8,
                               top_k=50, seed=0)
    log("== samples from the trained model (KV cache, temperature 0.8, top-k 50)")
    for text in texts:
        log(text)
        log("-" * 40)
    return gen.stats()


def extrapolation(run_dir: str, log=print) -> None:
    """The quickstart's last step: what GPT-3 175B and GPT-4 would cost on A100 and H100, the step-time model's
    prediction first with its band, then a published reference MFU and the CPU run's own (for comparison only)."""
    log("== extrapolation to full scale (minigpt extrapolate --help for every option)")
    log("   predicted: the MFU of the step-time model on the layout chosen, with its band (unknown settings and the "
        "backtest's error on that GPU class; minigpt backtest)")
    log("   assumed: a published reference MFU (cited); measured here: this CPU run's MFU, which moves with the load "
        "of this machine (shown for comparison, not a GPU figure)")
    log("   validated by counting: the FLOP formula (exact = every matmul); assumptions: 1024 GPUs, prices per "
        "GPU-hour, GPT-4's shape (an estimate)")
    log(f"   {'target':<10} {'GPU':<10} {'MFU':>6}  {'MFU from':<30} {'GPU-hours':>11} {'days':>6} {'cost':>9}  "
        f"{'band: days':>14} {'cost':>17}")
    for target in ("gpt3-175b", "gpt4"):
        cfg = target_config(target)
        for gpu_name in ("A100", "H100"):
            _cost_rows(cfg, gpu_by_name(gpu_name), target, run_dir, log)
    log("   (gpt4 = GPT-4 ESTIMATE: unofficial shape from industry reports)")
    for gpu_name in ("A100", "H100"):  # how far the predicted rows can be trusted
        log(f"   predicted on {gpu_name}: {backtest_note(gpu_by_name(gpu_name).name)}")
