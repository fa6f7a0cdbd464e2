"""Commands that measure the model and the machine beside the formulas: flops (and flops sweep), memory,
simulate, and bench (hardware, collectives, decode, serve)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from minigpt.commands.flags import (
    apply_threads,
    config_flags,
    device_arg,
    load_cli_config,
    number,
    plan_arg,
    quantize_flag,
    quantize_loaded,
    span_arg,
    threads_flag,
)
from minigpt.commands.serve import cmd_bench_serve
from minigpt.core.errors import UserError
from minigpt.core.fmt import fit, to_json
from minigpt.core.plan import KEYS as PLAN_KEYS, parse_keys


def cmd_flops(args) -> None:
    apply_threads(args)
    from minigpt.analytic.report import flops_table
    from minigpt.measure.counted import flops_report

    cfg = load_cli_config(args)
    r = flops_report(cfg.model, args.batch_size, args.seq_len or cfg.model.block_size, device=args.device)
    print(to_json(r) if args.json else fit(flops_table(r)))


def cmd_flops_sweep(args) -> None:
    apply_threads(args)
    from minigpt.measure.sweep import run_sweep

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UserError(f"--out {args.out} is a file: the sweep writes a folder (sweep.json, .md, .png); give a folder")
    run_sweep(args.out, device=args.device, steps=args.steps, include_gpt3=not args.no_gpt3)
    print(f"wrote {args.out}/sweep.json, sweep.md, sweep.png")


def cmd_memory(args) -> None:
    from minigpt.analytic import memory as M
    from minigpt.analytic.report import deepspeed_estimate_lines, memory_table, per_rank_memory_table, zero_stage_lines

    if args.run:  # what a run measured on every rank
        path = Path(args.run) / "memory_per_rank.json"
        if not path.is_file():
            raise UserError(f"{path} does not exist: only runs with train.backend = 'deepspeed' record per-rank memory")
        from minigpt.core.config import read_json

        table = read_json(path, "per-rank memory")
        print(to_json(table) if args.json else per_rank_memory_table(table))
        return
    if args.params is not None:  # quick what-if from a bare parameter count
        precision = args.precision or "bf16"
        table = M.zero_table(args.params, precision, args.dp)
        ds = M.deepspeed_estimates(args.params, args.dp)
        if args.json:
            print(to_json({"params_total": args.params, "dp": args.dp, "precision": precision, "zero": table,
                           "deepspeed_estimator_bytes": ds}))
            return
        print(f"model states per GPU for {args.params:.4g} parameters, {precision}, dp={args.dp} (ZeRO paper layout):")
        print("\n".join(zero_stage_lines(table)))
        print(fit(deepspeed_estimate_lines(table, ds)))
        return
    import torch

    from minigpt.core.device import resolve_precision

    apply_threads(args)
    from minigpt.measure.counted import memory_report

    cfg = load_cli_config(args)
    precision = args.precision or resolve_precision(cfg.train.precision, torch.device(args.device))
    r = memory_report(cfg.model, args.batch_size or cfg.train.micro_batch_size, args.seq_len or cfg.model.block_size,
                      precision, device=args.device, fake=args.fake, dp=args.dp, recompute=args.recompute)
    print(to_json(r) if args.json else fit(memory_table(r)))


def cmd_bench_decode(args) -> None:
    apply_threads(args)
    import torch

    from minigpt.apps.decode_bench import decode_bench
    from minigpt.core.device import resolve_device
    from minigpt.nn.model import GPT
    from minigpt.run.load import load_run

    device = resolve_device(args.device)
    if args.run:
        model = load_run(args.run, device)[0]
    else:
        from minigpt.analytic.memory import model_bytes
        from minigpt.core.device import check_fits

        c = load_cli_config(args).model
        check_fits(model_bytes(c), device, f"a model of {c.n_layer} layers x {c.n_embd}", "benchmark a smaller config")
        torch.manual_seed(0)
        model = GPT(c).to(device).eval()
    quantize_loaded(model, args)
    result = decode_bench(model, args.run or args.config, device, args.dtype, args.batch or [1, 2, 4, 8, 16, 32],
                          args.context, args.new_tokens, args.compile, args.out)
    for r in result["rows"]:
        print(f"context {r['context']:>5} batch {r['batch']:>4}: {r['decode_tokens_per_s_total']:>10,.1f} tokens/s total, "
              f"{r['decode_tokens_per_s_per_sequence']:>8,.1f} per sequence, {r['ms_per_token']:.2f} ms/token; "
              f"{r['fraction_of_bandwidth_bound']:.1%} of the bandwidth bound; prefill {r['prefill_tokens_per_s']:,.0f} tokens/s")
    print(f"wrote {args.out} and {Path(args.out).with_suffix('.png')}")


def cmd_simulate(args) -> None:
    from minigpt.analytic.report import simulate_table
    from minigpt.core.hardware import gpu_by_name
    from minigpt.core.plan import ParallelPlan
    from minigpt.measure.simulate import SimSpec, simulate

    cfg = load_cli_config(args)
    keys = parse_keys(args.plan)
    if "dp" not in keys and args.world is None:
        raise UserError("simulate needs the data-parallel degree: give dp in --plan (e.g. --plan dp=64,tp=8,zero=3) or "
                        "--world N (dp = N / (tp x pp))")
    from minigpt.parallel.registry import default_zero

    keys.setdefault("zero", default_zero(keys, 3))
    plan = ParallelPlan.from_keys(keys, args.world)
    m, m_source = args.micro_batches, ""
    gbt = cfg.target.global_batch_tokens if getattr(cfg, "target", None) else 0
    if not m and gbt and plan.pp > 1:  # as extrapolate counts them: the target's batch over dp micro-batches
        m = max(1, round(gbt / ((args.seq_len or cfg.model.block_size) * args.micro_batch * plan.dp)))
        m_source = (f"the target's global batch ({gbt:,.0f} tokens, target.global_batch_tokens) over dp x micro-batch, "
                    f"as extrapolate counts them")
    spec = SimSpec(plan, args.precision, args.reduce_precision or "", args.micro_batch, args.seq_len, args.recompute,
                   m, m_source)
    r = simulate(cfg.model, spec, gpu_by_name(args.gpu), args.mfu)
    print(to_json(r) if args.json else fit(simulate_table(r)))


def cmd_bench_collectives(args) -> None:
    """`bench hardware --collectives`: every rank of a torchrun job times the collectives; rank 0 reports."""
    from minigpt.core.atomic import atomic_write_text
    from minigpt.measure.collectives import bench_collectives

    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise UserError("--collectives times collectives between ranks: run it under torchrun with 2 or more, e.g. "
                        "torchrun --nproc-per-node 8 -m minigpt bench hardware --collectives --out coll.json")
    if args.out and not Path(args.out).resolve().parent.is_dir():
        raise UserError(f"--out {args.out}: its folder does not exist; create it or choose another path")
    hw = bench_collectives(args.device, args.repeats or 10)
    if hw is None:  # not the main rank
        return
    if args.out:
        atomic_write_text(Path(args.out), json.dumps(hw) + "\n")
    if args.json:
        print(json.dumps(hw))
        return
    for r in hw["collectives"]["results"]:
        print(f"{r['op']:<15} {r['bytes'] / 2**20:>10.3f} MiB  {r['time_s'] * 1e3:>9.3f} ms  algbw {r['algbw_gbs']:>8.2f} GB/s  "
              f"busbw {r['busbw_gbs']:>8.2f} GB/s (measured)")
    print(f"({hw['collectives']['world_size']} ranks, {hw['collectives']['backend']}; {hw['collectives']['convention']})")


def cmd_bench_hardware(args) -> None:
    if args.collectives:
        return cmd_bench_collectives(args)
    apply_threads(args)
    from minigpt.core.atomic import atomic_write_text
    from minigpt.measure.bench import bench_hardware

    hw = bench_hardware(args.device, args.size, args.repeats, sweep=args.sweep)
    line = json.dumps(hw)
    if args.out:
        atomic_write_text(Path(args.out), line + "\n")
    if args.json:
        print(line)
        return
    print(f"{hw['device_name']} ({hw['device']}, {hw['threads']} threads), measured: matmul "
          + ", ".join(f"{k} {v} TFLOP/s (n={hw['matmul_size'][k]})" for k, v in hw["matmul_tflops"].items())
          + f"; copy {hw['copy_bandwidth_gbs']} GB/s (read + write)" + (f"; written to {args.out}" if args.out else ""))
    print(f"({hw['convention']})")
    if "gemm_sweep" in hw:
        rates = sorted(t for *_, t in hw["gemm_sweep"]["shapes"])
        print(f"GEMM sweep ({hw['gemm_sweep']['dtype']}, {len(rates)} shapes, measured): {rates[0]:.4g} to {rates[-1]:.4g} "
              f"TFLOP/s, median {rates[len(rates) // 2]:.4g} ({hw['gemm_sweep']['convention']})")
    if "pass_sweep" in hw:
        print(_pass_summary(hw["pass_sweep"]))
    if "attention_sweep" in hw:
        fwd, bwd = (sorted(r[i] for r in hw["attention_sweep"]["shapes"]) for i in (2, 3))
        print(f"attention sweep ({hw['attention_sweep']['dtype']}, {len(fwd)} shapes, measured): forward {fwd[0]:.4g} to "
              f"{fwd[-1]:.4g}, backward {bwd[0]:.4g} to {bwd[-1]:.4g} TFLOP/s ({hw['attention_sweep']['convention']})")


def _pass_summary(sweep: dict) -> str:
    """One line: each pass type's measured nanoseconds per output element, forward + backward, over the sweep."""
    per: dict[str, list[float]] = {}
    for _, name, rows, width, seconds in sweep["passes"]:
        per.setdefault(name, []).append(seconds / (rows * width) * 1e9)
    types = "; ".join(f"{name} {min(v):.3g}-{max(v):.3g}" for name, v in per.items())
    return (f"pass sweep ({sweep['dtype']}, {len(sweep['passes'])} shapes, measured): ns per output element, forward + "
            f"backward: {types} ({sweep['convention']})")


