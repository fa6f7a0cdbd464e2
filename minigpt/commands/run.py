"""Commands that make and train runs: prepare, train, convert, plot, quickstart."""

from __future__ import annotations

import os

from minigpt.commands.flags import STOP_EXIT, add_train_flags, apply_threads, config_flags, log_for, number, threads_flag
from minigpt.core.errors import UserError
from minigpt.core.fmt import to_json


def cmd_prepare(args) -> None:
    from minigpt.core.config import load_config, resolve_preset
    from minigpt.data import cache as data

    cfg = load_config(resolve_preset(args.config), args.set)
    prepared = data.prepare_data(cfg.data, cfg.model, log=(lambda *a, **k: None) if args.json else print)
    if args.json:
        print(to_json({"event": "prepared", "path": str(prepared.path), **prepared.manifest}))
        return
    for line in prepared.summary_lines():
        print(line)
    print(f"cache    {prepared.path}")


def cmd_task(args) -> None:
    from minigpt.data.task import write_task

    made = write_task(args.out, args.seed, args.digits, args.heldout, args.demonstrations)
    if args.json:
        print(to_json({"event": "task", **made}))
        return
    print(f"task     addition of {made['digits']}-digit numbers as chat data: {made['train_problems']:,} train "
          f"({made['demonstrations']:,} with a worked answer for SFT) and {made['heldout_problems']:,} held-out problems "
          f"(seed {made['seed']}) in {made['out']}: {', '.join(made['files'])}")
    print(f"next     minigpt train --config sft-tiny --set train.init_from=RUN --set train.post_data={made['out']}")


def cmd_train(args) -> int:
    from minigpt.core.resolve import train_config
    from minigpt.train.loop import train

    overrides = list(args.set) + ([f"train.threads={args.threads}"] if args.threads else [])
    if args.plan:  # the plan's [train] keys, after --set (the plan spelling wins over a --set of the same key)
        from minigpt.parallel.registry import plan_overrides

        overrides += plan_overrides(args.plan, int(os.environ.get("WORLD_SIZE", "1")))
    cfg = train_config(args.config, overrides, args.resume)
    summary = train(cfg, resume=bool(args.resume), stop_at=args.stop_at, overwrite=args.overwrite, log=log_for(args))
    return STOP_EXIT.get(summary.get("stopped"), 0)


def cmd_quickstart(args) -> int:
    """The main job on the embedded default: prepare stdlib text, train the tiny model, sample."""
    from minigpt.apps.quickstart import quickstart

    threads = [f"train.threads={args.threads}"] if args.threads else []
    summary = quickstart(args.config, [*args.set, *threads], args.out_dir, log=log_for(args))
    return STOP_EXIT.get(summary.get("stopped"), 0)


def cmd_convert(args) -> None:
    apply_threads(args)
    from minigpt.interop.hf import export_hf, import_hf

    if args.quantize_run or args.quantize:
        if not (args.quantize_run and args.quantize):
            raise UserError("minigpt convert --quantize-run RUN --quantize int8|int4 --out DIR: give both")
        from minigpt.apps.quantized_run import save_quantized_run

        info = save_quantized_run(args.quantize_run, args.quantize, args.out)
        print(f"wrote run directory {args.out}: {args.quantize_run} (step {info['step']}) with {args.quantize} weights, "
              f"{info['total_bytes']:,} bytes of weights; try: minigpt generate --run {args.out} --prompt \"...\"")
    elif args.from_hf:
        info = import_hf(args.from_hf, args.out)
        print(f"wrote run directory {args.out}: {info['model_type']} ({info['params']:,} parameters) from {args.from_hf}; "
              f"try: minigpt generate --run {args.out} --prompt \"...\"")
    else:
        info = export_hf(args.to_hf, args.out)
        print(f"wrote {args.out}: {info['architectures'][0]} from {args.to_hf} (step {info['step']}); it loads with "
              f"transformers.AutoModelForCausalLM.from_pretrained({str(args.out)!r})")


def cmd_prune(args) -> None:
    apply_threads(args)
    from minigpt.apps.pruned_run import save_pruned_run

    info = save_pruned_run(args.run, args.heads, args.mlp, args.layers, args.out, args.calibration_batches)
    if args.json:
        print(to_json(info))
        return
    k = info["kept"]
    print(f"wrote run directory {args.out}: {args.run} (step {info['step']}) pruned from {info['params_before']:,} to "
          f"{info['params_after']:,} parameters ({info['params_after'] / info['params_before']:.1%}): {k['n_layer']} layers, "
          f"{k['n_head']} heads ({k['n_kv_head']} key/value), MLP {k['ffn_hidden']} channels ({info['criterion']}); "
          f"recover it with a short training: --set train.init_from={args.out} (and train.distill_from={args.run})")


