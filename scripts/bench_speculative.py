"""Speculative decoding vs plain decoding of the target, side by side in one process.

    python scripts/bench_speculative.py --target RUN --draft RUN [--k 2 --k 4 --k 6] [--temperature 0]

Prompts are the first lines of the target's validation text; plain decoding and speculative decoding
at each K alternate prompt by prompt, repeat by repeat (the first pass warms up). One JSON line:
the machine, the two models, and per mode tokens/s, speed-up, acceptance rate and tokens per target
forward.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from minigpt.analytic.flops import param_counts
from minigpt.core.device import device_name
from minigpt.core.progress import note
from minigpt.infer.speculative import bench_speculative, check_pair
from minigpt.run.load import load_run

PROMPTS = ["def ", "import os\n", "class ", "    return ", "for i in range(", "if __name__", "# ", "self."]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", required=True)
    p.add_argument("--draft", required=True)
    p.add_argument("--k", type=int, action="append", help="draft tokens per round (default 2, 4, 6)")
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    target, tok, tcfg, tstep = load_run(args.target)
    draft, dtok, dcfg, dstep = load_run(args.draft)
    check_pair(target, draft, tok.get_vocab(), dtok.get_vocab())
    prompts = [tok.encode(t).ids for t in PROMPTS]
    note(f"bench_speculative: plain and speculative decoding at K = {args.k or [2, 4, 6]}, {args.repeats} repeats of "
         f"{len(prompts)} prompts, interleaved; the result is one JSON line on stdout")
    rows = bench_speculative(target, draft, prompts, args.new_tokens, args.k or [2, 4, 6], args.temperature, args.repeats)
    describe = lambda c, s: {"params": param_counts(c.model).total, "n_layer": c.model.n_layer,  # noqa: E731
                             "n_embd": c.model.n_embd, "step": s}
    print(json.dumps({"bench": "speculative", "speculative_on": "the serving engine (minigpt/infer/engine.py)", "device": device_name(torch.device("cpu")), "cpu_cores": os.cpu_count(),
                      "threads": torch.get_num_threads(), "torch": torch.__version__, "temperature": args.temperature,
                      "new_tokens": args.new_tokens, "prompts": len(prompts), "repeats": args.repeats,
                      "target": describe(tcfg, tstep), "draft": describe(dcfg, dstep), "rows": rows}))


if __name__ == "__main__":
    main()
