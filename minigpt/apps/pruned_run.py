"""`minigpt prune --run RUN --heads F --mlp F --layers N --out DIR`: a run's model structurally pruned (nn/prune.py)
on calibration batches of its own validation split, written as a new run with the smaller shapes. Recover its
quality with a short training from it, alone or distilled from the unpruned run (train.init_from = DIR,
train.distill_from = RUN)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from minigpt.apps.model_run import check_new_folder, write_model_run
from minigpt.infer.evaluate import run_split_tokens
from minigpt.nn.prune import check_prunable, importance, plan_sizes, prune
from minigpt.run.load import load_run


def calibration_batches(run_dir: str, cfg, batches: int, batch: int = 8) -> list[torch.Tensor]:
    """`batches` batches of `batch` windows of block_size tokens from the run's validation split."""
    block = cfg.model.block_size
    tokens = torch.from_numpy(run_split_tokens(run_dir, cfg, "val", batches * batch * block))
    n = len(tokens) // block
    windows = tokens[: n * block].view(n, block)
    return [windows[i:i + batch] for i in range(0, min(n, batches * batch), batch)]


def save_pruned_run(run_dir: str, heads: float, mlp: float, layers: int, out: str, batches: int = 8) -> dict:
    check_new_folder(out)
    model, _, cfg, step = load_run(run_dir)
    check_prunable(model.config)
    groups, channels, kept = plan_sizes(model.config, heads, mlp, layers)
    imp = importance(model, calibration_batches(run_dir, cfg, batches))
    small = prune(model, imp, groups, channels, kept)
    cfg = dataclasses.replace(cfg, model=small.config)
    before, after = (sum(p.numel() for p in dict(m.named_parameters()).values()) for m in (model, small))
    info = {"from": str(Path(run_dir).resolve()), "step": step, "params_before": before, "params_after": after,
            "removed": {"heads": heads, "mlp": mlp, "layers": layers},
            "kept": {"n_head": small.config.n_head, "n_kv_head": small.config.n_kv_head,
                     "ffn_hidden": small.config.ffn_hidden, "n_layer": small.config.n_layer},
            "layer_influence": [round(float(x), 6) for x in imp.layers],
            "criterion": "Minitron activation importance (heads: output L2 norm, grouped by key/value head; MLP "
                         "channels: mean |activation|); layers: ShortGPT Block Influence (1 - cos(in, out))"}
    write_model_run(small, cfg, run_dir, out, step, "pruned.json", info)
    return info
