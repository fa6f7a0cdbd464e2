"""Shared fixtures: a small real-text corpus and a tiny config that trains in seconds."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from minigpt.config import load_config
from minigpt.data import stdlib_files

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on the network in tests
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """About 200 KB of real Python source copied from the standard library."""
    d = tmp_path_factory.mktemp("corpus")
    total = 0
    for path in stdlib_files():
        text = path.read_text(encoding="utf-8")
        (d / path.name).write_text(text, encoding="utf-8")
        total += len(text)
        if total > 200_000:
            break
    return d


def tiny_overrides(corpus: Path, cache: Path, out_dir: Path, **extra) -> list[str]:
    sets = {
        "model.n_layer": 2, "model.n_head": 2, "model.n_embd": 32, "model.block_size": 32,
        "model.vocab_size": 320,
        "data.source": f'"{corpus}"', "data.cache_dir": f'"{cache}"', "data.val_fraction": 0.2,
        "train.out_dir": f'"{out_dir}"', "train.max_steps": 8, "train.micro_batch_size": 4,
        "train.batch_size_tokens": 0, "train.warmup_steps": 2, "train.eval_every": 4, "train.eval_iters": 2,
        "train.checkpoint_every": 4, "train.sample_every": 0, "train.log_every": 1, "train.lr": 3e-3,
        "sample.max_new_tokens": 8, "train.report": "false",
    }
    sets.update(extra)
    return [f"{k}={v}" for k, v in sets.items()]


@pytest.fixture
def tiny_cfg(corpus_dir, tmp_path):
    """A factory: tiny_cfg(**overrides) -> Config writing into this test's tmp_path."""

    def make(**extra):
        return load_config(REPO / "configs" / "tiny.toml", tiny_overrides(corpus_dir, tmp_path / "cache", tmp_path / "run", **extra))

    return make


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 300):
    import subprocess

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "minigpt.cli", *args], capture_output=True, text=True,
                          cwd=cwd or REPO, env=full_env, timeout=timeout)