def cmd_plot(args) -> None:
    from minigpt.core.plots import check_image_path, plot_runs

    check_image_path(args.out)
    runs = plot_runs(args.runs, args.out)
    units = ("bits per byte of the evaluations (the runs' tokenizers differ)" if len({r["tokenizer"] for r in runs}) > 1
             else "nats per token")
    print(f"wrote {args.out}: loss against tokens seen and wall time for {', '.join(r['name'] for r in runs)}, in {units}")


def add_parsers(sub) -> None:
    """prepare, train, convert, plot, quickstart."""
    p = sub.add_parser("prepare", help="tokenize a corpus (cached) and report its size and unigram entropy")
    config_flags(p)
    p.add_argument("--json", action="store_true", help="one JSON object on stdout (the manifest), nothing else")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", parents=[threads_flag()], help="train a model (single process, or under torchrun)")
    add_train_flags(p)
    p.set_defaults(func=cmd_train)


    p = sub.add_parser("task", help="write a synthetic chat task with verifiable answers (addition) for post-training")
    p.add_argument("--out", required=True, help="the folder to write (new, or empty)")
    p.add_argument("--seed", type=number(int, 0, 2**31), default=0, help="which problems are held out (default 0)")
    p.add_argument("--digits", type=number(int, 1, 3), default=2, help="digits per number (default 2: 10,000 problems)")
    p.add_argument("--heldout", type=number(float, 0.01, 0.49), default=0.1, help="fraction held out (default 0.1)")
    p.add_argument("--demonstrations", type=number(int, 1), help="train problems with a worked answer in sft.jsonl "
                   "(default: all); prompts and pairs keep every train problem")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout, nothing else")
    p.set_defaults(func=cmd_task)

    p = sub.add_parser("convert", parents=[threads_flag()], help="import a Hugging Face GPT-2/Llama-family model as a run, or export a run")
    way = p.add_mutually_exclusive_group(required=True)
    way.add_argument("--from-hf", metavar="DIR", help="an HF folder: config.json, *.safetensors, tokenizer.json")
    way.add_argument("--to-hf", metavar="RUN_DIR", help="a minigpt run directory (its latest checkpoint)")
    way.add_argument("--quantize-run", metavar="RUN_DIR", help="a run's latest weights, weight-only quantized, as a new run "
                                                               "(with --quantize int8|int4)")
    p.add_argument("--quantize", choices=("int8", "int4"), help="with --quantize-run: the format")
    p.add_argument("--out", required=True, help="the folder to write (must not exist, or be empty)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("prune", parents=[threads_flag()],
                       help="remove attention heads, MLP channels and layers by importance; write the smaller model as a run")
    p.add_argument("--run", required=True, help="the run to prune (its latest checkpoint; it is left untouched)")
    p.add_argument("--heads", type=number(float, 0, 0.99), default=0.0,
                   help="fraction of attention heads to remove (whole key/value groups; default 0)")
    p.add_argument("--mlp", type=number(float, 0, 0.99), default=0.0,
                   help="fraction of MLP channels to remove (default 0)")
    p.add_argument("--layers", type=number(int, 0, 4096), default=0, help="whole layers to remove (default 0)")
    p.add_argument("--calibration-batches", type=number(int, 1, 1024), default=8,
                   help="batches of 8 validation windows the importance is measured on (default 8)")
    p.add_argument("--out", required=True, help="the new run's folder (must not exist, or be empty)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout (the pruning record), nothing else")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("plot", help="training and validation loss of runs against tokens seen and wall time (PNG)")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories, overlaid")
    p.add_argument("--out", default="loss.png", help="the PNG to write (default: loss.png)")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("quickstart", parents=[threads_flag()], help="the main job: prepare stdlib text, train the tiny GPT, sample")
    p.add_argument("--config", default="tiny-modern", help="the preset or TOML to train (default: tiny-modern, the "
                                                           "speedrun's best recipe on the tiny shape)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value; repeatable (e.g. --set train.max_steps=100)")
    p.add_argument("--out-dir", default="runs/quickstart", help="the run directory (default: runs/quickstart)")
    p.add_argument("--json", action="store_true", help="every line on stderr; stdout holds only the training summary "
                                                   "object")
    p.set_defaults(func=cmd_quickstart)
