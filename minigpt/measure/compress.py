"""Compressed models measured side by side: weight bytes, decode speed and quality of one run in full
precision and weight-only quantized (int8, int4), in one process, interleaved so the machine's drift is
shared. Quality: validation loss and bits per byte on the run's own split (the same windows for every
variant), logits' relative error and greedy-token agreement against full precision on the same prompts."""

from __future__ import annotations

import copy
import statistics

import torch

from minigpt.infer.evaluate import evaluate_text, run_split_tokens
from minigpt.infer.generate import generate_ids
from minigpt.nn.quantize import quantize_model, weight_bytes

VARIANTS = ("fp32", "int8", "int4")


def variants(model) -> dict:
    out = {"fp32": model}
    for mode in VARIANTS[1:]:
        out[mode] = quantize_model(copy.deepcopy(model), mode)
    return out


def decode_tokens_per_s(model, prompts: list[list[int]], new_tokens: int) -> float:
    gen = generate_ids(model, prompts, new_tokens, temperature=0.0)
    return gen.stats()["tokens_per_s"]


def agreement(ref, model, windows: torch.Tensor, prompts: list[list[int]], new_tokens: int) -> dict:
    """On validation windows (teacher-forced: the same context for both): logits' relative error and the
    share of positions whose top token is the reference's. Free-running greedy decoding from the prompts:
    the share of generated tokens equal to the reference's (one flipped token changes the rest of a row)."""
    with torch.no_grad():
        a, b = ref(windows).logits.float(), model(windows).logits.float()
    g_ref = generate_ids(ref, prompts, new_tokens, temperature=0.0).new_tokens
    g = generate_ids(model, prompts, new_tokens, temperature=0.0).new_tokens
    same = sum(p == q for r, s in zip(g_ref, g) for p, q in zip(r, s)) / sum(len(r) for r in g_ref)
    return {"logits_rel_error": round(((b - a).norm() / a.norm()).item(), 5),
            "top1_agreement_teacher_forced": round((a.argmax(-1) == b.argmax(-1)).float().mean().item(), 4),
            "greedy_token_agreement_free_running": round(same, 4)}


def compare(run_dir, model, tokenizer, cfg, batches=(1, 8), new_tokens: int = 48, rounds: int = 3,
            val_tokens: int = 20000) -> list[dict]:
    torch.manual_seed(0)
    models = variants(model)
    c = model.config
    prompt_len = min(32, c.block_size // 2)
    tokens = run_split_tokens(run_dir, cfg, "val", val_tokens)
    span = c.block_size
    windows = torch.as_tensor(tokens[: (len(tokens) // span) * span].astype("int64")).reshape(-1, span)[:16]
    prompts = {b: windows[:b, :prompt_len].tolist() for b in batches}  # real text as prompts
    speeds = {(m, b): [] for m in models for b in batches}
    for _ in range(rounds):  # interleaved: every variant once per round
        for name, m in models.items():
            for b in batches:
                speeds[(name, b)].append(decode_tokens_per_s(m, prompts[b], new_tokens))
    rows = []
    for name, m in models.items():
        ev = evaluate_text(m, tokenizer, tokens, show=False)
        wb = weight_bytes(m)  # an unquantized model: every parameter as stored
        rows.append({"variant": name, "weight_bytes": wb["total_bytes"],
                     "read_per_decode_step_bytes": wb["read_per_decode_step_bytes"],
                     **{f"decode_tokens_per_s_b{b}": round(statistics.median(speeds[(name, b)]), 1) for b in batches},
                     "val_loss_nats": round(ev["loss_nats_per_token"], 5), "val_bpb": round(ev["bits_per_byte"], 5),
                     **(agreement(model, m, windows, prompts[max(batches)], new_tokens) if name != "fp32" else {})})
    return rows