def add_parsers(sub) -> None:
    """flops (and flops sweep), memory, simulate, bench."""
    p = sub.add_parser("flops", parents=[threads_flag()], help="count training FLOPs of a config and set them beside the formulas")
    fsub = p.add_subparsers(dest="flops_command")
    config_flags(p, any_model=True)
    p.add_argument("--batch-size", type=number(int, 1), default=1, help="sequences counted (default 1)")
    p.add_argument("--seq-len", type=number(int, 0), default=0, help="default: model.block_size")
    p.add_argument("--device", type=device_arg, default="meta", help="meta (default: nothing allocated), cpu or cuda")
    p.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    p.set_defaults(func=cmd_flops)
    q = fsub.add_parser("sweep", parents=[threads_flag()], help="counted/6N and counted/PaLM over model sizes, timed steps, plot")
    q.add_argument("--out", default="runs/flops-sweep", help="folder for sweep.json, .md, .png (default runs/flops-sweep)")
    q.add_argument("--device", type=device_arg, default="cpu", help="where the small models are timed (default cpu)")
    q.add_argument("--steps", type=number(int, 1), default=7, help="timed training steps per small model")
    q.add_argument("--no-gpt3", action="store_true", help="leave out the GPT-3 family (counted on meta)")
    q.set_defaults(subfunc=cmd_flops_sweep)
    _add_memory_command(sub)
    _add_simulate_command(sub)
    _add_bench_command(sub)


