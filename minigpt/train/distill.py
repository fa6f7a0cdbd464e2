"""Knowledge distillation (Hinton et al. 2015): the student learns the teacher's soft targets as well as the
data. Applied from outside the model: the backend asks `Distiller.objective` for the loss to backpropagate.

    objective = (1 - alpha) CE(student, data) + alpha T^2 KL(softmax(teacher / T) || softmax(student / T))

per token (positions with target -1 left out), T the temperature; T^2 keeps the soft term's gradient scale
independent of T (Hinton et al.). The teacher is a trained run (or HF folder) loaded once, frozen, in eval
mode, evaluated under no_grad on the same micro-batch; the logged loss is the student's data cross-entropy
alone, comparable with a run trained from scratch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from minigpt.core.config import Config
from minigpt.nn.model import GPT, ModelOutput
from minigpt.nn.optim import objective as data_objective


class Distiller:
    def __init__(self, teacher: GPT, cfg: Config) -> None:
        self.teacher = teacher.eval().requires_grad_(False)
        self.tc = cfg.train
        self.alpha, self.T = cfg.train.distill_alpha, cfg.train.distill_temperature

    def objective(self, net, x: torch.Tensor, y: torch.Tensor) -> tuple[ModelOutput, torch.Tensor]:
        """(the student's output with its data loss, the mixed loss to backpropagate)."""
        out = net(x)
        logits = out.logits.float()
        V = logits.size(-1)
        ce = F.cross_entropy(logits.reshape(-1, V), y.reshape(-1), ignore_index=-1)
        with torch.no_grad():
            t = self.teacher(x).logits.float()
        keep = (y.reshape(-1) != -1).float()
        kl = F.kl_div(F.log_softmax(logits / self.T, -1).reshape(-1, V), F.log_softmax(t / self.T, -1).reshape(-1, V),
                      log_target=True, reduction="none").sum(-1)
        soft = (kl * keep).sum() / keep.sum().clamp(min=1) * self.T**2
        student = ModelOutput(None, ce, out.aux_loss)
        return student, (1 - self.alpha) * data_objective(student, self.tc) + self.alpha * soft


def load_teacher(cfg: Config, device: torch.device) -> tuple[GPT, str]:
    """The teacher of train.distill_from on `device`, and a line saying what it is."""
    from minigpt.core.resolve import init_source
    from minigpt.interop.hf import load_init_weights

    _, model_cfg, _, _ = init_source(cfg.train.distill_from, "train.distill_from")
    teacher = GPT(model_cfg)
    what = load_init_weights(teacher, cfg.train.distill_from)
    return teacher.to(device), f"{what}: {teacher.num_params():,} parameters, frozen"
