"""What a user of `minigpt generate` gets: samples per prompt, prompts from files and stdin,
streaming, statistics apart from the text, a chosen checkpoint, and RoPE past block_size."""

import io
import json
import sys

import pytest
import torch
from conftest import run_cli

from minigpt.core.config import ModelConfig
from minigpt.infer.generate import generate_ids
from minigpt.nn.model import GPT


@pytest.fixture(scope="module")
def run(tmp_path_factory, corpus_dir, data_cache):
    from conftest import REPO, tiny_overrides

    from minigpt.core.config import load_config
    from minigpt.train.loop import train

    out = tmp_path_factory.mktemp("gen") / "run"
    cfg = load_config(REPO / "configs" / "tiny.toml", tiny_overrides(corpus_dir, data_cache, out, **{
        "train.max_steps": 4, "train.checkpoint_every": 2, "train.keep_checkpoints": 2}))
    train(cfg, log=lambda *a: None)
    return str(out)


def test_samples_per_prompt_prompt_files_and_stdin(run, tmp_path, monkeypatch):
    f = tmp_path / "p.txt"
    f.write_text("class A:\n    def")
    monkeypatch.setattr(sys, "stdin", io.StringIO("import "))
    r = run_cli("generate", "--run", run, "--prompt", "x", "--prompt-file", str(f), "--prompt-file", "-",
                "--num-samples", "2", "--max-new-tokens", "4", "--temperature", "1", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)  # --json: the JSON object alone
    prompts = [s["prompt"] for s in out["samples"]]
    assert prompts == ["x", "x", "class A:\n    def", "class A:\n    def", "import ", "import "]
    assert all(s["text"].startswith(s["prompt"]) for s in out["samples"]) and out["batch"] == 6
    r = run_cli("generate", "--run", run, "--prompt-file", str(tmp_path / "missing.txt"))
    assert r.returncode == 2 and "cannot read prompt file" in r.stderr


def test_streaming_prints_the_same_text_and_stats_go_to_stderr(run):
    args = ["generate", "--run", run, "--prompt", "def", "--max-new-tokens", "12", "--temperature", "0"]
    streamed, plain = run_cli(*args, "--stream"), run_cli(*args, "--no-stream")
    assert streamed.returncode == plain.returncode == 0
    assert streamed.stdout == plain.stdout  # the text, and nothing else, on stdout
    assert "ms per decode step" in streamed.stderr and "ms per decode step" not in streamed.stdout


def test_a_kept_checkpoint_step_is_chosen(run):
    r2 = run_cli("generate", "--run", run, "--step", "2", "--prompt", "def", "--temperature", "0", "--json")
    r4 = run_cli("generate", "--run", run, "--prompt", "def", "--temperature", "0", "--json")
    assert json.loads(r2.stdout)["step"] == 2 and json.loads(r4.stdout)["step"] == 4
    r = run_cli("generate", "--run", run, "--step", "3")
    assert r.returncode == 2 and "keeps no checkpoint of step 3; it keeps steps [2, 4]" in r.stderr


def test_rope_goes_past_block_size_with_a_sliding_window_and_learned_positions_stop():
    torch.manual_seed(0)
    rope = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, pos_emb="rope"))
    g = generate_ids(rope, [[1, 2, 3]], 40, temperature=0)
    assert len(g.new_tokens[0]) == 40 and g.windowed and not g.capped
    # the window's tokens are what a fresh forward over the last block_size tokens predicts
    full = [1, 2, 3] + g.new_tokens[0]
    for L in (20, 30, 42):
        window = torch.tensor([full[L - 16:L]])
        assert int(rope(window).logits[0, -1].argmax()) == full[L]
    # and the cached part equals uncached decoding
    assert generate_ids(rope, [[1, 2, 3]], 40, temperature=0, use_cache=False).new_tokens == g.new_tokens
    learned = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=64))
    g = generate_ids(learned, [[1, 2, 3]], 40, temperature=0)
    assert len(g.new_tokens[0]) == 13 and g.capped and not g.windowed


def test_bench_decode_writes_the_curve_and_its_plot(tmp_path):
    out = tmp_path / "curve.json"
    r = run_cli("bench", "decode", "--set", "model.n_layer=1", "--batch", "1", "--batch", "4", "--context", "8",
                "--new-tokens", "4", "--device", "cpu", "--out", str(out))
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert [row["batch"] for row in data["rows"]] == [1, 4] and out.with_suffix(".png").stat().st_size > 10_000
    for row in data["rows"]:
        assert row["decode_tokens_per_s_total"] == pytest.approx(row["batch"] * row["decode_tokens_per_s_per_sequence"], rel=0.01)
        assert 0 < row["fraction_of_bandwidth_bound"] and row["bandwidth_bound_tokens_per_s"] > 0
        assert row["prefill_tokens_per_s"] > 0 and row["compute_bound_tokens_per_s"] > 0
    assert "bandwidth bound" in data["convention"]


def test_serving_at_a_per_user_speed_from_measurement(tmp_path):
    """More speed per user costs more GPUs; a measured decode curve replaces the assumed
    efficiency and a measured speculative speed-up is applied, each said."""
    def serve(*extra):
        r = run_cli("extrapolate", "--target", "gpt3-175b", "--gpu", "H100", "--serve", "--users", "4.5e6", "--json", *extra)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)["serving_at_user_speed"]

    base = serve()
    assert base["tokens_per_s_per_user"] == 30 and "assumption" in base["tokens_per_s_per_user_source"]
    assert base["per_user_tokens_per_s"] >= 30 and "assumption" in base["efficiency_source"]
    assert serve("--tokens-per-s-per-user", "60")["num_gpus"] > base["num_gpus"]
    curve = tmp_path / "curve.json"
    curve.write_text(json.dumps({"device_name": "X", "rows": [
        {"context": 1024, "batch": b, "fraction_of_bandwidth_bound": 0.8} for b in (1, 8, 64)]}))
    measured = serve("--from-decode-bench", str(curve))
    assert measured["efficiency"] == 0.8 and measured["efficiency_source"].startswith("measured")
    assert measured["num_gpus"] < base["num_gpus"]  # 80% of the bound beats the assumed 30%
    faster = serve("--from-decode-bench", str(curve), "--speculate", "2")
    assert faster["speculative_speedup"] == 2 and faster["num_gpus"] < measured["num_gpus"]
    slow = serve("--tokens-per-s-per-user", "5000")
    assert slow["met"] is False and "no replica of up to 64" in slow["note"]
    r = run_cli("extrapolate", "--target", "gpt3-175b", "--serve", "--speculate", "fast")
    assert r.returncode == 2 and "neither a number nor" in r.stderr