def _add_memory_command(sub) -> None:
    p = sub.add_parser("memory", parents=[threads_flag()], help="training memory by category: predicted vs measured, ZeRO table")
    config_flags(p, any_model=True)
    p.add_argument("--batch-size", type=number(int, 0), default=0, help="default: train.micro_batch_size")
    p.add_argument("--seq-len", type=int, default=0, help="default: model.block_size")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="default: train.precision (bf16 with --params)")
    p.add_argument("--dp", type=number(int, 1, 1 << 20), default=1, help="data-parallel degree for the ZeRO table")
    p.add_argument("--device", type=device_arg, default="cpu", help="where memory is measured (default cpu)")
    p.add_argument("--fake", action="store_true", help="fake tensors: any size, nothing allocated")
    p.add_argument("--recompute", action="store_true", help="activation checkpointing")
    p.add_argument("--params", type=number(float, 0, 1e15, lo_open=True),
                   help="skip the model: ZeRO table for this many parameters (at most 1e15)")
    p.add_argument("--run", help="a DeepSpeed run directory: its per-rank memory beside the ZeRO formulas")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout, nothing else")
    p.set_defaults(func=cmd_memory)


def _add_simulate_command(sub) -> None:
    p = sub.add_parser("simulate", help="one training step on N simulated ranks (FSDP2/tensor parallel on a fake "
                                        "process group): memory and communication per rank beside the formulas")
    config_flags(p, any_model=True)
    p.add_argument("--plan", type=plan_arg, default="", metavar="SPEC",
                   help=f"the parallel layout, e.g. dp=128,tp=8,pp=1,zero=3 (keys {', '.join(PLAN_KEYS)}; zero defaults "
                        f"to 3; the same spelling as train and extrapolate)")
    p.add_argument("--world", type=number(int, 1, 1 << 20), help="ranks (GPUs) in all: dp = world / (tp x pp) when "
                                                                  "--plan gives no dp")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="bf16", help="compute and gather dtype")
    p.add_argument("--reduce-precision", choices=["fp32", "bf16", "fp16"],
                   help="gradient reduction dtype (default: --precision, the ZeRO paper's 16-bit gradients)")
    p.add_argument("--micro-batch", type=number(int, 1), default=1, help="sequences per rank")
    p.add_argument("--micro-batches", type=number(int, 1, 1 << 20), default=0,
                   help="pipeline micro-batches per step, m (bubble, traffic per step; default: 4 x pp, said as assumed)")
    p.add_argument("--seq-len", type=number(int, 0), default=0, help="default: model.block_size")
    p.add_argument("--recompute", action="store_true", help="activation checkpointing per block")
    p.add_argument("--gpu", default="H100", help="GPU whose links and peak time the step (default H100)")
    p.add_argument("--mfu", type=number(float, 0, 1, lo_open=True), help="compute MFU (default: predicted by the "
                   "step-time model for the stage)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout, nothing else")
    p.set_defaults(func=cmd_simulate)


