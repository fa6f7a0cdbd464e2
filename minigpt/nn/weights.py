"""Model weights on disk: safetensors in and out (loading never unpickles code)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load, save_file

from minigpt.core.errors import UserError
from minigpt.core.files import read_verified

WEIGHTS = "model.safetensors"
VOCAB_ROWS = ("wte.weight", "lm_head.weight")  # the matrices with a row per token (a tied head: the embedding)


def weights_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter (a tied matrix once, under its first name) and persistent buffer, on CPU."""
    out = {name: p.detach().cpu() for name, p in model.named_parameters()}
    persistent = model.state_dict().keys()
    out.update({name: b.detach().cpu() for name, b in model.named_buffers() if name in persistent})
    return out


def save_weights(weights: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors with one metadata key: it serialises its metadata map in no fixed order, so two
    keys would make identical weights give different file bytes (and SHA-256) run to run."""
    save_file({k: v.contiguous() for k, v in weights.items()}, str(path), metadata={"format": "pt"})


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """A committed checkpoint's weights as a name -> CPU tensor dict (a tied matrix once), from the very bytes
    its record's size and SHA-256 were checked on (core/files.read_verified)."""
    data = read_verified(folder, WEIGHTS)
    try:  # sorted by name: safetensors' `load` gives no fixed order, and ranks must walk the tensors alike
        return dict(sorted(load(data).items()))
    except Exception as e:
        raise UserError(f"cannot load weights from {folder}: {str(e).splitlines()[0]}") from None


def load_weights(model: torch.nn.Module, folder: Path) -> None:
    """A committed checkpoint's weights into `model`; a tied matrix is stored once, under its first name."""
    assign_weights(model, read_weights(folder), str(folder))


def assign_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor], origin: str) -> None:
    """Copy `tensors` into the model's parameters and persistent buffers; every one must be there, with its
    shape (a second name of a tied matrix excepted), and nothing else."""
    first_names = set(dict(model.named_parameters()))  # a tied matrix under its first name only
    every_name = set(dict(model.named_parameters(remove_duplicate=False)))
    state = model.state_dict()
    aliases = (every_name - first_names) & set(state)
    missing = sorted(k for k in state if k not in tensors and k not in aliases)
    unexpected = sorted(k for k in tensors if k not in state)
    wrong = sorted(k for k in tensors if k in state and tuple(tensors[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        raise UserError(
            f"weights in {origin} do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]}, other "
            f"shapes {wrong[:3]}): the checkpoint was written for another model config"
        )
    model.load_state_dict(tensors, strict=False)


@torch.no_grad()
def grow_vocabulary(base: torch.nn.Module, model: torch.nn.Module) -> int:
    """`base`'s weights into `model`, a copy of its shape with a larger vocabulary: the embedding's (and head's) old
    rows copied, each new one the mean of the old ones (a common choice that starts a new token as an average
    one); returns how many rows were added."""
    old, rows = base.state_dict(), base.config.vocab_size
    for name, t in model.state_dict().items():
        src = old[name]
        if name in VOCAB_ROWS:
            t.copy_(src.mean(0, keepdim=True).expand_as(t))
            t[:rows] = src[:rows]
        else:
            t.copy_(src)
    return model.config.vocab_size - rows
