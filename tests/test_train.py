import json
import math
from pathlib import Path

import pytest
import torch

from minigpt import checkpoint
from minigpt.errors import UserError
from minigpt.generate import generate_text, load_run
from minigpt.optim import lr_at
from minigpt.train import grad_accum_steps, train

from conftest import run_cli, tiny_overrides


def step_losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            out[r["step"]] = r["loss"]
    return out


def test_training_lowers_the_loss_and_writes_a_complete_run(tiny_cfg, tmp_path):
    cfg = tiny_cfg(**{"train.max_steps": 30, "train.eval_every": 30, "train.checkpoint_every": 10})
    summary = train(cfg, log=lambda *a: None)
    run = tmp_path / "run"
    for name in ("config.json", "tokenizer.json", "metrics.jsonl", "summary.json", "latest.json"):
        assert (run / name).is_file(), name
    losses = step_losses(run)
    assert sorted(losses) == list(range(1, 31))
    assert sum(list(losses.values())[-5:]) / 5 < sum(list(losses.values())[:3]) / 3 - 0.5
    assert summary["val_loss"] < math.log(cfg.model.vocab_size) - 0.3  # below a uniform guess
    folder, step = checkpoint.latest_checkpoint(run)
    assert step == 30 and folder.name == "step_0000030"
    assert len(list((run / "checkpoints").iterdir())) == 1  # older checkpoints pruned
    assert json.loads((run / "config.json").read_text())["model"]["n_embd"] == 32
    model, tok, _, _ = load_run(run)
    texts, gen = generate_text(model, tok, ["def ", "import "], max_new_tokens=5, temperature=0.0)
    assert texts[0].startswith("def ") and len(gen.new_tokens) == 2


def test_resume_is_exact(tiny_cfg, tmp_path):
    cfg = tiny_cfg(**{"train.max_steps": 8, "model.dropout": 0.1})
    train(cfg, log=lambda *a: None)
    straight = step_losses(tmp_path / "run")

    cfg2 = tiny_cfg(**{"train.max_steps": 8, "model.dropout": 0.1, "train.out_dir": f'"{tmp_path / "split"}"'})
    train(cfg2, stop_at=4, log=lambda *a: None)
    assert checkpoint.latest_checkpoint(tmp_path / "split")[1] == 4
    train(cfg2, resume=True, log=lambda *a: None)
    split = step_losses(tmp_path / "split")
    assert split == straight  # bit-for-bit equal losses, dropout RNG included


