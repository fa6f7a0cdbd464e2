"""Commands that cost a model at scale: extrapolate (and extrapolate plot) and backtest; the flags become an
analytic Scenario (analytic/scenario.py)."""

from __future__ import annotations

import sys
from pathlib import Path

from minigpt.commands.flags import device_arg, number, plan_arg, tokens_arg
from minigpt.core.errors import UserError
from minigpt.core.fmt import fit, to_json
from minigpt.core.plan import parse_keys


def _training_context(args, cfg) -> tuple[int | None, str]:
    """extrapolate's training sequence length and where it comes from."""
    from pathlib import Path

    if getattr(args, "seq_len", None):
        return args.seq_len, "given (--seq-len)"
    target = Path(getattr(args, "target", "") or "")
    if target.is_dir() and (target / "latest.json").exists():  # a minigpt run
        return None, f"the run's model.block_size ({cfg.model.block_size:,}), the context it trained at"
    if target.suffix == ".json" or target.is_dir():
        return None, (f"the HF config's max_position_embeddings ({cfg.model.block_size:,}), its longest context, not "
                      f"necessarily the one it trained at: give --seq-len")
    return None, "the preset's block_size"


def _extrapolate_plan(text: str, cfg) -> dict:
    """extrapolate --plan: its keys (a plan naming an engine with one ZeRO stage means that stage), or with
    `published` the target's published layout's."""
    if text != "published":
        keys = parse_keys(text)
        if "backend" not in keys:
            return keys
        from minigpt.parallel.registry import default_zero  # the engines' rules (imports torch)

        return {**keys, "zero": default_zero(keys, 1)}
    if not cfg.target.published_plan:
        raise UserError("--plan published: this target has no published layout (target.published_plan); give the keys, "
                        "e.g. --plan tp=8,pp=8")
    return parse_keys(cfg.target.published_plan, "target.published_plan")


def _hardware_file(args) -> tuple[dict, str] | None:
    """--hardware: a `bench hardware` result and its name, for the step-time model."""
    from minigpt.core.config import read_json

    return (read_json(Path(args.hardware), "--hardware"), args.hardware) if args.hardware else None


def _kernels(args, cfg) -> str:
    """--kernels, checked before any work: it shapes the step-time model's prediction alone, and eager counts
    cover dense blocks without dropout or QK-norm."""
    if args.kernels == "eager":
        from minigpt.analytic.eager import check_covered

        given = args.mfu is not None or args.from_run or args.from_bench or args.measure_layers
        if given or args.efficiency == "assumed":
            raise UserError("--kernels eager shapes the predicted efficiency: drop --mfu, --from-run, --from-bench, "
                            "--measure-layers or --efficiency assumed, or drop --kernels")
        check_covered(cfg.model, "--kernels fused")
    return args.kernels


