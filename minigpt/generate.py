"""Text generation with a KV cache: temperature, top-k, top-p, several prompts in one batch.

Prompts of different lengths are left-padded into one batch. Each row gets its own positions
(0 at its first real token) and an attention mask that hides its padding, so a row decodes
exactly as it would alone. With `use_cache=False` every step recomputes the whole sequence; a
test checks that both give the same tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from minigpt import checkpoint
from minigpt.config import Config, config_from_json
from minigpt.errors import UserError
from minigpt.model import GPT


@dataclass
class Generation:
    prompts: list[list[int]]
    new_tokens: list[list[int]]  # per prompt, cut at <|endoftext|> when stop_at_eot
    prefill_s: float  # time of the first forward pass over the (padded) prompts
    decode_s: float  # time of all later steps
    steps: int  # decode steps after prefill (tokens generated per row, before any cut)
    capped: bool  # max_new_tokens was reduced to fit block_size

    def stats(self) -> dict:
        rows = len(self.prompts)
        per_token = self.decode_s / self.steps if self.steps else 0.0
        return {
            "batch": rows,
            "prompt_tokens": sum(len(p) for p in self.prompts),
            "new_tokens": rows * (self.steps + 1),
            "prefill_ms": round(self.prefill_s * 1e3, 3),
            "ms_per_token_step": round(per_token * 1e3, 3),  # one step yields `batch` tokens
            "tokens_per_s": round(rows * self.steps / self.decode_s, 1) if self.decode_s > 0 else None,
            "capped_at_block_size": self.capped,
        }


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator) -> torch.Tensor:
    """logits (B, V) -> next ids (B,). temperature 0 is greedy; top_k 0 and top_p 1 are off."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        # nucleus sampling (Holtzman et al. 2020): keep the smallest set whose mass reaches top_p
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) >= top_p  # mass before this token already enough
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_ids(
    model: GPT,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    use_cache: bool = True,
    eot_id: int | None = None,
) -> Generation:
    block = model.config.block_size
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("a prompt is empty: give at least one character of text to continue")
    longest = max(len(p) for p in prompts)
    if longest > block:
        raise UserError(
            f"a prompt is {longest} tokens long, more than block_size = {block}: shorten the prompt"
        )
    capped = longest + max_new_tokens > block
    max_new_tokens = min(max_new_tokens, block - longest)
    if max_new_tokens <= 0:
        raise UserError(f"a prompt of {longest} tokens fills the whole block_size = {block}: shorten it")
    was_training = model.training
    model.eval()
    device = model.wte.weight.device
    B = len(prompts)
    pad = torch.tensor([longest - len(p) for p in prompts], device=device)  # (B,) left padding
    idx = torch.zeros(B, longest, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        idx[i, longest - len(p):] = torch.tensor(p, dtype=torch.long)
    total = longest + max_new_tokens
    arange = torch.arange(total, device=device)
    positions = (arange.unsqueeze(0) - pad.unsqueeze(1)).clamp(min=0)  # (B, total)
    key_valid = arange.unsqueeze(0) >= pad.unsqueeze(1)  # (B, total)
    padded = bool(pad.any())

    def mask(q_start: int, q_end: int):
        """(B, 1, Tq, S) bool: causal, no padding keys; a padding query sees itself (no NaN rows)."""
        if not padded:
            return None
        q = arange[q_start:q_end].unsqueeze(1)  # (Tq, 1)
        k = arange[:q_end].unsqueeze(0)  # (1, S)
        causal = (k <= q).unsqueeze(0)  # (1, Tq, S)
        m = causal & key_valid[:, None, :q_end]  # (B, Tq, S)
        m = m | (k == q).unsqueeze(0)
        return m.unsqueeze(1)

    generator = torch.Generator(device=device).manual_seed(seed)
    cache = model.make_cache(B, total) if use_cache else None
    seq = idx
    new = []
    t0 = time.perf_counter()
    logits, _ = model(idx, cache=cache, positions=positions[:, :longest], attn_mask=mask(0, longest), last_only=True)
    nxt = sample_next(logits[:, -1], temperature, top_k, top_p, generator)
    new.append(nxt)
    _sync(device)
    prefill_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    for step in range(1, max_new_tokens):
        seq = torch.cat([seq, nxt.unsqueeze(1)], dim=1)
        L = seq.size(1)
        if use_cache:
            logits, _ = model(nxt.unsqueeze(1), cache=cache, positions=positions[:, L - 1 : L],
                              attn_mask=mask(L - 1, L), last_only=True)
        else:
            logits, _ = model(seq, positions=positions[:, :L], attn_mask=mask(0, L), last_only=True)
        nxt = sample_next(logits[:, -1], temperature, top_k, top_p, generator)
        new.append(nxt)
    _sync(device)
    decode_s = time.perf_counter() - t1
    model.train(was_training)
    out = torch.stack(new, dim=1).tolist()  # (B, max_new_tokens)
    if eot_id is not None:
        out = [row[: row.index(eot_id)] if eot_id in row else row for row in out]
    return Generation(prompts, out, prefill_s, decode_s, max_new_tokens - 1, capped)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate_text(model: GPT, tokenizer, prompts: list[str], eot_id: int | None = None, **kw) -> tuple[list[str], Generation]:
    if not prompts or any(p == "" for p in prompts):
        raise UserError("a prompt is empty: give at least one character of text to continue")
    ids = [tokenizer.encode(p).ids for p in prompts]
    gen = generate_ids(model, ids, eot_id=eot_id, **kw)
    texts = [p + tokenizer.decode(n) for p, n in zip(prompts, gen.new_tokens)]
    return texts, gen


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, object, Config, int]:
    """Model (eval mode, on `device`), tokenizer, config and step of a run's latest checkpoint."""
    from tokenizers import Tokenizer

    run_dir = Path(run_dir)
    folder, step = checkpoint.latest_checkpoint(run_dir)
    cfg = config_from_json(run_dir / "config.json")
    model = GPT(cfg.model)
    checkpoint.load_weights(model, folder)
    model.to(device).eval()
    tokenizer = Tokenizer.from_file(str(run_dir / "tokenizer.json"))
    return model, tokenizer, cfg, step
