"""Every bad input, across every command, is one line `error: ...` naming the value and the fix,
exit code 2, no traceback, nothing written; `--json` output is valid JSON (no NaN/Infinity)."""

import errno
import json
import shutil

import pytest
import torch
from conftest import run_cli, set_args, tiny_overrides

from minigpt.core.errors import UserError
from minigpt.nn.weights import WEIGHTS
from minigpt.run import files as checkpoint
from minigpt.train.loop import train


def damaged(good_run, tmp_path, how):
    run = tmp_path / "damaged"
    shutil.copytree(good_run, run)
    folder, _ = checkpoint.latest_checkpoint(run)
    if how == "no tokenizer":
        (run / "tokenizer.json").unlink()
    elif how == "config":
        (run / "config.json").write_text("{not json")
    elif how == "pickle":  # state.pt replaced by a pickle that would run code, its digest updated
        class Evil:
            def __reduce__(self):
                return (print, ("pwned",))
        torch.save({"x": Evil()}, folder / checkpoint.STATE)
        for record in (run / "latest.json", folder / "files.json"):  # both records agree: a consistent forgery
            pointer = json.loads(record.read_text())
            pointer["files"][checkpoint.STATE] = checkpoint.file_digest(folder / checkpoint.STATE)
            record.write_text(json.dumps(pointer))
    elif how == "pointer":
        (run / "latest.json").write_text("[1, 2")
    elif how == "no latest":
        (run / "latest.json").unlink()
    elif how == "missing weights":
        (folder / WEIGHTS).unlink()
    return run


