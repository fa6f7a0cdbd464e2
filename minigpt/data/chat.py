"""Chat data: a template with special tokens, conversations and preference pairs read from JSONL (untrusted),
rendered to token ids with a loss mask, and packed into rows without crossing a conversation's boundary.

The template (ChatML-like, one special token per role and one to end a turn):

    <|user|>47+38=<|end|><|assistant|>85<|end|>

Only the assistant's tokens and its closing <|end|> are trained on (mask 1): the model learns to answer and
to stop. A prompt for generation ends with <|assistant|>; generation stops at <|end|>. The special tokens are
added to a run's tokenizer when it lacks them (`chat_tokenizer`), each one id, never split or merged, and the
model's vocabulary grows to hold them (train/post.py copies the old rows and starts the new ones at the mean
embedding).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from minigpt.core.errors import UserError
from minigpt.core.files import read_regular

ROLES = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END = "<|end|>"
CHAT_TOKENS = (*ROLES.values(), END)
MAX_DATA_BYTES = 1 << 30  # the largest post-training JSONL file read
MAX_CONTENT_CHARS = 1 << 20  # one message's text


def holds_chat_token(text: str) -> bool:
    """Whether a message's text spells a chat token (it would open a turn of its own): refused in data and requests."""
    return any(t in text for t in CHAT_TOKENS)


def chat_tokenizer(tokenizer) -> tuple[object, list[str]]:
    """The tokenizer with the chat tokens added (as special tokens) where missing; the ones added."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in CHAT_TOKENS if t not in vocab]
    if missing:
        tokenizer.add_special_tokens(missing)
    return tokenizer, missing


def chat_ids(tokenizer) -> dict[str, int]:
    ids = {t: tokenizer.token_to_id(t) for t in CHAT_TOKENS}
    if None in ids.values():
        raise UserError(f"the tokenizer lacks the chat tokens {', '.join(t for t, i in ids.items() if i is None)}: "
                        f"read it through chat_tokenizer (a post-training run adds them)")
    return ids


@dataclass
class Rendered:
    ids: list[int]
    mask: list[int]  # 1 where the token is trained on (predicted as a target)


def render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> Rendered:
    """A conversation's ids and loss mask; with generation_prompt, ending with <|assistant|> (nothing trained)."""
    ids, mask = [], []
    special = chat_ids(tokenizer)
    for m in messages:
        text = tokenizer.encode(m["content"], add_special_tokens=False).ids
        trained = 0 if generation_prompt else int(m["role"] == "assistant")
        ids += [special[ROLES[m["role"]]], *text, special[END]]
        mask += [0] + [trained] * (len(text) + 1)
    if generation_prompt:
        ids.append(special[ROLES["assistant"]])
        mask.append(0)
    return Rendered(ids, mask)


def prompt_text(messages: list[dict]) -> str:
    """A generation prompt as text, laid out as `render(..., generation_prompt=True)` lays out ids: tokenized by the
    run's tokenizer it gives those ids (when no message's text holds a chat token: callers refuse those)."""
    return "".join(f"{ROLES[m['role']]}{m['content']}{END}" for m in messages) + ROLES["assistant"]


def completion(tokenizer, prompt: list[dict], answer: str) -> Rendered:
    """A prompt (ending in <|assistant|>) and an answer closed by <|end|>, trained on the answer only."""
    p = render(tokenizer, prompt, generation_prompt=True)
    a = tokenizer.encode(answer, add_special_tokens=False).ids + [chat_ids(tokenizer)[END]]
    return Rendered(p.ids + a, [0] * len(p.ids) + [1] * len(a))


# reading ------------------------------------------------------------------------------------------------


