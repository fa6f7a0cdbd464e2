"""Answers to chat prompts on the inference engine: held-out task accuracy, and the rollouts reinforcement
learning trains on. One client of the spine (engine, sampler): prompts rendered with the chat template,
generation stopped at <|end|>, each group of samples of one prompt prefilled once and seeded (sample i of a
group draws with seed + i), so the same weights and seed give the same answers."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minigpt.data.chat import END, chat_ids, render
from minigpt.infer.engine import Engine, Sampling, Sequence
from minigpt.nn.model import GPT


@dataclass
class Answer:
    prompt_ids: list[int]
    tokens: list[int]  # generated, with <|end|> appended when the model ended its turn
    text: str  # the answer's text (without <|end|>)
    ended: bool  # the model closed its turn (else it ran out of tokens)


@torch.no_grad()
def answer(model: GPT, tokenizer, prompts: list[list[dict]], max_tokens: int, temperature: float = 0.0,
           samples: int = 1, seed: int = 0, max_batch: int = 64) -> list[list[Answer]]:
    """`samples` answers to each prompt (a list of chat messages), prompt i's seeded seed + i * samples."""
    end = chat_ids(tokenizer)[END]
    rendered = [render(tokenizer, p, generation_prompt=True).ids for p in prompts]
    longest = max(len(r) for r in rendered) + max_tokens + 1
    was_training = model.training
    engine = Engine(model, max_batch=max(samples, min(max_batch, samples * len(prompts))),
                    max_len=min(longest, model.config.block_size))
    groups = [[Sequence(ids, max_tokens, Sampling(temperature), seed=seed + i * samples, stop_ids=frozenset({end}))
               for _ in range(samples)] for i, ids in enumerate(rendered)]
    waiting = list(groups)
    while waiting or engine.running or engine.preempted:
        while waiting and engine.fits(samples, len(waiting[0][0].prompt)):
            engine.add(waiting.pop(0))
        engine.step()
    model.train(was_training)
    return [[Answer(ids, s.tokens + ([end] if s.finish_reason == "stop" else []),
                    tokenizer.decode(s.tokens).strip(), s.finish_reason == "stop") for s in group]
            for ids, group in zip(rendered, groups)]


def accuracy(model: GPT, tokenizer, examples: list[dict], max_tokens: int) -> float:
    """Greedy answers to {"prompt", "answer"} examples: the fraction whose text equals the answer exactly."""
    got = answer(model, tokenizer, [e["prompt"] for e in examples], max_tokens)
    return sum(g[0].text == e["answer"].strip() for g, e in zip(got, examples)) / len(examples)