T = "train"
CONFIG_ROWS = [  # (--set overrides of `minigpt train`, what the error names)
    (["train.lr=nan"], "train.lr = nan is not a finite number"),
    (["train.lr=inf"], "train.lr = inf is not a finite number"),
    (["train.lr=-1"], "need 0 < lr <= 10"),
    (["train.lr=1000"], "need 0 < lr <= 10"),
    (["model.dropout=nan"], "model.dropout = nan is not a finite number"),
    (["train.threads=100000"], "train.threads = 100000 is more than 4 x the"),
    (["train.threads=-2"], "train.threads = -2 must be >= 0"),
    (["train.seed=-1"], "train.seed = -1 must be >= 0"),
    (["train.weight_decay=50"], "train.weight_decay = 50.0 in [0, 10]"),
    (["train.max_minutes=-5"], "train.max_minutes = -5.0 must be >= 0"),
    (["train.dist_timeout_s=0"], "train.dist_timeout_s = 0.0 must be positive"),
    (["train.keep_checkpoints=0"], "train.keep_checkpoints = 0 must be a positive integer"),
    (["model.vocab_size=4294967296"], "does not fit the uint32 token files"),
    (["model.vocab_size=2147483648"], "training this model needs at least"),
    (["model.n_layer=0"], "model.n_layer = 0 must be a positive integer"),
    (["model.n_embd=4096", "model.n_layer=200", "model.n_head=32"], "training this model needs at least"),
    (["train.micro_batch_size=100000000"], "training this model needs at least"),
    (["train.max_steps=3.5"], "train.max_steps = 3.5 has type float, expected int"),
    (["train.batch_size_tokens=1000"], "is not a multiple of block_size x data-parallel ranks"),
    (["train.precision=fp16"], "'fp16' needs CUDA"),
    (["train.device=tpu"], "is not a device name"),
    (["train.device=cuda"], "CUDA is not available here"),
    (["sample.temperature=-1"], "sample.temperature = -1.0 must be >= 0"),
    (["sample.top_p=0"], "sample.top_p = 0.0 must be in (0, 1]"),
    (["data.source=/nonexistent/corpus"], "matches no file"),
    (["data.val_fraction=1.5"], "data.val_fraction = 1.5 must be in (0, 1)"),
    (["train.peak_from=/nonexistent/hw.json"], "hardware benchmark /nonexistent/hw.json does not exist"),
    (["nosuch.key=1"], "unknown table [nosuch]"),
    (['train.log_to=["jsonl", "wandb"]'], "train.log_to has 'wandb' but the wandb package is not installed"),
    (['train.log_to=["mlflow"]'], "train.log_to has 'mlflow'; choose from jsonl, tensorboard, csv, wandb"),
]
FLAG_ROWS = [  # (argv, what the error names)
    (["generate", "--run", "RUN", "--top-k", "-3"], "--top-k: -3 must be a finite number in [0, inf]"),
    (["generate", "--run", "RUN", "--temperature", "-1"], "--temperature: -1 must be a finite number in [0, 100]"),
    (["generate", "--run", "RUN", "--temperature", "nan"], "--temperature: nan must be a finite number"),
    (["generate", "--run", "RUN", "--top-p", "0"], "--top-p: 0 must be a finite number in (0, 1]"),
    (["generate", "--run", "RUN", "--max-new-tokens", "-5"], "--max-new-tokens: -5 must be a finite number"),
    (["generate", "--run", "RUN", "--seed", "x"], "--seed: 'x' is not an integer"),
    (["generate", "--run", "RUN", "--device", "tpu"], "is not a device: use auto, cpu, cuda"),
    (["generate", "--run", "RUN", "--prompt", ""], "a prompt is empty"),
    (["generate", "--run", "/nonexistent/run"], "run directory /nonexistent/run does not exist"),
    (["extrapolate", "--price", "nan"], "--price: nan must be a finite number in [0, inf]"),
    (["extrapolate", "--mfu", "inf"], "--mfu: inf must be a finite number in (0, 1]"),
    (["extrapolate", "--mfu", "2"], "--mfu: 2 must be a finite number in (0, 1]"),
    (["extrapolate", "--num-gpus", "0"], "--num-gpus: 0 must be a finite number in [1, 1048576]"),
    (["extrapolate", "--days", "0.001"], "more than the 1,048,576 a plan can hold: allow more days"),
    (["extrapolate", "--days", "-1"], "--days: -1 must be a finite number in (0, inf]"),
    (["extrapolate", "--tokens", "nan"], "--tokens: nan must be a finite number"),
    (["extrapolate", "--utilisation", "1.5", "--serve"], "--utilisation: 1.5 must be a finite number in (0, 1]"),
    (["extrapolate", "--users", "-4", "--serve"], "--users: -4 must be a finite number in (0, inf]"),
    (["extrapolate", "--plan", "tp=5", "--mfu", "0.3"], "does not divide n_head"),
    (["extrapolate", "--gpu", "Z100"], "unknown GPU 'Z100'"),
    (["extrapolate", "--target", "gpt5"], "unknown target 'gpt5'"),
    (["extrapolate", "--dtype", "fp8"], "A100-80GB has no datasheet fp8 peak"),
    (["memory", "--params", "nan"], "--params: nan must be a finite number"),
    (["memory", "--params", "1e9", "--dp", "-2"], "--dp: -2 must be a finite number in [1, 1048576]"),
    (["memory", "--config", "tiny", "--seq-len", "4096"], "exceeds model.block_size = 128"),
    (["flops", "--config", "tiny", "--batch-size", "0"], "--batch-size: 0 must be a finite number in [1, inf]"),
    (["flops", "--config", "nosuch"], "config 'nosuch' is neither a file nor a preset"),
    (["bench", "hardware", "--size", "100000"], "--size: 100000 must be a finite number in [0, 32768]"),
    (["train", "--resume", "RUN", "--set", "train.max_steps=1"], "is at step 2, past the requested end at step 1"),
    (["train", "--stop-at", "0"], "--stop-at: 0 must be a finite number in [1, inf]"),
    (["train", "--bogus"], "unrecognized arguments: --bogus"),
    (["nosuchcommand"], "invalid choice: 'nosuchcommand'"),
]
DAMAGED_ROWS = [
    ("no tokenizer", "has no tokenizer.json: the run directory is damaged"),
    ("config", "config.json is not valid JSON"),
    ("pickle", "is not a minigpt training state"),
    ("pointer", "latest.json is corrupt"),
    ("no latest", "has no checkpoint (latest.json missing)"),
    ("missing weights", "model.safetensors is missing"),
]


def one_line_error(r, message):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert message in lines[0], lines[0]


def test_every_numeric_config_field_refuses_a_negative_value_by_name():
    """No numeric key is taken unchecked: -1 in any int or float field of any table is refused in one line
    that names the key (a new field without validation fails here)."""
    import dataclasses
    import types
    import typing

    from minigpt.core.config import Config, config_from_dict

    for section in Config.SECTIONS:
        cls = type(getattr(Config(), section))
        for f in dataclasses.fields(cls):
            hint = typing.get_type_hints(cls)[f.name]
            if typing.get_origin(hint) in (typing.Union, types.UnionType):
                hint = next(a for a in typing.get_args(hint) if a is not type(None))
            if hint in (int, float):
                with pytest.raises(UserError, match=rf"{section}\.{f.name}\b"):
                    config_from_dict({section: {f.name: -1}})


