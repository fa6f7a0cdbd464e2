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

    targs = argparse.Namespace(config=args.config, set=[f"train.out_dir={args.out_dir}", *args.set],
                               resume=None, stop_at=None, overwrite=True)
    cfg, _ = config_from_args(targs)
    print(f"== minigpt quickstart: {cfg.model.n_layer}-layer GPT on '{cfg.data.source}' -> {cfg.train.out_dir}")
    from minigpt.train import train

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

    p = sub.add_parser("quickstart", help="the main job: prepare stdlib text, train the tiny GPT, sample")
    p.add_argument("--config", default="tiny")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--out-dir", default="runs/quickstart")
    p.set_defaults(func=cmd_quickstart)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