def scenario_from_args(args, cfg):
    from minigpt.analytic.measured_mfu import mfu_from_bench, mfu_from_run
    from minigpt.analytic.scenario import WORDS_PER_TOKEN, Scenario
    from minigpt.analytic.serving import decode_efficiency, read_serve_bench, speculate_factor
    from minigpt.core.hardware import gpu_by_name
    from minigpt.core.resolve import target_config

    gpu = gpu_by_name(args.gpu)
    if args.internode_gbs is not None:  # the network every figure uses: step time, transfers, simulate's links
        import dataclasses

        gpu = dataclasses.replace(gpu, internode_gbs=args.internode_gbs)
    kernels = _kernels(args, cfg)
    mfu, source, notes = args.mfu, "given (--mfu)" if args.mfu is not None else "", []
    if args.from_run:
        mfu, source = mfu_from_run(args.from_run, gpu)
    elif args.from_bench:
        mfu, source = mfu_from_bench(args.from_bench, gpu)
    elif args.measure_layers:
        from minigpt.measure.counted import measured_mfu

        mfu, source, args._measured_layers = measured_mfu(cfg.model, args.measure_layers, args.measure_micro_batch,
                                                          args.measure_precision, args.measure_device)
        if args._measured_layers["device"] == "cpu":
            notes.append("layers timed on a CPU: its efficiency stands in for the target GPU's")
    tokens = args.tokens
    serve = None
    if args.serve:
        tpr = args.tokens_per_request or (args.words_per_request / WORDS_PER_TOKEN if args.words_per_request else None)
        serve = {"users": args.users, "requests_per_hour": args.requests_per_hour, "tokens_per_request": tpr,
                 "utilisation": args.utilisation, "tokens_per_s_per_user": args.tokens_per_s_per_user,
                 "user_speed_source": "given (--tokens-per-s-per-user)" if args.tokens_per_s_per_user else None,
                 "efficiency": decode_efficiency(args.from_decode_bench) if args.from_decode_bench else None,
                 "serve_bench": read_serve_bench(args.from_serve_bench) if args.from_serve_bench else None,
                 "speculate": speculate_factor(args.speculate) if args.speculate else None}
    if cfg.target.label:
        notes.append(cfg.target.label)
    seq_len, seq_source = _training_context(args, cfg)
    return Scenario(gpu, dtype=args.dtype, num_gpus=args.num_gpus, days=args.days, mfu=mfu, mfu_source=source,
                    efficiency=args.efficiency, kernels=kernels, quantize=args.quantize or "",
                    student=target_config(args.distilled).model if args.distilled else None, student_name=args.distilled or "",
                    seq_len=seq_len, seq_source=seq_source,
                    price_per_gpu_hour=args.price, tokens=tokens, flops_convention=args.flops_convention,
                    plan=_extrapolate_plan(args.plan, cfg), micro_batch=args.micro_batch or 1,
                    micro_batch_given=args.micro_batch is not None, settings=step_settings(args),
                    global_batch_tokens=args.global_batch_tokens,
                    context=args.context, batch=args.batch, serve=serve, notes=notes,
                    hardware=_hardware_file(args))


def cmd_rlhf(args) -> None:
    """extrapolate --rlhf: the SFT + reward model + RLHF pipeline of a target, beside DeepSpeed-Chat's times."""
    from minigpt.analytic.rlhf import RLHFJob, rlhf_lines, rlhf_report
    from minigpt.core.resolve import target_config

    job = RLHFJob(target_config(args.target).model, target_config(args.reward_target).model, args.queries,
                  args.prompt_tokens, args.answer_tokens, args.gen_batch_per_gpu, args.gen_tp, args.actor_lora,
                  ppo_epochs=args.ppo_epochs, method=args.rl, group=args.group, sft_tokens=args.sft_tokens,
                  rm_pairs=args.rm_pairs)
    r = rlhf_report(job, args.gpu, args.num_gpus or 8, args.price, args.target)
    print(to_json(r) if args.json else fit(rlhf_lines(r)))


def cmd_extrapolate(args) -> None:
    from minigpt.analytic.extrapolate import extrapolate
    from minigpt.analytic.report import extrapolation_lines, extrapolation_markdown
    from minigpt.core.resolve import target_config

    if args.rlhf:
        return cmd_rlhf(args)
    cfg = target_config(args.target)
    if args.step_plot:
        from minigpt.core.plots import check_image_path

        check_image_path(args.step_plot, "--step-plot")
        if args.efficiency != "predicted":
            raise UserError("--step-plot draws the step-time model's layouts: drop --efficiency assumed")
    s = scenario_from_args(args, cfg)
    if args.comm == "counted":
        from minigpt.measure.simulate import layout_simulator

        s.simulator = layout_simulator(s.gpu, s.micro_batch, s.notes)
    r = extrapolate(cfg.model, cfg.target, s)
    if getattr(args, "_measured_layers", None):
        r["measured_layers"] = args._measured_layers
    if args.step_plot:
        from minigpt.core.plots import plot_layout_steps

        lay = r["memory"]["layout"]
        plot_layout_steps(lay["alternatives"], args.step_plot, f"{args.target} on {lay['gpus_given']:,} x {r['gpu']}")
    if args.json:
        print(to_json(r))
    elif args.markdown:
        print(extrapolation_markdown(r, f"minigpt extrapolation: {args.target} on {r['gpu']}"))
    else:
        print(fit(extrapolation_lines(r)))


