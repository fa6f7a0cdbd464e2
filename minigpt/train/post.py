"""Post-training objectives: supervised fine-tuning, a reward model, DPO and GRPO, each the loss the backend
asks for (`Backend.loss_hook.objective(net, x, y)`, as distillation's), so DDP and FSDP2 run them unchanged.

    sft   the model's own cross-entropy on the assistant's tokens only (targets -1 elsewhere), conversations
          packed into rows with attention kept inside each (data/chat.pack_rows).
    rm    Bradley-Terry (Ouyang et al. 2022; DeepSpeed-Chat step 2): loss = -log sigmoid(r_chosen - r_rejected).
          The scalar head is the LM head's row of <|end|>, read after the response's last token: the logit the
          model gives to ending the turn there. No new parameter, so a reward model is an ordinary run.
    dpo   Rafailov et al. 2023: -log sigmoid(beta [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))])
          ("sigmoid"); "ipo" (Azar et al. 2023, log-ratios averaged per token as TRL does) and "hinge" (SLiC,
          Zhao et al. 2023) as variants. Sums of log-probabilities over the response tokens only. train.dpo_nll_coef
          adds the chosen answers' token NLL (RPO, Pang et al. 2024; TRL's loss_type ["sigmoid", "sft"]).
    grpo  Shao et al. 2024 (DeepSeekMath): G answers per prompt from the engine, reward 1 for a right answer,
          advantage (r - mean) / (std + 1e-4) within the group (std unbiased, as TRL), the clipped ratio objective
          with a k3 KL estimate to the reference, averaged over each answer's tokens, then over answers. One update
          per rollout batch: the old policy is the current one detached (no copy; TRL's num_iterations = 1).

The reference (DPO; GRPO with train.kl_coef > 0) is the starting model: with LoRA the same weights with the
adapters switched off (no second copy, as TRL does with PEFT), else a frozen copy.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from minigpt.nn.lora import adapters_off
from minigpt.nn.model import ModelOutput
from minigpt.nn.optim import objective as data_objective


@dataclass
class Targets:
    """What a post-training micro-batch carries beside its inputs x (handed to the objective as `y`)."""

    targets: torch.Tensor  # (B, T) next-token ids where trained, -1 elsewhere
    positions: torch.Tensor | None = None  # packed rows: each conversation's own positions
    attn_mask: torch.Tensor | None = None  # packed rows: attention inside each conversation
    advantages: torch.Tensor | None = None  # grpo: (B,) one per answer

    def to(self, device: torch.device) -> Targets:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)
        return Targets(move(self.targets), move(self.positions), move(self.attn_mask), move(self.advantages))


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, T) log-probability of each target token, 0 where the target is -1 (float32)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * (targets != -1)


class Objective:
    """A loss over a micro-batch; `stats` keeps each micro-batch's figures (tensors) until the step's are read."""

    name = ""

    def __init__(self, tc, reference=None) -> None:
        self.tc, self.reference, self.stats = tc, reference, []

    def objective(self, net, x: torch.Tensor, y: Targets) -> tuple[ModelOutput, torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def reference_logps(self, net, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The reference's token log-probabilities: the adapters switched off, or the frozen copy."""
        model = self.reference if self.reference is not None else net
        with adapters_off(net) if self.reference is None else contextlib.nullcontext():
            return token_logps(model(x).logits, targets)

    def take_stats(self) -> dict[str, torch.Tensor]:
        """The mean of each figure over the step's micro-batches (then averaged over ranks by the caller)."""
        keys = self.stats[0].keys() if self.stats else ()
        out = {k: torch.stack([s[k].float() for s in self.stats]).mean() for k in keys}
        self.stats = []
        return out


class SFT(Objective):
    name = "sft"

    def objective(self, net, x, y: Targets):
        out = net(x, y.targets, positions=y.positions, attn_mask=y.attn_mask)
        self.stats.append({"trained_tokens": (y.targets != -1).sum()})
        return out, data_objective(out, self.tc)


