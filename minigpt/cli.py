"""The `minigpt` command: prepare, train, generate, quickstart.

User mistakes (UserError) print one line, `error: ...`, and exit 2; bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from minigpt.errors import UserError


def cmd_prepare(args) -> None:
    from minigpt import data
    from minigpt.config import load_config
    from minigpt.train import resolve_preset

    cfg = load_config(resolve_preset(args.config), args.set)
    prepared = data.prepare_data(cfg.data, cfg.model)
    for line in prepared.summary_lines():
        print(line)
    print(json.dumps({"event": "prepared", "path": str(prepared.path), **prepared.manifest}))


def cmd_train(args) -> None:
    from minigpt.train import run_from_args

    run_from_args(args)


def cmd_generate(args) -> None:
    import torch

    from minigpt.distributed import resolve_device
    from minigpt.generate import generate_text, load_run

    device = resolve_device(args.device)
    model, tokenizer, cfg, step = load_run(args.run, device)
    sc = cfg.sample
    prompts = args.prompt if args.prompt else [sc.prompt]
    texts, gen = generate_text(
        model, tokenizer, prompts,
        eot_id=tokenizer.token_to_id("<|endoftext|>"),
        max_new_tokens=args.max_new_tokens or sc.max_new_tokens,
        temperature=sc.temperature if args.temperature is None else args.temperature,
        top_k=sc.top_k if args.top_k is None else args.top_k,
        top_p=sc.top_p if args.top_p is None else args.top_p,
        seed=sc.seed if args.seed is None else args.seed,
        use_cache=not args.no_cache,
    )
    for i, text in enumerate(texts):
        print(f"=== sample {i + 1}/{len(texts)} (run {args.run}, step {step}) ===")
        print(text)
    stats = gen.stats()
    print(
        f"prefill {stats['prefill_ms']:.1f} ms for {stats['prompt_tokens']} prompt tokens | "
        f"{stats['ms_per_token_step']:.2f} ms per decode step (batch {stats['batch']}) | "
        f"{stats['tokens_per_s']} generated tokens/s | KV cache {'off' if args.no_cache else 'on'} | {device}"
        + (" | capped at block_size" if stats["capped_at_block_size"] else "")
    )
    print(json.dumps({"event": "generated", "run": str(args.run), "step": step, "device": str(device),
                      "threads": torch.get_num_threads(), **stats}))


def cmd_quickstart(args) -> None:
    """The main job on the embedded default: prepare stdlib text, train the tiny model, sample."""
    from minigpt.generate import generate_text, load_run
    from minigpt.train import config_from_args

    from minigpt.bench import bench_hardware
    from minigpt.checkpoint import atomic_write_text
    from minigpt.train import train

    # a measured matmul peak of this device, so MFU has an honest denominator even on a CPU
    hw = bench_hardware("auto")
    hw_path = Path(args.out_dir).parent / f"hardware-{hw['device'].replace(':', '')}.json"
    atomic_write_text(hw_path, json.dumps(hw) + "\n")
    print(f"== measured {hw['device_name']}: matmul {hw['matmul_tflops']} TFLOP/s, copy "
          f"{hw['copy_bandwidth_gbs']} GB/s -> {hw_path} (the peak for MFU below)")
    targs = argparse.Namespace(config=args.config, set=[f"train.out_dir={args.out_dir}",
                                                        f"train.peak_from={hw_path}", *args.set],
                               resume=None, stop_at=None, overwrite=True)
    cfg, _ = config_from_args(targs)
    print(f"== minigpt quickstart: {cfg.model.n_layer}-layer GPT on '{cfg.data.source}' -> {cfg.train.out_dir}")

    summary = train(cfg, overwrite=True)
    model, tokenizer, cfg, step = load_run(cfg.train.out_dir)
    prompts = ["import", "def __init__(self", "class"]
    texts, gen = generate_text(model, tokenizer, prompts, eot_id=tokenizer.token_to_id("<|endoftext|>"),
                               max_new_tokens=80, temperature=0.8, top_k=50, seed=0)
    print("== samples from the trained model (KV cache, temperature 0.8, top-k 50)")
    for text in texts:
        print(text)
        print("-" * 40)
    s = gen.stats()
    gap = summary["unigram_entropy_nats"] - summary["val_loss"]
    print(
        f"== validation loss {summary['val_loss']:.3f} nats/token vs unigram entropy "
        f"{summary['unigram_entropy_nats']:.3f}: the model learned {gap:.3f} nats/token of context. "
        f"Generation: {s['tokens_per_s']} tokens/s at batch {s['batch']}."
    )


def _model_from_args(args):
    from minigpt.config import load_config
    from minigpt.train import resolve_preset

    return load_config(resolve_preset(args.config), args.set)


def cmd_flops(args) -> None:
    from minigpt.measure import flops_report
    from minigpt.report import flops_table

    cfg = _model_from_args(args)
    seq = args.seq_len or cfg.model.block_size
    r = flops_report(cfg.model, args.batch_size, seq, device=args.device)
    print(json.dumps(r) if args.json else flops_table(r))


def cmd_flops_sweep(args) -> None:
    from minigpt.sweep import run_sweep

    run_sweep(args.out, device=args.device, steps=args.steps, include_gpt3=not args.no_gpt3)
    print(f"wrote {args.out}/sweep.json, sweep.md, sweep.png")


def cmd_memory(args) -> None:
    from minigpt import memory as M
    from minigpt.measure import memory_report
    from minigpt.report import fmt_bytes, memory_table

    if args.params is not None:  # quick what-if from a bare parameter count
        table = M.zero_table(args.params, args.precision, args.dp)
        if args.json:
            print(json.dumps({"params_total": args.params, "dp": args.dp, "precision": args.precision, "zero": table}))
            return
        print(f"model states per GPU for {args.params:.4g} parameters, {args.precision}, dp={args.dp} (ZeRO paper layout):")
        for stage, z in table.items():
            print(f"  stage {stage}: params {fmt_bytes(z['parameters'])}, grads {fmt_bytes(z['gradients'])}, "
                  f"optimizer {fmt_bytes(z['optimizer_state'])}, total {fmt_bytes(z['total'])}")
        return
    cfg = _model_from_args(args)
    seq = args.seq_len or cfg.model.block_size
    precision = args.precision or cfg.train.precision
    r = memory_report(cfg.model, args.batch_size or cfg.train.micro_batch_size, seq, precision,
                      device=args.device, fake=args.fake, dp=args.dp, recompute=args.recompute)
    print(json.dumps(r) if args.json else memory_table(r))


def cmd_bench_hardware(args) -> None:
    from minigpt.bench import bench_hardware

    r = bench_hardware(args.device, args.size, args.repeats)
    line = json.dumps(r)
    if args.out:
        from minigpt.checkpoint import atomic_write_text

        atomic_write_text(Path(args.out), line + "\n")
    print(line)


def build_parser() -> argparse.ArgumentParser:
    from minigpt.train import add_arguments

    parser = argparse.ArgumentParser(prog="minigpt", description="Train, run and measure small GPTs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="tokenize a corpus (cached) and report its size and unigram entropy")
    p.add_argument("--config", help="TOML preset, a path or a name in configs/ (default: tiny)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train a model (single process, or under torchrun)")
    add_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="sample text from a trained run")
    p.add_argument("--run", required=True, help="run directory written by 'minigpt train'")
    p.add_argument("--prompt", action="append", default=[], help="prompt text; repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=0, help="default: the run's sample.max_new_tokens")
    p.add_argument("--temperature", type=float, help="0 is greedy")
    p.add_argument("--top-k", type=int, help="0 disables")
    p.add_argument("--top-p", type=float, help="1.0 disables")
    p.add_argument("--seed", type=int)
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every step")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, auto")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("flops", help="count training FLOPs of a config and set them beside the formulas")
    fsub = p.add_subparsers(dest="flops_command")
    for q in (p,):
        q.add_argument("--config", help="TOML preset, a path or a name in configs/ (default: tiny)")
        q.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
        q.add_argument("--batch-size", type=int, default=1)
        q.add_argument("--seq-len", type=int, default=0, help="default: model.block_size")
        q.add_argument("--device", default="meta", help="meta (default: nothing allocated), cpu or cuda")
        q.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    p.set_defaults(func=cmd_flops)
    q = fsub.add_parser("sweep", help="counted/6N and counted/PaLM over model sizes, timed steps, plot")
    q.add_argument("--out", default="runs/flops-sweep")
    q.add_argument("--device", default="cpu")
    q.add_argument("--steps", type=int, default=3, help="timed training steps per small model")
    q.add_argument("--no-gpt3", action="store_true", help="leave out the GPT-3 family (counted on meta)")
    q.set_defaults(func=cmd_flops_sweep)

    p = sub.add_parser("memory", help="training memory by category: predicted vs measured, ZeRO table")
    p.add_argument("--config", help="TOML preset, a path or a name in configs/ (default: tiny)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--batch-size", type=int, default=0, help="default: train.micro_batch_size")
    p.add_argument("--seq-len", type=int, default=0, help="default: model.block_size")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="default: train.precision (bf16 with --params)")
    p.add_argument("--dp", type=int, default=1, help="data-parallel degree for the ZeRO table")
    p.add_argument("--device", default="cpu")
    p.add_argument("--fake", action="store_true", help="fake tensors: any size, nothing allocated")
    p.add_argument("--recompute", action="store_true", help="activation checkpointing")
    p.add_argument("--params", type=float, help="skip the model: ZeRO table for this many parameters")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_memory)

    p = sub.add_parser("bench", help="benchmarks of this machine")
    bsub = p.add_subparsers(dest="bench_command", required=True)
    q = bsub.add_parser("hardware", help="measure matmul TFLOP/s per dtype and memory bandwidth")
    q.add_argument("--device", default="auto")
    q.add_argument("--size", type=int, default=0, help="matmul size (default 1024 on CPU, 8192 on GPU)")
    q.add_argument("--repeats", type=int, default=0)
    q.add_argument("--out", help="also write the JSON here (usable as train.peak_from)")
    q.set_defaults(func=cmd_bench_hardware)

    p = sub.add_parser("quickstart", help="the main job: prepare stdlib text, train the tiny GPT, sample")
    p.add_argument("--config", default="tiny")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--out-dir", default="runs/quickstart")
    p.set_defaults(func=cmd_quickstart)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "flops_command", None) == "sweep":
        args.func = cmd_flops_sweep
    try:
        args.func(args)
    except UserError as e:
        from minigpt.distributed import env_rank

        if env_rank() == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the last complete checkpoint is intact", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
