"""Post-training data and models: the chat tokenizer and the grown model a post-training run starts from, and
each objective's micro-batches, a pure function of (seed, step, rank, micro-step) as pre-training's are (GRPO's
answers too: drawn from the current weights with seeds of the step), so a resumed run continues exactly."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from minigpt.analytic.flops import decode_flops, forward_matmul_flops_per_token, prefill_flops
from minigpt.core.config import Config, ModelConfig
from minigpt.core.errors import UserError
from minigpt.core.resolve import init_source
from minigpt.data.chat import (
    END,
    Rendered,
    chat_ids,
    chat_tokenizer,
    completion,
    pack_rows,
    pad_rows,
    read_examples,
    render,
)
from minigpt.data.tokenizer import read_tokenizer
from minigpt.infer.answers import answer
from minigpt.interop.hf import load_init_weights
from minigpt.nn.model import GPT
from minigpt.nn.weights import grow_vocabulary
from minigpt.train.post import Targets

FILES = {"sft": ("sft.jsonl", "sft"), "rm": ("pairs.jsonl", "pairs"), "dpo": ("pairs.jsonl", "pairs"),
         "grpo": ("prompts.jsonl", "prompts")}


def base_tokenizer(init_from: str):
    """train.init_from's tokenizer with the chat tokens added; the tokens added."""
    _, _, path, _ = init_source(init_from)
    return chat_tokenizer(read_tokenizer(path, f"{init_from} has no tokenizer.json"))


def grown_config(base: ModelConfig, tokenizer) -> ModelConfig:
    """The base's [model] with room for every token of the chat tokenizer."""
    grown = copy.deepcopy(base)
    grown.vocab_size = max(base.vocab_size, tokenizer.get_vocab_size())
    return grown


@torch.no_grad()
def initial_model(cfg: Config) -> tuple[GPT, str]:
    """train.init_from's weights in a model of cfg.model (its vocabulary grown for the chat tokens: the old rows
    copied, each new one the mean of the old embeddings, a common choice that starts them as an average token)."""
    _, base_cfg, _, _ = init_source(cfg.train.init_from)
    base = GPT(base_cfg)
    what = load_init_weights(base, cfg.train.init_from)
    if base_cfg.vocab_size == cfg.model.vocab_size:
        return base, what
    model = GPT(cfg.model)
    grown = grow_vocabulary(base, model)
    return model, f"{what}; vocabulary grown by {grown} chat tokens (new rows: the mean embedding)"


def grows_vocabulary(cfg: Config) -> bool:
    """Whether the run's [model] has more tokens than train.init_from's (its chat tokens added)."""
    return init_source(cfg.train.init_from)[1].vocab_size != cfg.model.vocab_size