@pytest.mark.parametrize("sets, message", CONFIG_ROWS, ids=[" ".join(s) for s, _ in CONFIG_ROWS])
def test_bad_config_values(corpus_dir, data_cache, tmp_path, sets, message):
    out = tmp_path / "run"
    r = run_cli(T, *set_args(tiny_overrides(corpus_dir, data_cache, out) + sets))
    one_line_error(r, message)
    assert not out.exists()  # nothing written


@pytest.mark.parametrize("argv, message", FLAG_ROWS, ids=[" ".join(a) for a, _ in FLAG_ROWS])
def test_bad_flags(good_run, argv, message):
    r = run_cli(*[str(good_run) if a == "RUN" else a for a in argv])
    one_line_error(r, message)


@pytest.mark.parametrize("how, message", DAMAGED_ROWS, ids=[h for h, _ in DAMAGED_ROWS])
def test_damaged_run_directories(good_run, tmp_path, capfd, how, message):
    run = damaged(good_run, tmp_path, how)
    commands = [["train", "--resume", str(run), "--set", "train.max_steps=4"]]  # reads every file of the run
    if how != "pickle":  # generate reads no training state
        commands.append(["generate", "--run", str(run), "--prompt", "x"])
    for argv in commands:
        if how == "no tokenizer" and argv[0] == "train":
            continue  # a resumed run takes its tokenizer from the corpus it is pinned to
        one_line_error(run_cli(*argv), message)
    assert "pwned" not in capfd.readouterr().out  # the pickle's code never ran


def test_filesystem_failures_are_one_line(corpus_dir, data_cache, tmp_path, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("x")
    r = run_cli(T, *set_args(tiny_overrides(corpus_dir, data_cache, afile / "run")))
    one_line_error(r, "a part of the path is a file, not a directory")
    r = run_cli(T, *set_args(tiny_overrides(corpus_dir, data_cache, afile)))
    one_line_error(r, "a file of that name is in the way")
    for code, fix in ((errno.ENOSPC, "free disk space or write elsewhere"), (errno.EROFS, "the file system is read-only")):
        def failing_save(obj, path, *a, _code=code, **k):
            raise OSError(_code, "simulated", str(path))
        monkeypatch.setattr(checkpoint.torch, "save", failing_save)
        out = tmp_path / f"run{code}"
        r = run_cli(T, *set_args(tiny_overrides(corpus_dir, data_cache, out, **{"train.max_steps": 2})))
        one_line_error(r, fix)
        assert not (out / "latest.json").exists() and not list(out.rglob("*.partial"))
        monkeypatch.undo()


def test_a_diverged_run_is_not_checkpointed(tiny_cfg, tmp_path, monkeypatch):
    from minigpt.parallel.ddp import TorchBackend

    real = TorchBackend.step

    def diverging(backend, batches):  # the loss turns NaN from step 6 on, as a diverged run's does
        diverging.calls += 1
        loss, result = real(backend, batches)
        return (loss * float("nan") if diverging.calls >= 6 else loss), result
    diverging.calls = 0

    monkeypatch.setattr(TorchBackend, "step", diverging)
    with pytest.raises(Exception) as e:
        train(tiny_cfg(**{"train.max_steps": 8, "train.checkpoint_every": 4}), log=lambda *a, **k: None)
    assert "training diverged: the loss is nan at step 8" in str(e.value)
    assert checkpoint.latest_checkpoint(tmp_path / "run")[1] == 4  # the good checkpoint stays


def test_json_output_is_always_valid_json():
    from minigpt.core.fmt import to_json

    text = to_json({"loss": float("nan"), "x": [float("inf"), 1.0], "ok": 2})
    assert json.loads(text) == {"loss": None, "x": [None, 1.0], "ok": 2}
    r = run_cli("extrapolate", "--target", "gpt4", "--gpu", "H100", "--serve", "--json")
    assert r.returncode == 0 and "NaN" not in r.stdout and json.loads(r.stdout)["serving"]["num_gpus"] > 0
