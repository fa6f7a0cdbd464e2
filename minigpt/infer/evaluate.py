"""Scoring a run on text: loss in nats per token, perplexity and bits per byte, on any text the data layer
reads (a file, a folder, a glob, jsonl/parquet/csv, a `datasets` folder, "stdlib", "hf:NAME") or on the run's
own splits (`val`, `train`).

Texts longer than the context are scored with a sliding window: windows of `context` tokens advance by
`stride`, the first scores all its tokens and each later one only its last `stride` (those not scored yet),
so every token is predicted once, from at least context - stride tokens of history (the usual strided
perplexity). Documents are joined with the tokenizer's end-of-text token, as in training; a target that is a
special token has no bytes and is left out of both the loss and the byte count.

Bits per byte = summed nats / (ln 2 x bytes of UTF-8 text the scored tokens stand for): comparable across
tokenizers, unlike nats per token (nanochat reports it; Gao et al. 2020, The Pile, use it for the same reason).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from minigpt.core.config import DataConfig
from minigpt.core.errors import UserError
from minigpt.core.progress import Progress
from minigpt.data.sources import load_documents
from minigpt.data.tokenizer import EOT, bits_per_byte, token_bytes

SPLITS = ("val", "train")


@dataclass
class Windows:
    """The sliding windows over `n` tokens: (start, first scored target offset) pairs."""

    n: int
    context: int
    stride: int

    def __iter__(self):
        start = 0
        while True:
            end = min(start + self.context, self.n - 1)  # targets are tokens[start+1 : end+1]
            first = 0 if start == 0 else self.context - self.stride
            yield start, end, first
            if end >= self.n - 1:
                return
            start += self.stride

    def __len__(self) -> int:
        return 1 + max(0, math.ceil((self.n - 1 - self.context) / self.stride))


def text_tokens(source: str, tokenizer, max_tokens: int, cache_dir: str = "") -> tuple[np.ndarray, int]:
    """Tokens of every document of `source` joined with end-of-text (at most max_tokens); the documents read."""
    docs, _ = load_documents(DataConfig(source=source, cache_dir=cache_dir), show=True)
    eot = tokenizer.token_to_id(EOT)
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer.encode(doc.text).ids + ([eot] if eot is not None else []))
        if len(ids) >= max_tokens:
            break
    if len(ids) < 2:
        raise UserError(f"--data {source!r} has fewer than 2 tokens of text: give more text to score")
    return np.asarray(ids[:max_tokens], dtype=np.int64), len(docs)


@dataclass
class Scored:
    logprobs: torch.Tensor  # (T,) fp32: the log-probability of each target under the model (before any sampling)
    greedy: torch.Tensor  # (T,) bool: each target was the model's most likely token
    top: list[dict[int, float]] | None  # per position, the `top` most likely tokens {id: log-probability}


@torch.no_grad()
def row_logprobs(model, rows: list[list[int]], targets: list[list[int]], top: int = 0) -> list[Scored]:
    """The one scorer every log-probability comes from (the eval's bits per byte, the server's logprobs and echo,
    `generate --logprobs`, lm-eval's loglikelihoods): rows of token ids (each at most block_size), right-padded
    into one forward pass; targets[i][t] is the token scored after rows[i][:t + 1] (as long as the row)."""
    device = model.wte.weight.device
    width = max(len(r) for r in rows)
    x = torch.zeros(len(rows), width, dtype=torch.long)
    y = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (r, t) in enumerate(zip(rows, targets)):
        x[i, :len(r)], y[i, :len(t)] = torch.as_tensor(r, dtype=torch.long), torch.as_tensor(t, dtype=torch.long)
    logp = torch.log_softmax(model(x.to(device)).logits.float(), dim=-1).cpu()
    picked = logp.gather(2, y.unsqueeze(-1)).squeeze(-1)
    greedy = logp.argmax(dim=-1) == y
    out = []
    for i, r in enumerate(rows):
        tops = None
        if top:
            values, idx = logp[i, :len(r)].topk(top, dim=-1)
            tops = [dict(zip(a.tolist(), b.tolist())) for a, b in zip(idx, values)]
        out.append(Scored(picked[i, :len(r)], greedy[i, :len(r)], tops))
    return out


@torch.no_grad()
def score(model, tokens: np.ndarray, bytes_of: np.ndarray, context: int, stride: int, batch: int = 8,
          show: bool = True) -> dict:
    """Summed nats, scored tokens and their bytes over `tokens` with a sliding window."""
    windows = list(Windows(len(tokens), context, stride))
    nats = count = num_bytes = 0.0
    special = bytes_of == 0
    with Progress(len(windows), "eval", "windows", enabled=show) as progress:
        for i in range(0, len(windows), batch):
            group = windows[i:i + batch]
            scored = row_logprobs(model, [tokens[start:end].tolist() for start, end, _ in group],
                                  [tokens[start + 1:end + 1].tolist() for start, end, _ in group])
            for row, (start, end, first) in enumerate(group):
                y = torch.from_numpy(tokens[start + 1 + first:end + 1])
                keep = ~torch.from_numpy(special[y.numpy()])
                picked = scored[row].logprobs[first:]
                nats -= picked[keep].double().sum().item()
                count += keep.sum().item()
                num_bytes += float(bytes_of[y.numpy()][keep.numpy()].sum())
            progress.update(len(group))
    return {"nats": nats, "tokens": int(count), "bytes": int(num_bytes)}


def evaluate_text(model, tokenizer, tokens: np.ndarray, context: int | None = None, stride: int | None = None,
                  batch: int = 8, show: bool = True) -> dict:
    """Loss, perplexity and bits per byte of `model` on `tokens`, with the window it used said."""
    block = model.config.block_size
    context = context or block
    stride = stride or max(1, context // 2)
    if not 1 <= context <= block:
        raise UserError(f"--context {context} must be between 1 and the model's block_size = {block}")
    if not 1 <= stride <= context:
        raise UserError(f"--stride {stride} must be between 1 and --context {context}")
    bytes_of = token_bytes(tokenizer, model.config.padded_vocab_size)
    s = score(model.eval(), tokens, bytes_of, context, stride, batch, show)
    if s["tokens"] == 0:
        raise UserError("no token of this text could be scored (only end-of-text tokens): give more text")
    loss = s["nats"] / s["tokens"]
    return {"loss_nats_per_token": loss, "perplexity": math.exp(min(loss, 700.0)),
            "bits_per_byte": bits_per_byte(s["nats"], s["bytes"]), "tokens_scored": s["tokens"],
            "bytes_scored": s["bytes"], "context_tokens": context, "stride_tokens": stride,
            "min_history_tokens": context - stride if len(tokens) - 1 > context else 0,
            "convention": "sliding window: every token predicted once; end-of-text targets left out; bits per byte "
                          "= summed nats / (ln 2 x UTF-8 bytes of the scored tokens)"}


def run_split_tokens(run_dir, cfg, split: str, max_tokens: int) -> np.ndarray:
    """The run's own train or validation split, tokenized with the run's tokenizer (from the token cache)."""
    import dataclasses
    from pathlib import Path

    from minigpt.data.cache import prepare_data

    data = dataclasses.replace(cfg.data, tokenizer=str(Path(run_dir) / "tokenizer.json"))
    tokens = prepare_data(data, cfg.model, log=lambda *a, **k: None).tokens(split)
    return np.asarray(tokens[:max_tokens], dtype=np.int64)


@torch.no_grad()
def token_logprobs(model, ids: list[int], top: int = 0) -> tuple[list, list]:
    """The model's log-probability of every token of `ids` after the first (None for the first), each with
    the longest history a sliding window of block_size allows (exactly a single forward pass when `ids` fits
    block_size + 1, as lm-eval's `hf` model scores), and the `top` most probable tokens at each position
    ({id: log-probability})."""
    block, n = model.config.block_size, len(ids)
    logps: list = [None] * n
    tops: list = [None] * n
    for start, end, first in Windows(n, block, max(1, block // 2)) if n > 1 else []:
        scored = row_logprobs(model, [ids[start:end]], [ids[start + 1:end + 1]], top)[0]
        logps[start + first + 1:end + 1] = scored.logprobs[first:].tolist()
        if top:
            tops[start + first + 1:end + 1] = scored.top[first:]
    return logps, tops


def completion_logprobs(model, tokenizer, prompt_ids: list[int], new_ids: list[int], top: int) -> dict:
    """The log-probabilities of a generated completion (OpenAI's `logprobs` shape): each new token's, and the
    `top` most likely tokens at each position, scored by one forward pass over prompt + completion."""
    lps, tops = token_logprobs(model, prompt_ids + new_ids, top)
    n = len(prompt_ids)
    return {"tokens": [tokenizer.decode([t]) for t in new_ids], "token_logprobs": lps[n:],
            "top_logprobs": [{tokenizer.decode([k]): v for k, v in (d or {}).items()} for d in tops[n:]],
            "convention": "natural log of the model's probability (before temperature/top-k)"}
