"""A run's model, for every reader (generate, serve, eval, bench decode, convert, the quickstart): the
checkpoint verified, the tokenizer checked against the run's record, a LoRA run merged into its base, a
quantized run's modules swapped in before its tensors load."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from minigpt.analytic.flops import param_counts
from minigpt.analytic.memory import model_bytes
from minigpt.core.config import Config, config_from_json, read_json
from minigpt.core.device import check_fits
from minigpt.core.errors import UserError
from minigpt.core.files import digest, read_regular
from minigpt.data.tokenizer import MAX_TOKENIZER_BYTES, read_tokenizer
from minigpt.nn.lora import apply_lora, load_adapters, merge_lora, train_embeddings
from minigpt.nn.model import GPT
from minigpt.nn.quantize import quantize_model
from minigpt.nn.weights import grow_vocabulary, load_weights, read_weights
from minigpt.run.files import check_pinned, kept_checkpoint, latest_checkpoint, load_latest


def check_tokenizer(run_dir: Path, data: bytes | None = None) -> None:
    """The run's tokenizer.json (or its bytes, as read) is the one it was trained with or converted with: its
    SHA-256 as data.json recorded it (runs from before the record are not checked)."""
    run_dir = Path(run_dir)
    pinned, path = run_dir / "data.json", run_dir / "tokenizer.json"
    if not os.path.lexists(pinned) or (data is None and not os.path.lexists(path)):
        return
    expected = read_json(pinned, "the run's pinned corpus").get("tokenizer_sha256")
    if data is None:
        data = read_regular(path, "tokenizer", MAX_TOKENIZER_BYTES)
    if expected and digest(data)["sha256"] != expected:
        raise UserError(f"{run_dir}/tokenizer.json is not the tokenizer the run was trained with (its SHA-256 differs "
                        f"from data.json's record): restore the run's own tokenizer.json")


def run_tokenizer(run_dir: Path):
    """The run's tokenizer, read once: the bytes checked against data.json's pin are the ones parsed."""
    path = Path(run_dir) / "tokenizer.json"
    if not os.path.lexists(path):
        raise UserError(f"{run_dir} has no tokenizer.json: the run directory is damaged; copy the tokenizer the run "
                        f"was trained with there")
    data = read_regular(path, "tokenizer", MAX_TOKENIZER_BYTES)
    check_tokenizer(run_dir, data)
    return read_tokenizer(path, "", data=data)


MAX_LORA_CHAIN = 8  # a LoRA run on a LoRA run on ...: deeper is a loop or a mistake


def load_run_weights(model: GPT, folder: Path, cfg: Config, depth: int = 0) -> None:
    """A checkpoint folder's weights into `model` (a GPT of cfg.model). A LoRA run saves its adapters only:
    its base (train.init_from, a run) is read again, checked to be the one the run pinned when it started (not
    trained further since), the adapters put on and merged, so `model` stays a plain GPT."""
    tc = cfg.train
    if not tc.lora_rank:
        load_weights(model, folder)
        return
    run_dir, base = Path(folder).parent.parent, Path(tc.init_from)
    if depth >= MAX_LORA_CHAIN or (base.exists() and base.resolve() == run_dir.resolve()):
        raise UserError(f"{run_dir}: train.init_from = {tc.init_from} is this run itself (or a chain of LoRA runs "
                        f"{MAX_LORA_CHAIN} deep): a LoRA run's base is another run; fix its config.json")
    check_pinned(run_dir, "init_from", tc.init_from, "LoRA base")
    base_cfg = config_from_json(base / "config.json")
    grown = base_cfg.model.vocab_size != cfg.model.vocab_size  # chat tokens added: the run saved its embeddings
    target = GPT(base_cfg.model) if grown else model
    load_latest(base, lambda f: load_run_weights(target, f, base_cfg, depth + 1))
    if grown:
        grow_vocabulary(target, model)
    apply_lora(model, tc.lora_rank, tc.lora_alpha, tc.lora_targets)
    if grown:
        train_embeddings(model)
    load_adapters(model, read_weights(folder), str(folder))
    merge_lora(model)
    model.requires_grad_(True)


def load_run(run_dir: str | Path, device: str | torch.device = "cpu", step: int | None = None) -> tuple[GPT, object, Config, int]:
    """Model (eval mode, on `device`), tokenizer, config and step of a run's latest checkpoint, or of
    the kept checkpoint of `step` (train.keep_checkpoints keeps several).

    Safe while the run is training: a checkpoint replaced mid-read is read again (load_latest). A LoRA
    run's adapters come merged into its base (load_run_weights).
    """
    run_dir = Path(run_dir)
    latest_checkpoint(run_dir, verify=False)  # a clear error when it is no run
    cfg = config_from_json(run_dir / "config.json")
    tokenizer = run_tokenizer(run_dir)
    if tokenizer.get_vocab_size() > cfg.model.vocab_size:
        raise UserError(f"{run_dir}/tokenizer.json has {tokenizer.get_vocab_size():,} tokens, more than the model's "
                        f"vocab_size {cfg.model.vocab_size:,}: it is not the run's tokenizer; restore the run's own")
    check_fits(model_bytes(cfg.model), device, f"loading the model of {run_dir} ({param_counts(cfg.model).total:,} "
               f"parameters)", "use a machine with more memory, or check that its config.json is the run's own")
    model = GPT(cfg.model)
    if cfg.model.quantization:  # a quantized run: the quantized modules first, then their saved tensors
        quantize_model(model, cfg.model.quantization)
    if step is None:
        _, step = load_latest(run_dir, lambda folder: load_run_weights(model, folder, cfg))
    else:
        load_run_weights(model, kept_checkpoint(run_dir, step), cfg)
    model.to(device).eval()
    return model, tokenizer, cfg, step