def test_resume_through_the_cli_and_its_errors(corpus_dir, tmp_path):
    sets = tiny_overrides(corpus_dir, tmp_path / "cache", tmp_path / "run", **{"train.max_steps": 4})
    args = [a for s in sets for a in ("--set", s)]
    r = run_cli("train", *args, "--stop-at", "2")
    assert r.returncode == 0, r.stderr
    final = json.loads(r.stdout.strip().splitlines()[-1])
    assert final["event"] == "final" and final["step"] == 2
    r = run_cli("train", *args)  # the run exists: say how to continue
    assert r.returncode == 2 and "--resume" in r.stderr
    r = run_cli("train", "--resume", str(tmp_path / "run"), "--set", "model.n_layer=3")
    assert r.returncode == 2 and "model.n_layer = 2" in r.stderr and "requested config has 3" in r.stderr
    r = run_cli("train", "--resume", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["step"] == 4
    r = run_cli("train", "--resume", str(tmp_path / "nope"))
    assert r.returncode == 2 and r.stderr.startswith("error: run directory") and "Traceback" not in r.stderr


def test_truncated_weights_are_detected_not_loaded(tiny_cfg, tmp_path):
    train(tiny_cfg(**{"train.max_steps": 2}), log=lambda *a: None)
    folder, _ = checkpoint.latest_checkpoint(tmp_path / "run")
    w = folder / checkpoint.WEIGHTS
    w.write_bytes(w.read_bytes()[:-100])
    with pytest.raises(UserError, match="corrupt"):
        checkpoint.latest_checkpoint(tmp_path / "run")
    r = run_cli("generate", "--run", str(tmp_path / "run"), "--prompt", "x")
    assert r.returncode == 2 and "corrupt" in r.stderr and "Traceback" not in r.stderr


def test_a_crash_while_checkpointing_keeps_the_last_good_one(tiny_cfg, tmp_path, monkeypatch):
    train(tiny_cfg(**{"train.max_steps": 4}), log=lambda *a: None)
    run = tmp_path / "run"
    before = (run / "latest.json").read_text()

    def dying_save(obj, path, *a, **k):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", dying_save)
    with pytest.raises(OSError):
        train(tiny_cfg(**{"train.max_steps": 8}), resume=True, log=lambda *a: None)
    assert (run / "latest.json").read_text() == before
    folder, step = checkpoint.latest_checkpoint(run)  # verifies sizes and hashes
    assert step == 4
    assert not list((run / "checkpoints").glob(".step_*"))  # no temporaries left behind


def test_bf16_trains_on_cpu(tiny_cfg):
    summary = train(tiny_cfg(**{"train.precision": '"bf16"', "train.max_steps": 4}), log=lambda *a: None)
    assert summary["precision"] == "bf16" and summary["val_loss"] == summary["val_loss"]  # not NaN


def test_gradient_accumulation_is_derived_from_tokens(tiny_cfg):
    cfg = tiny_cfg(**{"train.batch_size_tokens": 512})  # micro 4 x block 32 = 128 tokens
    assert grad_accum_steps(cfg, 1) == 4 and grad_accum_steps(cfg, 2) == 2
    with pytest.raises(UserError, match=r"batch_size_tokens = 512 is not a multiple of .* 4 x 32 x 3 = 384"):
        grad_accum_steps(cfg, 3)


def test_accumulated_step_equals_one_big_batch(tiny_cfg, tmp_path):
    """Two micro-batches of 4 accumulate to the gradient of the same 8 sequences at once."""
    from minigpt import data
    from minigpt.model import GPT

    cfg = tiny_cfg()
    torch.manual_seed(0)
    m = GPT(cfg.model)
    tokens = torch.randint(0, 300, (5000,)).numpy()
    xs, ys = zip(*(data.get_batch(tokens, 4, 32, k) for k in data.iter_train_keys(1, 0, 0, 2)))
    for x, y in zip(xs, ys):
        (m(x, y)[1] / 2).backward()
    acc = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    m(torch.cat(xs), torch.cat(ys))[1].backward()
    for a, p in zip(acc, m.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)


def test_lr_schedule_warms_up_then_decays(tiny_cfg):
    tc = tiny_cfg(**{"train.max_steps": 100, "train.warmup_steps": 10, "train.lr": 1.0, "train.min_lr": 0.1}).train
    assert lr_at(0, tc) == pytest.approx(0.1) and lr_at(9, tc) == pytest.approx(1.0)
    assert lr_at(55, tc) == pytest.approx(0.55) and lr_at(100, tc) == pytest.approx(0.1)


def test_generate_cli_and_bad_prompts(tiny_cfg, tmp_path):
    train(tiny_cfg(**{"train.max_steps": 2}), log=lambda *a: None)
    run = str(tmp_path / "run")
    r = run_cli("generate", "--run", run, "--prompt", "def ", "--prompt", "import os", "--max-new-tokens", "5",
                "--top-p", "0.9")
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stdout.strip().splitlines()[-1])
    assert stats["batch"] == 2 and stats["prefill_ms"] > 0 and "sample 2/2" in r.stdout
    r = run_cli("generate", "--run", run, "--prompt", "")
    assert r.returncode == 2 and "prompt is empty" in r.stderr
    r = run_cli("generate", "--run", run, "--prompt", "word " * 200)
    assert r.returncode == 2 and "more than block_size = 32" in r.stderr