def _messages(value, where: str, final_assistant: bool) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: messages must be a non-empty list of {{\"role\", \"content\"}} objects")
    for m in value:
        if (not isinstance(m, dict) or set(m) != {"role", "content"} or m["role"] not in ROLES
                or not isinstance(m["content"], str) or len(m["content"]) > MAX_CONTENT_CHARS):
            raise UserError(f"{where}: each message is {{\"role\": one of {', '.join(ROLES)}, \"content\": text}}")
        if holds_chat_token(m["content"]):
            raise UserError(f"{where}: a message's text holds a chat token ({', '.join(CHAT_TOKENS)}); remove it")
    if final_assistant and value[-1]["role"] != "assistant":
        raise UserError(f"{where}: a training conversation ends with an assistant message")
    if not final_assistant and value[-1]["role"] == "assistant":
        raise UserError(f"{where}: a prompt ends with a user (or system) message; its answer is asked for")
    return value


def _text(value, where: str, key: str) -> str:
    if not isinstance(value, str) or len(value) > MAX_CONTENT_CHARS or holds_chat_token(value):
        raise UserError(f"{where}: \"{key}\" must be text without chat tokens")
    return value


def read_examples(path: Path, kind: str) -> list[dict]:
    """The examples of a JSONL file: kind "sft" ({"messages"}), "pairs" ({"prompt", "chosen", "rejected"}) or
    "prompts" ({"prompt", "answer"}); every line checked, one clear line naming the first bad one."""
    data = read_regular(Path(path), f"{kind} data", MAX_DATA_BYTES)
    out = []
    for n, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where} is not JSON ({e.msg}); each line holds one example") from None
        keys = {"sft": {"messages"}, "pairs": {"prompt", "chosen", "rejected"}, "prompts": {"prompt", "answer"}}[kind]
        if not isinstance(row, dict) or not keys <= set(row):
            raise UserError(f"{where}: a {kind} example has the keys {', '.join(sorted(keys))}")
        if kind == "sft":
            out.append({"messages": _messages(row["messages"], where, True)})
        else:
            out.append({"prompt": _messages(row["prompt"], where, False),
                        **{k: _text(row[k], where, k) for k in sorted(keys - {"prompt"})}})
    if not out:
        raise UserError(f"{path} holds no example")
    return out


# batches --------------------------------------------------------------------------------------------------


def pack_rows(items: list[Rendered], rows: int, length: int) -> tuple[torch.Tensor, ...]:
    """Conversations packed first-fit into `rows` rows of `length` inputs, none split: (x, targets, positions,
    attn_mask). Targets are the next token where trained (mask), -1 elsewhere and at each conversation's end;
    positions restart at 0 for each conversation and attention stays inside it (a block-diagonal causal mask),
    so a packed row computes what each conversation alone would. Conversations that do not fit are left out."""
    x = np.zeros((rows, length), np.int64)
    y = np.full((rows, length), -1, np.int64)
    pos = np.zeros((rows, length), np.int64)
    doc = np.full((rows, length), -1, np.int64)
    used = [0] * rows
    for k, item in enumerate(items):
        n = len(item.ids) - 1  # inputs: every token but the last
        r = next((r for r in range(rows) if used[r] + n <= length), None)
        if r is None:
            continue
        s = used[r]
        x[r, s:s + n] = item.ids[:-1]
        y[r, s:s + n] = np.where(np.asarray(item.mask[1:]) == 1, item.ids[1:], -1)
        pos[r, s:s + n] = np.arange(n)
        doc[r, s:s + n] = k
        used[r] += n
    d = torch.from_numpy(doc)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    same = (d[:, :, None] == d[:, None, :]) & causal  # padding (-1) attends to padding: never a target
    return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(pos), same[:, None]


def pad_rows(items: list[Rendered]) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence a row, right-padded to the longest: (x, targets), targets -1 where not trained."""
    length = max(len(i.ids) for i in items) - 1
    x = torch.zeros(len(items), length, dtype=torch.long)
    y = torch.full((len(items), length), -1, dtype=torch.long)
    for r, item in enumerate(items):
        n = len(item.ids) - 1
        x[r, :n] = torch.tensor(item.ids[:-1])
        y[r, :n] = torch.tensor([t if m else -1 for t, m in zip(item.ids[1:], item.mask[1:])])
    return x, y