def end_rewards(logits: torch.Tensor, targets: torch.Tensor, end_id: int) -> torch.Tensor:
    """(B,) the reward head's score per row: the <|end|> logit at the last trained position (where the model
    predicts the response's closing <|end|>)."""
    last = (targets != -1).long().cumsum(-1).argmax(-1)  # the last position with a target
    return logits[torch.arange(len(logits)), last, end_id].float()


class RewardModel(Objective):
    name = "rm"

    def __init__(self, tc, end_id: int) -> None:
        super().__init__(tc)
        self.end_id = end_id

    def objective(self, net, x, y: Targets):
        r = end_rewards(net(x).logits, y.targets, self.end_id)
        chosen, rejected = r.chunk(2)
        loss = -F.logsigmoid(chosen - rejected).mean()
        self.stats.append({"pair_accuracy": (chosen > rejected).float().mean(), "margin": (chosen - rejected).mean()})
        return ModelOutput(None, loss.detach(), None), loss


def dpo_loss(logps: torch.Tensor, ref_logps: torch.Tensor, counts: torch.Tensor, beta: float,
             kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-pair loss, per-pair implicit reward margin) from (2B,) summed log-probs (chosen rows first) and the
    (2B,) response token counts."""
    ratios = logps - ref_logps
    chosen, rejected = ratios.chunk(2)
    delta = chosen - rejected
    if kind == "sigmoid":
        loss = -F.logsigmoid(beta * delta)
    elif kind == "hinge":
        loss = torch.relu(1 - beta * delta)
    else:  # ipo: per-token averages (Azar et al. Eq. 17 with TRL's length normalisation)
        nc, nr = counts.chunk(2)
        loss = (chosen / nc.clamp(min=1) - rejected / nr.clamp(min=1) - 1 / (2 * beta)) ** 2
    return loss, beta * delta


class DPO(Objective):
    name = "dpo"

    def objective(self, net, x, y: Targets):
        per_token = token_logps(net(x).logits, y.targets)
        ref = self.reference_logps(net, x, y.targets).sum(-1)
        counts = (y.targets != -1).sum(-1)
        loss, margin = dpo_loss(per_token.sum(-1), ref, counts, self.tc.dpo_beta, self.tc.dpo_loss)
        loss = loss.mean()
        if self.tc.dpo_nll_coef:  # RPO: + the chosen answers' mean token NLL (TRL: loss_type ["sigmoid", "sft"])
            chosen = per_token.chunk(2)[0]
            loss = loss - self.tc.dpo_nll_coef * chosen.sum() / counts.chunk(2)[0].sum().clamp(min=1)
        self.stats.append({"pair_accuracy": (margin > 0).float().mean(), "margin": margin.mean()})
        return ModelOutput(None, loss.detach(), None), loss


class GRPO(Objective):
    name = "grpo"

    def objective(self, net, x, y: Targets):
        logp = token_logps(net(x).logits, y.targets)
        keep = (y.targets != -1).float()
        ratio = torch.exp(logp - logp.detach())  # 1 in value: one update per rollout batch
        a = y.advantages.unsqueeze(-1)
        eps = self.tc.grpo_clip
        per_token = -torch.min(ratio * a, ratio.clamp(1 - eps, 1 + eps) * a)
        kl = torch.zeros_like(logp)
        if self.tc.kl_coef > 0:
            d = self.reference_logps(net, x, y.targets) - logp
            kl = (torch.exp(d) - d - 1) * keep  # k3 (Schulman 2020): unbiased, always >= 0
            per_token = per_token + self.tc.kl_coef * kl
        lengths = keep.sum(-1).clamp(min=1)
        loss = ((per_token * keep).sum(-1) / lengths).mean()
        self.stats.append({"kl": ((kl.sum(-1) / lengths).mean()).detach()})
        return ModelOutput(None, loss.detach(), None), loss


def make_objective(tc, end_id: int, reference) -> Objective:
    kinds = {"sft": SFT, "dpo": DPO, "grpo": GRPO}
    if tc.objective == "rm":
        return RewardModel(tc, end_id)
    return kinds[tc.objective](tc, reference)