class PostData:
    """The examples of train.post_data for the objective (rendered once) and the held-out sets."""

    def __init__(self, cfg: Config, tokenizer) -> None:
        tc, self.block = cfg.train, cfg.model.block_size
        self.tc, self.tokenizer, self.model_cfg = tc, tokenizer, cfg.model
        self.end_id = chat_ids(tokenizer)[END]
        folder = Path(tc.post_data)
        name, kind = FILES[tc.objective]
        if not (folder / name).is_file():
            raise UserError(f"train.post_data = {tc.post_data!r} has no {name} (train.objective = '{tc.objective}' "
                            f"reads it); minigpt task --out DIR writes one")
        self.examples = read_examples(folder / name, kind)
        self.heldout = read_examples(folder / "heldout.jsonl", "prompts") if (folder / "heldout.jsonl").is_file() else []
        pairs = folder / "heldout_pairs.jsonl"
        self.heldout_pairs = read_examples(pairs, "pairs") if tc.objective in ("rm", "dpo") and pairs.is_file() else []
        self.rendered = [self._render(e) for e in self.examples]
        self._check_lengths()
        if tc.objective == "sft":  # how many conversations a row can hold at most: the draws per packed micro-batch
            self.per_row = max(1, self.block // (min(len(r.ids) for r in self.rendered) - 1))

    def _render(self, e: dict):
        if "messages" in e:
            return render(self.tokenizer, e["messages"])
        if "chosen" in e:
            return completion(self.tokenizer, e["prompt"], e["chosen"]), completion(self.tokenizer, e["prompt"], e["rejected"])
        return render(self.tokenizer, e["prompt"], generation_prompt=True)

    def _check_lengths(self) -> None:
        extra = self.tc.rollout_max_tokens + 1 if self.tc.objective == "grpo" else 0
        items = [r for x in self.rendered for r in (x if isinstance(x, tuple) else (x,))]
        long = [len(r.ids) + extra for r in items if len(r.ids) + extra > self.block + 1]
        if long:
            raise UserError(f"{len(long)} examples of train.post_data are longer than model.block_size + 1 = "
                            f"{self.block + 1} tokens (the longest {max(long)}" + (", with train.rollout_max_tokens"
                            if extra else "") + "): shorten them or drop them")

    def micro_batches(self, step: int, rank: int, accum: int, micro: int, rollouts=None) -> list:
        """This rank's micro-batches of the step: (x, Targets) each (GRPO: from `rollouts`, the step's answers)."""
        out = []
        for m in range(accum):
            key = (self.tc.seed, 0, step, rank * accum + m)
            if self.tc.objective == "grpo":
                out.append(rollouts[m])
            elif self.tc.objective == "sft":
                out.append(self._sft(key, micro))
            else:
                picks = np.random.default_rng(key).integers(0, len(self.rendered), size=micro)
                items = [self.rendered[i][0] for i in picks] + [self.rendered[i][1] for i in picks]
                x, y = pad_rows(items)
                out.append((x, Targets(y)))
        return out

    def _sft(self, key: tuple, rows: int):
        """Rows of block_size packed with conversations drawn by the key, until a draw no longer fits."""
        rng = np.random.default_rng(key)
        picks = rng.integers(0, len(self.rendered), size=rows * self.per_row)
        x, y, pos, mask = pack_rows([self.rendered[i] for i in picks], rows, self.block)
        return x, Targets(y, pos, mask)

    def step_prompts(self, step: int, count: int) -> list[int]:
        """The GRPO prompts of a step over every rank: indices drawn by (seed, step)."""
        return np.random.default_rng((self.tc.seed, 3, step)).integers(0, len(self.examples), size=count).tolist()


@torch.no_grad()
def reward_scores(reward_model: GPT, items: list[Rendered], end_id: int) -> torch.Tensor:
    """A reward model's score of each answer (train/post.end_rewards: the <|end|> logit after it)."""
    from minigpt.train.post import end_rewards

    x, y = pad_rows(items)
    device = reward_model.wte.weight.device
    return end_rewards(reward_model(x.to(device)).logits, y.to(device), end_id).cpu()


def rollouts(model: GPT, data: PostData, step: int, picks: list[int], per_batch: int,
             reward_model: GPT | None = None) -> tuple[list, dict]:
    """G answers to each picked prompt from `model` (the engine), rewarded 1 for the exact answer (or scored by
    `reward_model`), with group advantages; returned as micro-batches of `per_batch` prompts ((x, Targets) each, in
    order) and the step's figures (mean reward, exact answers, answer length, generation FLOPs)."""
    tc, G = data.tc, data.tc.grpo_group
    prompts = [data.examples[i]["prompt"] for i in picks]
    got = answer(model, data.tokenizer, prompts, tc.rollout_max_tokens, tc.rollout_temperature, samples=G,
                 seed=(tc.seed * 1_000_003 + step) * len(picks) * G)
    items, advantages, rewards, right, lengths, flops = [], [], [], [], [], 0.0
    for i, group in zip(picks, got):
        exact = torch.tensor([float(a.text == data.examples[i]["answer"].strip()) for a in group])
        mine = [Rendered(a.prompt_ids + a.tokens, [0] * len(a.prompt_ids) + [1] * len(a.tokens)) for a in group]
        r = exact if reward_model is None else reward_scores(reward_model, mine, data.end_id)
        advantages.append((r - r.mean()) / (r.std() + 1e-4))  # unbiased std over the group, as TRL
        items += mine
        rewards.append(r.mean())
        right.append(exact.mean())
        lengths += [len(a.tokens) for a in group]
        P = len(group[0].prompt_ids)  # prefilled once per group, then each answer decoded
        flops += prefill_flops(data.model_cfg, P) + sum(decode_flops(data.model_cfg, P + t) for a in group
                                                         for t in range(len(a.tokens)))
    batches = []
    for k in range(0, len(picks), per_batch):
        x, y = pad_rows(items[k * G:(k + per_batch) * G])
        batches.append((x, Targets(y, advantages=torch.cat(advantages[k:k + per_batch]))))
    return batches, {"reward": float(torch.stack(rewards).mean()), "answers_right": float(torch.stack(right).mean()),
                     "answer_tokens": float(np.mean(lengths)), "rollout_flops": flops}


def forward_flops(c: ModelConfig, x: torch.Tensor) -> float:
    """Forward FLOPs of a micro-batch as executed: every row at the batch's length (padding included)."""
    return forward_matmul_flops_per_token(c, x.shape[1]) * x.numel()
