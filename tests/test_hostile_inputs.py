"""A second table of bad inputs, across every command, each written to be hostile but fair: files that are not
UTF-8 or nest without end, sizes that would exhaust memory or time, names of things that do not exist, run
directories crafted by someone else. Each must get one line `error: ...` naming the problem, exit code 2, no
traceback, and touch nothing outside what it names.

`clean(r)` is the criterion the closing note counts (a one-line error, exit 2, no traceback); the rows also
say what the line must name."""

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import run_cli, set_args, tiny_overrides


def clean(r) -> bool:
    lines = r.stderr.strip().splitlines()
    return r.returncode == 2 and "Traceback" not in r.stderr and len(lines) == 1 and lines[0].startswith("error: ")


def _file(tmp: Path, name: str, data: bytes | str) -> str:
    path = tmp / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(path)


def _huge_config(tmp: Path) -> str:
    """A run-shaped config.json for a model far beyond this machine: 1000 layers x 8192."""
    raw = {"model": {"n_layer": 1000, "n_head": 64, "n_embd": 8192, "block_size": 2048, "vocab_size": 50257}}
    return _file(tmp, "huge.toml", "[model]\n" + "\n".join(f"{k} = {v}" for k, v in raw["model"].items()))


def _crafted_run(good_run: Path, tmp: Path, **model) -> str:
    """A copy of a good run whose config.json claims another model shape."""
    run = tmp / "crafted"
    shutil.copytree(good_run, run)
    cfg = json.loads((run / "config.json").read_text())
    cfg["model"].update(model, n_kv_head=model["n_head"], head_dim=model["n_embd"] // model["n_head"],
                        ffn_hidden=4 * model["n_embd"])
    (run / "config.json").write_text(json.dumps(cfg))
    return str(run)


def _swapped_tokenizer(good_run: Path, tmp: Path, data_cache: Path, corpus_dir: Path) -> str:
    """A run whose tokenizer.json was replaced by another vocabulary (a BPE of 300 tokens)."""
    from minigpt.data.sources import Document
    from minigpt.data.tokenizer import train_bpe

    run = tmp / "swapped"
    shutil.copytree(good_run, run)
    tok = train_bpe([Document("x", (corpus_dir / os.listdir(corpus_dir)[0]).read_text())], 300)
    tok.save(str(run / "tokenizer.json"))
    return str(run)