def cmd_backtest(args) -> None:
    from minigpt.analytic.published import TABLE, backtest
    from minigpt.analytic.report import backtest_lines, backtest_markdown

    if args.plot:
        from minigpt.core.plots import check_image_path

        check_image_path(args.plot, "--plot")
    b = backtest(Path(args.table) if args.table else TABLE, _hardware_file(args), args.latency)
    if args.plot:
        from minigpt.core.plots import plot_step_parts

        plot_step_parts(b["runs"], args.plot, "minigpt backtest: predicted step by part")
        print(f"wrote {args.plot}: each run's predicted step by part", file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(to_json(b))
    elif args.markdown:
        print(backtest_markdown(b))
    else:
        print(fit(backtest_lines(b)))


def cmd_extrapolate_plot(args) -> None:
    from minigpt.apps.cost_plot import cost_points
    from minigpt.core.hardware import gpu_by_name
    from minigpt.core.plots import check_image_path, plot_costs

    check_image_path(args.out, make_parents=True)
    gpu = gpu_by_name(args.gpu)
    points = cost_points(gpu, args.mfu, args.run)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    plot_costs(points, args.out, gpu.name, args.mfu, 1024)
    if args.json:
        print(to_json({"plot": args.out, "points": points}))
        return
    how = (f"at a given {args.mfu:.0%} MFU" if args.mfu else "at each model's MFU predicted by the step-time model on "
           "its fastest layout (" + ", ".join(f"{p['name']} {p['mfu']:.1%}" for p in points if "mfu" in p) + ")")
    print(f"wrote {args.out}: training GPU-hours of {len(points)} models on 1,024 x {gpu.name} {how}")


def _add_serving_flags(p) -> None:
    """extrapolate's serving scenario: the load, the per-user speed, and what was measured or assumed."""
    p.add_argument("--serve", action="store_true", help="add a serving scenario")
    p.add_argument("--users", type=number(float, 0, lo_open=True), default=1e6, help="concurrent users at peak")
    p.add_argument("--requests-per-hour", type=number(float, 0, lo_open=True), default=6, help="requests per user per hour (default 6)")
    p.add_argument("--tokens-per-request", type=number(float, 0, lo_open=True), help="generated tokens per request (instead of words)")
    p.add_argument("--words-per-request", type=number(float, 0, lo_open=True), default=60, help="converted at 1000 tokens = 750 words")
    p.add_argument("--utilisation", type=number(float, 0, 1, lo_open=True), default=0.3, help="assumed serving utilisation of the peak (default 0.3)")
    p.add_argument("--tokens-per-s-per-user", type=number(float, 0, lo_open=True),
                   help="decode speed each user must get (default 30 tokens/s: an assumed reading speed)")
    p.add_argument("--from-serve-bench", metavar="FILE",
                   help="with --serve: also size the fleet from a 'minigpt bench serve' result (measured servers at the "
                        "per-user speed), beside the roofline estimate; --target must be the model it served")
    p.add_argument("--from-decode-bench", metavar="FILE",
                   help="a 'minigpt bench decode' curve: its measured fraction of the bandwidth bound per batch replaces --utilisation")
    p.add_argument("--speculate", metavar="X|FILE", help="speculative decoding's speed-up: a factor or a bench_speculative.py result")
    p.add_argument("--quantize", choices=("int8", "int4"),
                   help="with --serve: also size the fleet for weight-only quantized weights (1 or 0.625 bytes a weight)")
    p.add_argument("--distilled", metavar="TARGET",
                   help="with --serve: also size the fleet for a distilled student (a preset, TOML or config.json) instead")


def _add_rlhf_flags(p) -> None:
    g = p.add_argument_group("post-training (--rlhf; defaults: DeepSpeed-Chat's recipe and released scripts)")
    g.add_argument("--rlhf", action="store_true", help="price SFT + reward model + RLHF (PPO) for --target instead, beside "
                                                      "DeepSpeed-Chat's published times (default 8 GPUs)")
    g.add_argument("--reward-target", default="gpt3-medium", help="the reward model and critic (default gpt3-medium: 350M)")
    g.add_argument("--queries", type=number(int, 1, 10**10), default=131_900, help="RLHF prompts (default 131,900)")
    g.add_argument("--prompt-tokens", type=number(int, 1, 1 << 20), default=256, help="tokens per prompt (default 256)")
    g.add_argument("--answer-tokens", type=number(int, 1, 1 << 20), default=256, help="tokens per answer (default 256)")
    g.add_argument("--gen-batch-per-gpu", type=number(int, 1, 1 << 16), default=4, help="prompts a GPU generates for "
                                                                                       "per round (default 4)")
    g.add_argument("--gen-tp", type=number(int, 1, 1024), default=1, help="GPUs per generating replica (default 1)")
    g.add_argument("--actor-lora", action="store_true", help="the actor trains LoRA adapters (no weight gradients)")
    g.add_argument("--ppo-epochs", type=number(int, 1, 100), default=1, help="PPO epochs per batch (default 1)")
    g.add_argument("--rl", choices=("ppo", "grpo"), default="ppo", help="ppo (DeepSpeed-Chat) or grpo (no critic or "
                                                                       "reward model; --group answers per query)")
    g.add_argument("--group", type=number(int, 2, 1024), default=8, help="grpo: answers per query (default 8)")
    g.add_argument("--sft-tokens", type=number(float, 0, 1e15), default=0.0, help="step 1's trained tokens (default 0)")
    g.add_argument("--rm-pairs", type=number(float, 0, 1e13), default=0.0, help="step 2's preference pairs (default 0)")


def _add_step_settings(p) -> None:
    """How the predicted step runs (analytic/scenario.SETTINGS): each defaults to Megatron-Core's way at scale, and
    each not given is tried at its other values for the band."""
    g = p.add_argument_group("step settings (default: Megatron-Core's at scale; those not given widen the band)")
    g.add_argument("--recompute", choices=("none", "selective", "op", "full"), help="activation recompute (default full)")
    g.add_argument("--attention", choices=("flash", "materialized"), help="attention kernel (default flash)")
    g.add_argument("--flash-kernel", choices=("fast", "fa2"), help="flash kernel rate on H100/H200: cuDNN/FA3-class "
                   "(default) or FlashAttention-2")
    g.add_argument("--overlap", choices=("none", "backward", "prefetch", "full"),
                   help="what the backend hides: none, backward (DDP buckets), prefetch (FSDP), full (Megatron-Core; default)")
    g.add_argument("--reduce-dtype", choices=("bf16", "fp32"), help="gradient reduction dtype (default fp32)")
    g.add_argument("--loss", choices=("fused", "megatron", "torch"), help="how the cross-entropy runs: one fused kernel, "
                   "Megatron's unfused one over fp32 logits (default), or F.cross_entropy over fp32 logits")
    g.add_argument("--latency", choices=("none", "nccl"), help="collective latency: none (bandwidth terms only; "
                   "default) or nccl (each NCCL collective's latency as NCCL's own tuning model sizes it)")
    g.add_argument("--stage-layers", type=_stage_layers, metavar="FIRST,LAST",
                   help="layers on the first and last pipeline stages (Megatron's; default an even split)")
    g.add_argument("--internode-gbs", type=number(float, 0, 1e4, lo_open=True),
                   help="GB/s per GPU per direction between nodes (default: the GPU's DGX network)")
    g.add_argument("--global-batch-tokens", type=number(float, 1, 1e10),
                   help="tokens per optimizer step (default: the target's, else 4,194,304)")
    g.add_argument("--capacity-factor", type=number(float, 0, 64), help="a mixture's expert capacity (default 0: dropless)")
    g.add_argument("--expert-imbalance", type=number(float, 1, 64),
                   help="dropless: the busiest expert-parallel rank's tokens over the mean (default 1; the band tries 1.25)")


def _stage_layers(text: str) -> tuple[int, int]:
    import argparse

    first, sep, last = text.partition(",")
    try:
        values = (int(first), int(last))
    except ValueError:
        values = ()
    if not sep or len(values) != 2 or min(values) < 0:
        raise argparse.ArgumentTypeError(f"{text!r:.40} is not FIRST,LAST (two whole numbers >= 0, e.g. 7,7)")
    return values


def step_settings(args) -> dict:
    """The step settings given on the command line, by SETTINGS name."""
    given = {key: getattr(args, key) for key in ("recompute", "attention", "flash_kernel", "overlap", "reduce_dtype",
                                                  "loss", "latency", "internode_gbs", "capacity_factor", "expert_imbalance")}
    if args.stage_layers:
        given["first_stage_layers"], given["last_stage_layers"] = args.stage_layers
    return {k: v for k, v in given.items() if v is not None}


def _add_extrapolate_command(sub) -> None:
    p = sub.add_parser("extrapolate", help="training and serving cost of a target (GPT-3, GPT-4, a TOML) on a GPU")
    xsub = p.add_subparsers(dest="extrapolate_command")
    p.add_argument("--target", default="gpt3-175b", help="a preset with a [target] table (gpt3-*, gpt4), a TOML path, or a Hugging "
                                                         "Face config.json (with --tokens)")
    p.add_argument("--gpu", default="A100", help="V100, A100 (80GB), A100-40GB, H100, H200, B200")
    p.add_argument("--dtype", default="bf16", help="the peak's dtype: bf16, fp16, fp8, tf32, fp32")
    p.add_argument("--num-gpus", type=number(int, 1, 1 << 20), help="GPUs to train on (default 1024, an assumption; or solved from --days)")
    p.add_argument("--days", type=number(float, 0, lo_open=True), help="wall-clock budget: solve for the GPU count")
    p.add_argument("--mfu", type=number(float, 0, 1, lo_open=True), help="model FLOPs utilisation in (0, 1]")
    p.add_argument("--efficiency", choices=("predicted", "assumed"), default="predicted",
                   help="without --mfu/--from-run/--from-bench: the step-time model's MFU (predicted, default) or the "
                        "GPU class's published reference MFU (assumed)")
    p.add_argument("--kernels", choices=("fused", "eager"), default="fused",
                   help="how the step-time model counts norms, activations and rotary embeddings: fused kernels "
                        "(torch.compile, Megatron; default) or eager PyTorch, one kernel per op (dense blocks, "
                        "no dropout)")
    p.add_argument("--hardware", metavar="FILE", help="the step-time model reads GEMM rates and HBM bandwidth measured on "
                                                      "--gpu (`minigpt bench hardware --sweep --out FILE` there)")
    p.add_argument("--step-plot", metavar="PNG", help="draw the predicted step of the five fastest layouts that fit, "
                                                      "stacked by part (seconds)")
    p.add_argument("--from-run", help="use the MFU a minigpt run measured (its report.json)")
    p.add_argument("--from-bench", help="use the MFU in a benchmark JSON line")
    p.add_argument("--measure-layers", type=number(int, 0, 1000), default=0, metavar="K", help="time K full-width layers here")
    p.add_argument("--measure-micro-batch", type=number(int, 1), default=1, help="with --measure-layers: sequences per timed step")
    p.add_argument("--measure-precision", default="bf16", choices=["fp32", "bf16", "fp16"], help="with --measure-layers: the dtype timed")
    p.add_argument("--measure-device", type=device_arg, default="auto", help="with --measure-layers: where to time")
    p.add_argument("--price", type=number(float, 0), help="USD per GPU-hour (default: an assumption per GPU type)")
    p.add_argument("--tokens", type=tokens_arg, help="training tokens, or 'chinchilla' (20 per parameter)")
    p.add_argument("--flops-convention", default="exact", help="exact, six_n_all, kaplan_6n, palm, chinchilla, megatron_72, ...")
    p.add_argument("--plan", type=plan_arg, default="", metavar="SPEC",
                   help="fix (part of) the parallel layout, e.g. tp=8,pp=15 or dp=32,tp=8,pp=4,zero=1 (the spelling "
                        "train and simulate take); what it leaves out is searched; zero defaults to 1; 'published': "
                        "the target's published layout (gpt4, mt-nlg-530b), which is otherwise shown beside the search's")
    p.add_argument("--comm", choices=["formula", "counted"], default="formula",
                   help="counted: simulate the suggested layout on fake ranks (minigpt simulate) for its communication "
                        "and per-GPU memory; layouts whose simulated memory does not fit are rejected")
    p.add_argument("--micro-batch", type=number(int, 1), help="sequences per GPU per micro-step (memory, bubble; default 1, "
                   "and the band tries 2)")
    _add_step_settings(p)
    p.add_argument("--seq-len", type=number(int, 1, 1 << 22), help="training context in tokens (default: the preset's "
                   "block_size; for an HF config.json its max_position_embeddings, said as such)")
    p.add_argument("--context", type=number(int, 1), help="inference context (default: block_size / 2)")
    p.add_argument("--batch", type=number(int, 1), default=1, help="inference batch for the decode bound")
    _add_serving_flags(p)
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="one JSON object on stdout, nothing else")
    fmt.add_argument("--markdown", action="store_true", help="the report as Markdown")
    _add_rlhf_flags(p)
    p.set_defaults(func=cmd_extrapolate)
    q = xsub.add_parser("plot", help="training cost against model size, log-log")
    q.add_argument("--gpu", default="A100", help="the GPU to cost on (default A100)")
    q.add_argument("--mfu", type=number(float, 0, 1, lo_open=True), help="one MFU for every model (default: each "
                   "model's predicted by the step-time model)")
    q.add_argument("--run", action="append", default=[], help="a measured run directory to add")
    q.add_argument("--out", default="runs/extrapolate.png", help="the image to write (default runs/extrapolate.png)")
    q.add_argument("--json", action="store_true", help="one JSON object on stdout, nothing else")
    q.set_defaults(subfunc=cmd_extrapolate_plot)


def add_parsers(sub) -> None:
    """extrapolate (and extrapolate plot), backtest."""
    _add_extrapolate_command(sub)
    p = sub.add_parser("backtest", help="the step-time model against published training runs (predicted vs published)")
    p.add_argument("--table", help="a published-runs TOML (default: the one shipped, minigpt/analytic/published_runs.toml)")
    p.add_argument("--plot", metavar="PNG", help="also draw each run's predicted step by part (stacked bars)")
    p.add_argument("--hardware", metavar="FILE", help="GEMM rates and HBM bandwidth measured on a GPU (`minigpt bench "
                                                      "hardware --sweep --out FILE`) for the runs on that GPU")
    p.add_argument("--latency", choices=("none", "nccl"), help="count each NCCL collective's latency in every run (nccl) "
                   "or not (none); default: as each run's table entry says (none: the model's default)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="one JSON object on stdout, nothing else")
    out.add_argument("--markdown", action="store_true", help="a Markdown table")
    p.set_defaults(func=cmd_backtest)
