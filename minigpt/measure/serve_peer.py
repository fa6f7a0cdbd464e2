"""minigpt serve beside the peer a user would pick, on the same weights, under the same load.

The peer is `transformers serve --continuous-batching` (paged attention, continuous batching) on the run's
`minigpt convert --to-hf` export. Both servers get one torch thread and are pinned to the same core; the load
generator runs on another core. Each load (text prompts, any server takes them; greedy; streamed /v1/completions)
runs against one server and then the other, and the pair is repeated `rounds` times, so a change in the machine's
load falls on both. The answers are hashed per run: the same weights decoding greedily give the same text, which
says the two did the same work (and that minigpt's batching changes no token).
"""

from __future__ import annotations

import random
import shutil
import statistics
from dataclasses import replace

from minigpt.core.errors import UserError
from minigpt.measure.serve_bench import Load, launch, run_load, serve_command, server_model


def text_prompts(tokenizer, texts: list[str], n: int, tokens: int, seed: int = 0, prefix_tokens: int = 0) -> tuple[str, ...]:
    """n prompts of `tokens` tokens each (under the run's tokenizer), cut from the texts at random places; with
    prefix_tokens, every prompt starts with the same prefix of that many tokens (a shared system prompt)."""
    rng = random.Random(seed)
    ids = [t for text in texts for t in tokenizer.encode(text).ids]
    if len(ids) < prefix_tokens + tokens + 1:
        raise UserError(f"the prompt texts hold {len(ids)} tokens: too few for prompts of {tokens} tokens")
    prefix = ids[:prefix_tokens]
    out = []
    for _ in range(n):
        at = rng.randrange(prefix_tokens, len(ids) - tokens)
        out.append(tokenizer.decode(prefix + ids[at:at + tokens]))
    return tuple(out)


def servers(run: str, export: str, port: int, max_batch: int, minigpt_flags: dict[str, list[str]],
            device: str = "cpu") -> dict:
    """name -> (command, URL): each minigpt configuration named in minigpt_flags, and the peer; both on `device`
    (cpu or cuda), fp32 weights."""
    exe = shutil.which("transformers")
    if exe is None:
        raise UserError("the peer needs transformers' CLI: pip install 'transformers[serving]'")
    out = {}
    for i, (name, flags) in enumerate(minigpt_flags.items()):
        out[name] = (serve_command(run, port + i, max_batch, 1, "--device", device, *flags), f"http://127.0.0.1:{port + i}/v1")
    p = port + len(minigpt_flags)
    out["transformers serve"] = ([exe, "serve", export, "--continuous-batching", "--device", device, "--dtype",
                                  "float32", "--host", "127.0.0.1", "--port", str(p)], f"http://127.0.0.1:{p}/v1")
    return out


def compare(commands: dict, loads: dict[str, Load], which: dict[str, list[str]], rounds: int, cpu: int | None,
            progress=print) -> dict:
    """Each server's loads (which: server -> load labels), `rounds` times, the servers in turn within each round
    (one server runs at a time: it starts, takes its loads, and stops). Each figure's median over the rounds."""
    points: dict = {name: {label: [] for label in which[name]} for name in commands}
    for r in range(rounds):
        for name, (cmd, url) in commands.items():
            proc = launch(cmd, url, name, cpu)
            try:
                model = server_model(Load(url))["id"]
                run_load(replace(loads[which[name][0]], url=url, requests=4), model)  # warm: first-call costs
                for label in which[name]:
                    load = loads[label]
                    points[name][label].append(run_load(replace(load, url=url), model))
                    p = points[name][label][-1]
                    progress(f"round {r + 1}/{rounds} {name}, {label}: {p['output_throughput_tokens_per_s']} output "
                             f"tokens/s, TPOT p50 {(p['tpot_ms'] or {}).get('p50')} ms (measured)")
            finally:
                proc.terminate()
                proc.wait(timeout=60)
    return {name: {label: summary(runs) for label, runs in by_load.items()} for name, by_load in points.items()}


def summary(runs: list[dict]) -> dict:
    """The median over runs of the figures a table shows, and every run's throughput."""
    def med(get):
        values = [v for v in (get(p) for p in runs) if v is not None]
        return round(statistics.median(values), 2) if values else None
    return {
        "output_tokens_per_s": med(lambda p: p["output_throughput_tokens_per_s"]),
        "output_tokens_per_s_runs": [p["output_throughput_tokens_per_s"] for p in runs],
        "ttft_ms_p50": med(lambda p: (p["ttft_ms"] or {}).get("p50")),
        "tpot_ms_p50": med(lambda p: (p["tpot_ms"] or {}).get("p50")),
        "itl_ms_p50": med(lambda p: (p["itl_ms"] or {}).get("p50")),
        "per_user_tokens_per_s_p50": med(lambda p: (p["per_user_tokens_per_s"] or {}).get("p50")),
        "goodput_requests_per_s": med(lambda p: p["goodput_requests_per_s"]),
        "failed": sum(p["failed"] for p in runs),
        "output_tokens": runs[0]["output_tokens"], "prompt_tokens_mean": runs[0]["prompt_tokens_mean"],
        "answers_sha256": sorted({p["answers_sha256"] for p in runs}),
    }
