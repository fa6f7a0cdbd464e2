"""Model weights on disk: safetensors in and out (loading never unpickles code)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file

from minigpt.core.errors import UserError

WEIGHTS = "model.safetensors"


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
    """A checkpoint's weights as a name -> CPU tensor dict (a tied matrix once)."""
    try:
        return load_file(str(Path(folder) / WEIGHTS))
    except Exception as e:
        raise UserError(f"cannot load weights from {folder}: {str(e).splitlines()[0]}") from None


def load_weights(model: torch.nn.Module, folder: Path) -> None:
    try:
        missing, unexpected = load_model(model, str(Path(folder) / WEIGHTS), strict=False)
    except Exception as e:
        raise UserError(f"cannot load weights from {folder}: {str(e).splitlines()[0]}") from None
    if missing or unexpected:
        raise UserError(
            f"weights in {folder} do not fit the model (missing {sorted(missing)[:3]}, unexpected "
            f"{sorted(unexpected)[:3]}): the checkpoint was written for another model config"
        )