NESTED = "a = " + "[" * 100_000 + "]" * 100_000
PROBES = [  # (name, argv(tmp, good_run, corpus_dir, data_cache), what the one line must name)
    ("config not UTF-8", lambda t, g, c, d: ["train", "--config", _file(t, "bad.toml", b"\xff\xfe[model]\n")],
     "is not UTF-8 text"),
    ("config nested without end", lambda t, g, c, d: ["flops", "--config", _file(t, "deep.toml", NESTED)],
     "nests too deeply"),
    ("config table is a string", lambda t, g, c, d: ["flops", "--config", _file(t, "s.toml", 'model = "x"')],
     "'model' must be a table"),
    ("target not UTF-8", lambda t, g, c, d: ["extrapolate", "--target", _file(t, "t.toml", b"\xff[model]")],
     "is not UTF-8 text"),
    ("target nested", lambda t, g, c, d: ["extrapolate", "--target", _file(t, "n.toml", NESTED)], "nests too deeply"),
    ("HF config.json not UTF-8", lambda t, g, c, d: ["flops", "--config", _file(t, "config.json", b"\xff{}")],
     "is not UTF-8 text"),
    ("HF config.json a list", lambda t, g, c, d: ["flops", "--config", _file(t, "config.json", "[1, 2]")],
     "must hold a JSON object"),
    ("unknown device, train", lambda t, g, c, d: ["train", *set_args(tiny_overrides(c, d, t / "r", **{
        "train.device": '"tpu"'}))], "train.device = 'tpu'"),
    ("unknown device, generate", lambda t, g, c, d: ["generate", "--run", str(g), "--device", "quantum"],
     "'quantum' is not a device"),
    ("unknown device, bench hardware", lambda t, g, c, d: ["bench", "hardware", "--device", "gpu0"], "'gpu0' is not a device"),
    ("unknown device, memory", lambda t, g, c, d: ["memory", "--config", "tiny", "--device", "npu"], "'npu' is not a device"),
    ("unknown device, flops", lambda t, g, c, d: ["flops", "--config", "tiny", "--device", "abacus"],
     "'abacus' is not a device"),
    ("plot to a .txt", lambda t, g, c, d: ["plot", str(g), "--out", str(t / "loss.txt")], "--out"),
    ("plot into a missing folder", lambda t, g, c, d: ["plot", str(g), "--out", str(t / "no" / "where" / "l.png")],
     "does not exist"),
    ("plot onto a directory", lambda t, g, c, d: ["plot", str(g), "--out", str(t)], "is a directory"),
    ("flops at sequence length 0", lambda t, g, c, d: ["flops", "--config", "tiny", "--seq-len", "0", "--device", "cpu"],
     None),  # 0 means block_size: not an error (checked below)
    ("flops at a huge batch on cpu", lambda t, g, c, d: ["flops", "--config", "tiny", "--batch-size", "100000000",
                                                           "--device", "cpu"], "needs"),
    ("memory of 1e30 parameters", lambda t, g, c, d: ["memory", "--params", "1e30"], "--params: 1e30 must be"),
    ("memory at a batch in the millions", lambda t, g, c, d: ["memory", "--config", "tiny", "--batch-size", "5000000"],
     "needs"),
    ("memory --dp absurd", lambda t, g, c, d: ["memory", "--params", "1e9", "--dp", "10000000000"], "--dp"),
    ("generate a 1000-layer crafted run", lambda t, g, c, d: ["generate", "--run", _crafted_run(g, t, n_layer=1000,
                                                              n_embd=8192, n_head=64), "--prompt", "x"], "needs"),
    ("convert a 1000-layer crafted run", lambda t, g, c, d: ["convert", "--to-hf", _crafted_run(g, t, n_layer=1000,
                                                             n_embd=8192, n_head=64), "--out", str(t / "hf")], "needs"),
    ("bench decode of a huge config", lambda t, g, c, d: ["bench", "decode", "--config", _huge_config(t), "--device",
                                                           "cpu", "--out", str(t / "d.json")], "needs"),
    ("simulate 100,000 ranks", lambda t, g, c, d: ["simulate", "--config", "tiny", "--world", "100000"],
     "simulate at most"),
    ("simulate a micro-batch in the millions", lambda t, g, c, d: ["simulate", "--config", "tiny", "--world", "2",
                                                                    "--micro-batch", "9999999"], "--micro-batch"),
    ("generate --max-new-tokens absurd", lambda t, g, c, d: ["generate", "--run", str(g), "--max-new-tokens",
                                                              "1000000000"], "--max-new-tokens"),
    ("generate --num-samples with a huge batch", lambda t, g, c, d: ["generate", "--run", str(g), "--num-samples",
                                                                      "1024", *(["--prompt", "x"] * 64)], "batch"),
    ("train with block_size 1", lambda t, g, c, d: ["train", *set_args(tiny_overrides(c, d, t / "r", **{
        "model.block_size": 1}))], "model.block_size = 1"),
    ("train with a prompt longer than the block", lambda t, g, c, d: ["train", *set_args(tiny_overrides(c, d, t / "r", **{
        "sample.prompt": '"' + "def f(): return 1\\n" * 40 + '"'}))], "sample.prompt"),
    ("resume with a swapped tokenizer", lambda t, g, c, d: ["train", "--resume", _swapped_tokenizer(g, t, d, c),
                                                             "--set", "train.max_steps=3"], "tokenizer.json"),
    ("generate with a swapped tokenizer", lambda t, g, c, d: ["generate", "--run", _swapped_tokenizer(g, t, d, c),
                                                               "--prompt", "def"], "tokenizer.json"),
    ("serve on a host that does not exist", lambda t, g, c, d: ["serve", "--run", str(g), "--host", "999.1.1.1"],
     "--host 999.1.1.1"),
    ("extrapolate --plan with a bad key", lambda t, g, c, d: ["extrapolate", "--plan", "tensor=8"], "'tensor=8'"),
    ("simulate --plan with pp beyond layers", lambda t, g, c, d: ["simulate", "--config", "tiny", "--plan",
                                                                   "dp=2,pp=9"], "more pipeline stages"),
    ("train --plan whose dp is not the world", lambda t, g, c, d: ["train", "--plan", "dp=4", *set_args(tiny_overrides(
        c, d, t / "r"))], "has 4 ranks, but 1 were given"),
    ("extrapolate --tokens negative", lambda t, g, c, d: ["extrapolate", "--tokens", "-5"], "--tokens"),
    ("extrapolate --price nan", lambda t, g, c, d: ["extrapolate", "--price", "nan"], "--price"),
    ("extrapolate an HF config.json with no tokens", lambda t, g, c, d: ["extrapolate", "--target", _file(
        t, "config.json", json.dumps({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
                                      "num_attention_heads": 4, "intermediate_size": 128, "vocab_size": 100,
                                      "max_position_embeddings": 64}))], "--tokens"),
    ("prepare a folder with no text", lambda t, g, c, d: ["prepare", "--set", f"data.source={t / 'empty'}",
                                                           "--set", f"data.cache_dir={d}"], "no"),
    ("generate --prompt-file that is a directory", lambda t, g, c, d: ["generate", "--run", str(g), "--prompt-file",
                                                                       str(t)], "cannot read prompt file"),
    ("generate --step that was never kept", lambda t, g, c, d: ["generate", "--run", str(g), "--step", "999"],
     "keeps no checkpoint of step 999"),
    ("memory --run of a run without per-rank memory", lambda t, g, c, d: ["memory", "--run", str(g)], "memory_per_rank"),
    ("convert --from-hf a folder without config.json", lambda t, g, c, d: ["convert", "--from-hf", str(t), "--out",
                                                                            str(t / "o")], "config.json"),
    ("flops sweep into a file", lambda t, g, c, d: ["flops", "sweep", "--out", _file(t, "f", "x")], "--out"),
]


@pytest.mark.parametrize("name, argv, message", PROBES, ids=[p[0] for p in PROBES])
def test_hostile_inputs_get_one_line(name, argv, message, tmp_path, good_run, corpus_dir, data_cache):
    (tmp_path / "empty").mkdir()
    r = run_cli(*argv(tmp_path, good_run, corpus_dir, data_cache))
    if message is None:
        assert r.returncode == 0, r.stderr
        return
    assert clean(r), (r.returncode, r.stderr[-1500:])
    assert message in r.stderr, r.stderr


def test_there_are_at_least_40_probes_and_every_command_is_probed(tmp_path, good_run, corpus_dir, data_cache):
    commands = set()
    for i, (_, argv, _) in enumerate(PROBES):
        (tmp_path / str(i)).mkdir()
        commands.add(argv(tmp_path / str(i), good_run, corpus_dir, data_cache)[0])
    assert len(PROBES) >= 40
    assert commands >= {"train", "generate", "plot", "flops", "memory", "simulate", "extrapolate", "prepare", "convert",
                        "serve", "bench"}, commands