def _add_bench_command(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks of this machine")
    bsub = p.add_subparsers(dest="bench_command", required=True)
    q = bsub.add_parser("hardware", parents=[threads_flag()], help="measure matmul TFLOP/s per dtype and memory bandwidth")
    q.add_argument("--device", type=device_arg, default="auto", help="the device to measure (default: CUDA if present)")
    q.add_argument("--size", type=number(int, 0, 32768), default=0, help="matmul size (default 2048 on CPU, 8192 on GPU)")
    q.add_argument("--repeats", type=number(int, 0, 1000), default=0, help="timed repeats, best kept (default 8 on CPU)")
    q.add_argument("--out", help="also write the JSON here (usable as train.peak_from, and with --sweep as "
                                 "extrapolate/backtest --hardware)")
    q.add_argument("--sweep", action="store_true", help="also time a grid of GEMM shapes: the efficiency curve the "
                                                        "step-time model reads from --hardware")
    q.add_argument("--collectives", action="store_true", help="instead, under torchrun: all-reduce / all-gather / "
                                                              "reduce-scatter bus bandwidth by size (nccl-tests' units)")
    q.add_argument("--json", action="store_true", help="one JSON object on stdout, nothing else")
    q.set_defaults(func=cmd_bench_hardware)
    q = bsub.add_parser("decode", parents=[threads_flag(), quantize_flag()], help="decode tokens/s (total and per sequence) against batch and context, beside the "
                                       "rooflines; JSON and PNG")
    q.add_argument("--run", help="a run directory (its weights)")
    config_flags(q, any_model=True)
    q.add_argument("--batch", type=number(int, 1, 4096), action="append", help="batch sizes (default 1, 2, 4, 8, 16, 32)")
    q.add_argument("--context", type=number(int, 1), action="append", help="prompt lengths (default 16 and block_size/2)")
    q.add_argument("--new-tokens", type=number(int, 2, 100000), default=32, help="tokens decoded per point (default 32)")
    q.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="weights and cache dtype (default fp32)")
    q.add_argument("--compile", action="store_true", help="compiled decode step")
    q.add_argument("--device", type=device_arg, default="auto", help="the device to measure (default: CUDA if present)")
    q.add_argument("--out", default="runs/decode_curve.json", help="the JSON; the PNG is written beside it")
    q.set_defaults(func=cmd_bench_decode)
    q = bsub.add_parser("serve", help="load a running server on this machine (Poisson arrivals): TTFT, time per output "
                                      "token, latency percentiles, throughput and per-user tokens/s; JSON and PNG")
    q.add_argument("--url", default="http://127.0.0.1:8000/v1", help="the server's /v1 URL (this machine only)")
    q.add_argument("--rate", type=number(float, 0, 1e4), action="append",
                   help="arrivals per second; repeat for a sweep (default 2; 0: all at once)")
    q.add_argument("--arrivals", choices=("poisson", "fixed"), default="poisson", help="gaps between arrivals")
    q.add_argument("--requests", type=number(int, 1, 10_000), default=32, help="requests per rate (default 32)")
    q.add_argument("--concurrency", type=number(int, 1, 1024), default=16, help="most requests in flight (default 16)")
    q.add_argument("--prompt-tokens", type=span_arg, default=(16, 64), help="prompt length range LO:HI (default 16:64)")
    q.add_argument("--output-tokens", type=span_arg, default=(32, 64), help="max_tokens range LO:HI (default 32:64)")
    q.add_argument("--output-dist", choices=("uniform", "exponential"), default="uniform",
                   help="max_tokens drawn uniformly from LO:HI, or LO + an exponential draw capped at HI (real answers' "
                        "long tail)")
    q.add_argument("--output-mean", type=number(float, 1, 1e6), help="the exponential's mean (default: the middle of LO:HI)")
    q.add_argument("--seed", type=number(int, 0), default=0, help="seed of the lengths, prompts and gaps")
    q.add_argument("--api-key", help="the server's key (default: $MINIGPT_API_KEY)")
    q.add_argument("--ttft-slo-ms", type=number(float, 0, 1e7, lo_open=True), default=1000.0,
                   help="goodput's time-to-first-token target (default 1000 ms)")
    q.add_argument("--tpot-slo-ms", type=number(float, 0, 1e7, lo_open=True), default=1000 / 30,
                   help="goodput's time-per-output-token target (default 33.3 ms: 30 tokens/s, a reader's pace)")
    q.add_argument("--out", help="also write the JSON here, the plot beside it (.png)")
    q.add_argument("--json", action="store_true", help="one JSON object on stdout, nothing else")
    q.set_defaults(func=cmd_bench_serve)
