"""A task with a verifiable answer, made here: two-number addition ("47+38=" -> "85") as chat data.

Every post-training stage reports a number a user understands, held-out accuracy, on problems it never
trained on. `write_task` writes, from a seed, the files the objectives read (train.post_data = the folder):

    sft.jsonl            {"messages": [{"role": "user", "content": "47+38="}, {"role": "assistant", "content": "85"}]}
    pairs.jsonl          {"prompt": [...user message...], "chosen": "85", "rejected": "75"}   (preference pairs)
    prompts.jsonl        {"prompt": [...user message...], "answer": "85"}                     (RL prompts)
    heldout.jsonl        the held-out problems as prompts.jsonl      heldout_pairs.jsonl   as pairs.jsonl

Problems are a + b for a, b in [0, 10^digits); a problem is held out by a hash of (seed, a, b), so train and
held-out never share one. A rejected answer is a typical slip (the carry dropped, else one digit off): a pair
teaches what a wrong answer looks like, not noise. Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from minigpt.core.atomic import atomic_write_text
from minigpt.core.errors import UserError

TASK_FILES = ("sft.jsonl", "pairs.jsonl", "prompts.jsonl", "heldout.jsonl", "heldout_pairs.jsonl")


def _held_out(seed: int, a: int, b: int, fraction: float) -> bool:
    h = hashlib.sha256(f"{seed}:{a}:{b}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < fraction


def no_carry_sum(a: int, b: int) -> int:
    """a + b with every carry dropped: each digit is (digit of a + digit of b) mod 10."""
    out, place = 0, 1
    while a or b:
        out += ((a % 10 + b % 10) % 10) * place
        a, b, place = a // 10, b // 10, place * 10
    return out


def slip(a: int, b: int, rng: random.Random) -> int:
    """A wrong answer a learner makes: the carry dropped, else the last or the tens digit off by one."""
    right, dropped = a + b, no_carry_sum(a, b)
    if dropped != right:
        return dropped
    return rng.choice([right + d for d in (-10, -1, 1, 10) if right + d >= 0])


def user(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


def problems(seed: int, digits: int, heldout_fraction: float) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(train, held-out) problems, each list shuffled by the seed."""
    top = 10**digits
    train, held = [], []
    for a in range(top):
        for b in range(top):
            (held if _held_out(seed, a, b, heldout_fraction) else train).append((a, b))
    rng = random.Random(seed)
    rng.shuffle(train)
    rng.shuffle(held)
    return train, held


def task_rows(train: list[tuple[int, int]], held: list[tuple[int, int]], seed: int) -> dict[str, list[dict]]:
    rng = random.Random(seed + 1)

    def pair(a, b):
        return {"prompt": user(f"{a}+{b}="), "chosen": str(a + b), "rejected": str(slip(a, b, rng))}

    return {
        "sft.jsonl": [{"messages": user(f"{a}+{b}=") + [{"role": "assistant", "content": str(a + b)}]} for a, b in train],
        "pairs.jsonl": [pair(a, b) for a, b in train],
        "prompts.jsonl": [{"prompt": user(f"{a}+{b}="), "answer": str(a + b)} for a, b in train],
        "heldout.jsonl": [{"prompt": user(f"{a}+{b}="), "answer": str(a + b)} for a, b in held],
        "heldout_pairs.jsonl": [pair(a, b) for a, b in held],
    }


def write_task(out: str | Path, seed: int = 0, digits: int = 2, heldout_fraction: float = 0.1,
               demonstrations: int | None = None) -> dict:
    """Write the task's files into `out` (new, or empty); returns what was written. demonstrations: how many train
    problems get a worked answer in sft.jsonl (None: all); the prompts (RL) and pairs (DPO, reward model) keep every
    train problem, as demonstrations are the scarce data in practice (InstructGPT: 13k demonstrations, 31k RL prompts)."""
    if demonstrations is not None and demonstrations < 1:
        raise UserError(f"--demonstrations {demonstrations}: give 1 or more (or leave it out: every train problem)")
    if not 1 <= digits <= 3:
        raise UserError(f"--digits {digits}: give 1 to 3 (10^digits squared problems)")
    if not 0 < heldout_fraction < 0.5:
        raise UserError(f"--heldout {heldout_fraction}: give a fraction in (0, 0.5)")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not an empty folder: give a new --out")
    train, held = problems(seed, digits, heldout_fraction)
    if not held:
        raise UserError(f"--digits {digits} with --heldout {heldout_fraction} holds out no problem: raise either")
    rows = task_rows(train, held, seed)
    rows["sft.jsonl"] = rows["sft.jsonl"][:demonstrations]  # train is shuffled: a random subset
    out.mkdir(parents=True, exist_ok=True)
    for name, items in rows.items():
        atomic_write_text(out / name, "".join(json.dumps(r) + "\n" for r in items))
    return {"task": "addition", "digits": digits, "seed": seed, "out": str(out),
            "train_problems": len(train), "demonstrations": len(rows["sft.jsonl"]), "heldout_problems": len(held),
            "files": list(rows)}
