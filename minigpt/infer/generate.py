"""Text generation with a static KV cache: temperature, top-k, top-p, several prompts in one batch.

Prompts of different lengths are left-padded into one batch. Each row gets its own positions
(0 at its first real token) and an attention mask that hides its padding, so a row decodes
exactly as it would alone. The cache is preallocated to the generation's length and written at
the slots of the new tokens (`input_pos`), so every decode step has the same shapes: with
`compile=True` the step is compiled once (with CUDA graphs on a GPU) and replayed. Sampling needs
no host round trip per token (exponential race instead of multinomial; end-of-text is cut after).
With `use_cache=False` every step recomputes the whole sequence; a test checks that both give
the same tokens. Sampling is infer/sampler.py's.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

from minigpt.analytic.memory import inference_bytes, model_bytes
from minigpt.core.device import check_fits
from minigpt.core.errors import UserError
from minigpt.infer.sampler import sample_next
from minigpt.nn.model import GPT, KVCache
from minigpt.nn.torch_private import mark_static_address


@dataclass
class Generation:
    prompts: list[list[int]]
    new_tokens: list[list[int]]  # per prompt, cut at <|endoftext|> when eot_id is given
    prefill_s: float  # time of the first forward pass over the (padded) prompts
    decode_s: float  # time of all later steps
    steps: int  # decode steps after prefill (tokens generated per row, before any cut)
    capped: bool  # max_new_tokens was reduced to fit block_size (learned positions)
    windowed: bool = False  # went past block_size with a sliding window (RoPE)

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
            "sliding_window_past_block_size": self.windowed,
        }


def decode_logits(model: GPT, token: torch.Tensor, input_pos: torch.Tensor, pad: torch.Tensor,
                  cache: KVCache) -> torch.Tensor:
    """One decode step, static shapes: token (B, 1) at slot input_pos (1,) -> logits (B, V).

    Row b's tokens start at slot pad[b]: its position is the slot minus pad[b], and it attends to
    the slots from pad[b] up to input_pos.
    """
    positions = (input_pos.unsqueeze(0) - pad.unsqueeze(1)).clamp(min=0)  # (B, 1)
    slots = torch.arange(cache.max_len, device=token.device)
    visible = (slots.unsqueeze(0) <= input_pos) & (slots.unsqueeze(0) >= pad.unsqueeze(1))  # (B, S)
    out = model(token, input_pos=input_pos, positions=positions, cache=cache, attn_mask=visible[:, None, None, :])
    return out.logits[:, -1]


def _prefill_mask(pad: torch.Tensor, length: int, cache: KVCache | None = None):
    """(B, 1, T, S) bool for left-padded prompts: causal, no padding keys; a padding query sees
    itself (no all-masked rows). S = T, or every cache slot (those after the prompt hidden).
    None when nothing is padded: the model's own causal mask is right."""
    if not bool(pad.any()):
        return None
    slots = cache.max_len if cache is not None else length
    q = torch.arange(length, device=pad.device).unsqueeze(1)  # (T, 1)
    k = torch.arange(slots, device=pad.device).unsqueeze(0)  # (1, S)
    mask = (k <= q).unsqueeze(0) & (k >= pad.view(-1, 1, 1))  # (B, T, S)
    return (mask | (k == q).unsqueeze(0)).unsqueeze(1)


def check_prompts(prompts: list[list[int]], block: int, max_new_tokens: int, window: bool) -> tuple[int, int, bool]:
    """(longest prompt, tokens to generate, capped). With a sliding window (RoPE) generation goes
    on past block_size; with learned positions it stops there (capped)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("a prompt is empty: give at least one character of text to continue")
    longest = max(len(p) for p in prompts)
    if longest > block:
        raise UserError(f"a prompt is {longest} tokens long, more than block_size = {block}: shorten the prompt")
    if longest >= block:
        raise UserError(f"a prompt of {longest} tokens fills the whole block_size = {block}: shorten it")
    if window:
        return longest, max_new_tokens, False
    return longest, min(max_new_tokens, block - longest), longest + max_new_tokens > block


def _window_logits(model: GPT, idx: torch.Tensor, L: int, pad: torch.Tensor) -> torch.Tensor:
    """Logits for token L from the last block_size tokens (a sliding window, RoPE models past
    block_size; also the uncached path): positions restart at the window's first real token."""
    start = max(0, L - model.config.block_size)
    pad_w = (pad - start).clamp(min=0)
    positions = (torch.arange(L - start, device=idx.device).unsqueeze(0) - pad_w.unsqueeze(1)).clamp(min=0)
    return model(idx[:, start:L], positions=positions, attn_mask=_prefill_mask(pad_w, L - start),
                 last_only=True).logits[:, -1]


@torch.no_grad()
def generate_ids(model: GPT, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.8,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0, use_cache: bool = True,
                 eot_id: int | None = None, compile: bool = False, on_token=None) -> Generation:
    """Tokens after each prompt. The static cache holds block_size slots; a RoPE model goes on past
    them with a sliding window of the last block_size tokens (recomputed per token). on_token:
    called with each new column of tokens (a list, one per row): a host sync per token, for
    streaming; when it returns True (every row it serves is done) decoding ends there."""
    block = model.config.block_size
    longest, max_new_tokens, capped = check_prompts(prompts, block, max_new_tokens, model.config.pos_emb == "rope")
    device = model.wte.weight.device
    context = min(longest + max_new_tokens, block)
    check_fits(inference_bytes(model.config, len(prompts), context) - model_bytes(model.config), device,
               f"a KV cache for a batch of {len(prompts)} x {context} tokens", "generate fewer samples at once")
    was_training = model.training
    model.eval()
    B, total = len(prompts), longest + max_new_tokens
    pad = torch.tensor([longest - len(p) for p in prompts], device=device)  # (B,) left padding
    idx = torch.zeros(B, total, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        idx[i, longest - len(p):longest] = torch.tensor(p, dtype=torch.long)
    positions = (torch.arange(min(total, block), device=device).unsqueeze(0) - pad.unsqueeze(1)).clamp(min=0)
    generator = torch.Generator(device=device).manual_seed(seed)
    step = _compiled_decode(device) if compile else decode_logits
    with contextlib.nullcontext() if compile else torch.compiler.set_stance("force_eager"):
        t0 = time.perf_counter()
        logits, cache = _prefill(model, prompts, idx[:, :longest], pad, positions[:, :longest],
                                 min(total, block) if use_cache else 0)
        if cache is not None and compile:
            for t in cache.k + cache.v:
                mark_static_address(t)
        idx[:, longest] = sample_next(logits, temperature, top_k, top_p, generator)
        end = longest + 1 if on_token and on_token(idx[:, longest].tolist()) else total
        _sync(device)
        prefill_s, t1 = time.perf_counter() - t0, time.perf_counter()
        input_pos = torch.tensor([longest], device=device)  # the slot being written, advanced on the device
        for L in range(longest + 1, end):  # L tokens known; write token L-1, predict token L
            if cache is not None and L <= block:
                logits = step(model, idx[:, L - 1:L], input_pos, pad, cache)
                input_pos += 1
            else:
                logits = _window_logits(model, idx, L, pad)
            idx[:, L] = sample_next(logits, temperature, top_k, top_p, generator)
            if on_token and on_token(idx[:, L].tolist()):
                end = L + 1
                break
        _sync(device)
        decode_s = time.perf_counter() - t1
    model.train(was_training)
    out = idx[:, longest:end].tolist()  # (B, new tokens): the one host read of the tokens
    if eot_id is not None:
        out = [row[: row.index(eot_id)] if eot_id in row else row for row in out]
    return Generation(prompts, out, prefill_s, decode_s, end - longest - 1, capped, total > block)


def _prefill(model: GPT, prompts: list[list[int]], idx: torch.Tensor, pad: torch.Tensor, positions: torch.Tensor,
             cache_len: int) -> tuple[torch.Tensor, KVCache | None]:
    """The last prompt position's logits (B, V) and the cache they leave (None when cache_len is 0). A prompt given
    several times (--num-samples, n) is run once: its cache row and logits are copied to its other rows."""
    first: dict[tuple, int] = {}
    rows = [first.setdefault(tuple(p), i) for i, p in enumerate(prompts)]  # each row's first row with its prompt
    unique = sorted(set(rows))
    if len(unique) == len(prompts) or not cache_len:
        cache = model.make_cache(len(prompts), cache_len) if cache_len else None
        return _prefill_rows(model, idx, pad, positions, cache), cache
    cache = model.make_cache(len(unique), cache_len)
    logits = _prefill_rows(model, idx[unique], pad[unique], positions[unique], cache)
    where = torch.tensor([unique.index(r) for r in rows], device=idx.device)
    return logits[where], cache.select_rows(where)


def _prefill_rows(model: GPT, idx, pad, positions, cache) -> torch.Tensor:
    T = idx.size(1)
    return model(idx, input_pos=torch.arange(T, device=idx.device), positions=positions, cache=cache,
                 attn_mask=_prefill_mask(pad, T, cache), last_only=True).logits[:, -1]


_COMPILED: dict = {}


def _compiled_decode(device: torch.device):
    """decode_logits compiled once per device type: CUDA graphs on a GPU (mode reduce-overhead)."""
    if device.type not in _COMPILED:
        mode = "reduce-overhead" if device.type == "cuda" else None
        _COMPILED[device.type] = torch.compile(decode_logits, mode=mode, fullgraph=True)
    return _COMPILED[device.type]


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
