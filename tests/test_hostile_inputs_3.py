"""Reliability, third pass: hostile and careless inputs found by probing as an attacker and a careless user
would, each answered with one line and exit 2 (or the right HTTP status), never a hang, a traceback, a
silently wrong result or a file written outside the run. Uses only the command line, run files and the
HTTP API, so the same cases run against any version (the closing note gives the before/after counts)."""

from __future__ import annotations

import json
import os
import shutil
import threading

import pytest
from conftest import REPO, run_cli, serving, set_args, tiny_overrides

pytest.importorskip("fastapi")

HANG_S = 60  # a liveness bound: each case answers in well under a second on an idle machine


def one_line(r, *words):
    assert r.returncode == 2, (r.returncode, r.stdout[-500:], r.stderr[-1500:])
    assert "Traceback" not in r.stderr, r.stderr[-1500:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-1500:]
    for w in words:
        assert w in lines[0], lines[0]


def bounded(*args):
    """run_cli in a thread, with a liveness bound: a command blocked on a FIFO fails the test, not the suite."""
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("r", run_cli(*args)), daemon=True)
    t.start()
    t.join(HANG_S)
    assert "r" in box, f"minigpt {' '.join(args[:3])} still running after {HANG_S} s: it blocked (on a FIFO?)"
    return box["r"]


@pytest.fixture
def run(good_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(good_run, dst)
    return dst


def latest_folder(run):
    return run / json.loads((run / "latest.json").read_text())["dir"]


# ------------------------------------------------------------------------------------------------
# run files that are not regular files: refused at once, never waited on


def _fifo(path):
    path.unlink() if path.exists() or path.is_symlink() else None
    os.mkfifo(path)


@pytest.mark.parametrize("target", ["config.json", "tokenizer.json", "latest.json", "data.json", "weights"])
def test_a_fifo_where_generate_reads_a_run_file_is_refused_not_waited_on(run, target):
    _fifo(latest_folder(run) / "model.safetensors" if target == "weights" else run / target)
    one_line(bounded("generate", "--run", str(run), "--max-new-tokens", "2"))


def test_a_fifo_as_the_training_state_is_refused_on_resume(run):
    _fifo(latest_folder(run) / "state.pt")
    one_line(bounded("train", "--resume", str(run), "--set", "train.max_steps=4"))


def test_a_fifo_as_metrics_jsonl_is_refused_by_resume_and_plot(run, tmp_path):
    _fifo(run / "metrics.jsonl")
    one_line(bounded("train", "--resume", str(run), "--set", "train.max_steps=4"))
    one_line(bounded("plot", str(run), "--out", str(tmp_path / "p.png")))


def test_a_folder_where_config_json_should_be(run):
    (run / "config.json").unlink()
    (run / "config.json").mkdir()
    one_line(bounded("generate", "--run", str(run), "--max-new-tokens", "2"))


def test_a_tokenizer_that_is_a_link_is_not_followed(run, tmp_path):
    outside = tmp_path / "elsewhere.json"
    shutil.copy(run / "tokenizer.json", outside)
    (run / "tokenizer.json").unlink()
    (run / "tokenizer.json").symlink_to(outside)
    one_line(bounded("generate", "--run", str(run), "--max-new-tokens", "2"), "link")


# ------------------------------------------------------------------------------------------------
# every checkpoint verified, not only the latest


@pytest.fixture(scope="module")
def kept_run(corpus_dir, data_cache, tmp_path_factory):
    """A run that keeps its last two checkpoints (steps 2 and 4)."""
    from minigpt.core.config import load_config
    from minigpt.train.loop import train

    out = tmp_path_factory.mktemp("kept") / "run"
    train(load_config(REPO / "configs" / "tiny.toml", tiny_overrides(corpus_dir, data_cache, out, **{
        "train.max_steps": 4, "train.checkpoint_every": 2, "train.keep_checkpoints": 2})), log=lambda *a, **k: None)
    return out


@pytest.fixture
def kept(kept_run, tmp_path):
    dst = tmp_path / "kept"
    shutil.copytree(kept_run, dst, symlinks=True)
    return dst


def test_an_altered_older_checkpoint_is_refused(kept):
    weights = kept / "checkpoints" / "step_0000002" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-8:] = b"\x00" * 8  # the last value of the last tensor changed: same size, other content
    weights.write_bytes(bytes(data))
    one_line(bounded("generate", "--run", str(kept), "--step", "2", "--max-new-tokens", "2"), "corrupt")


def test_an_older_checkpoints_weights_as_a_link_are_refused(kept, tmp_path):
    weights = kept / "checkpoints" / "step_0000002" / "model.safetensors"
    outside = tmp_path / "w.safetensors"
    shutil.move(weights, outside)
    weights.symlink_to(outside)
    one_line(bounded("generate", "--run", str(kept), "--step", "2", "--max-new-tokens", "2"), "link")


def test_an_older_checkpoint_folder_as_a_link_is_refused(kept, tmp_path):
    folder = kept / "checkpoints" / "step_0000002"
    outside = tmp_path / "step"
    shutil.move(folder, outside)
    folder.symlink_to(outside, target_is_directory=True)
    one_line(bounded("generate", "--run", str(kept), "--step", "2", "--max-new-tokens", "2"), "link")


def test_a_file_the_record_does_not_list_is_never_loaded(run):
    """latest.json (and the folder's record) drop state.pt; a crafted state.pt sits there: resume refuses it."""
    for record in (run / "latest.json", latest_folder(run) / "files.json"):
        if record.exists():
            pointer = json.loads(record.read_text())
            pointer["files"].pop("state.pt")
            record.write_text(json.dumps(pointer))
    one_line(bounded("train", "--resume", str(run), "--set", "train.max_steps=4"), "state.pt")


def test_a_hard_linked_lock_is_refused_and_its_other_name_untouched(run, tmp_path):
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me\n")
    lock = run / ".lock"
    lock.unlink(missing_ok=True)
    os.link(precious, lock)
    one_line(bounded("train", "--resume", str(run), "--set", "train.max_steps=4"), "lock")
    assert precious.read_text() == "keep me\n"


# ------------------------------------------------------------------------------------------------
# damaged metrics: one line or the damaged lines skipped, never a traceback


GARBAGE = b'\x00\xff\xfe not json\n[1, 2]\n{"kind": "step", "step": "x", "loss": "nan?"}\n"a string"\n'


def test_damaged_metrics_jsonl_resume(run):
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(GARBAGE)
    r = bounded("train", "--resume", str(run), "--set", "train.max_steps=4")
    assert "Traceback" not in r.stderr, r.stderr[-1500:]
    assert r.returncode in (0, 2), r.stderr[-800:]


def test_damaged_metrics_jsonl_plot(run, tmp_path):
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(GARBAGE)
    r = bounded("plot", str(run), "--out", str(tmp_path / "p.png"))
    assert "Traceback" not in r.stderr, r.stderr[-1500:]
    assert r.returncode in (0, 2), r.stderr[-800:]


# ------------------------------------------------------------------------------------------------
# what a run depends on, pinned


def _train(cfg_sets, log=None):
    r = run_cli("train", "--config", "tiny", *set_args(cfg_sets))
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.fixture(scope="module")
def base_and_lora(corpus_dir, data_cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base, lora = root / "base", root / "lora"
    _train(tiny_overrides(corpus_dir, data_cache, base, **{"train.max_steps": 2}))
    _train(tiny_overrides(corpus_dir, data_cache, lora, **{"train.max_steps": 2, "train.init_from": f'"{base}"',
                                                           "train.lora_rank": 2}))
    return base, lora


def test_a_lora_run_whose_base_trained_further_is_refused(base_and_lora, corpus_dir, data_cache, tmp_path):
    base, lora = base_and_lora
    moved_base, moved_lora = tmp_path / "base", tmp_path / "lora"
    shutil.copytree(base, moved_base)
    shutil.copytree(lora, moved_lora)
    cfg = json.loads((moved_lora / "config.json").read_text())
    cfg["train"]["init_from"] = str(moved_base)
    (moved_lora / "config.json").write_text(json.dumps(cfg))
    r = run_cli("train", "--resume", str(moved_base), "--set", "train.max_steps=4")
    assert r.returncode == 0, r.stderr[-1500:]
    one_line(bounded("generate", "--run", str(moved_lora), "--max-new-tokens", "2"), "base")


def test_a_lora_run_naming_itself_as_its_base(base_and_lora, tmp_path):
    _, lora = base_and_lora
    mine = tmp_path / "lora"
    shutil.copytree(lora, mine)
    cfg = json.loads((mine / "config.json").read_text())
    cfg["train"]["init_from"] = str(mine)
    (mine / "config.json").write_text(json.dumps(cfg))
    one_line(bounded("generate", "--run", str(mine), "--max-new-tokens", "2"))


def test_a_distillation_resumed_with_another_teacher_is_refused(corpus_dir, data_cache, tmp_path):
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    _train(tiny_overrides(corpus_dir, data_cache, teacher, **{"train.max_steps": 2}))
    _train(tiny_overrides(corpus_dir, data_cache, student, **{"train.max_steps": 2, "train.distill_from": f'"{teacher}"'}))
    assert run_cli("train", "--resume", str(teacher), "--set", "train.max_steps=4").returncode == 0
    one_line(bounded("train", "--resume", str(student), "--set", "train.max_steps=4"), "teacher")


def test_a_converted_runs_tokenizer_is_pinned(good_run, tmp_path):
    pytest.importorskip("transformers")
    hf, back = tmp_path / "hf", tmp_path / "back"
    assert run_cli("convert", "--to-hf", str(good_run), "--out", str(hf)).returncode == 0
    assert run_cli("convert", "--from-hf", str(hf), "--out", str(back)).returncode == 0
    tok = json.loads((back / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]  # two tokens swap ids: as valid, as large, and every text encodes differently
    a, b = sorted(vocab)[100], sorted(vocab)[200]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (back / "tokenizer.json").write_text(json.dumps(tok))
    one_line(bounded("generate", "--run", str(back), "--max-new-tokens", "2"), "tokenizer")


# ------------------------------------------------------------------------------------------------
# crafted config.json for convert --from-hf, hostile tables for backtest


GPT2 = {"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 64, "vocab_size": 320}
LLAMA = {"model_type": "llama", "num_hidden_layers": 2, "num_attention_heads": 2, "hidden_size": 32,
         "intermediate_size": 64, "max_position_embeddings": 64, "vocab_size": 320}


@pytest.mark.parametrize("raw", [
    {k: v for k, v in LLAMA.items() if k != "num_hidden_layers"},  # a key missing
    {**GPT2, "n_layer": "two"},  # a string where a count goes
    {**GPT2, "n_embd": 32.5},  # a float where a count goes
    {**LLAMA, "vocab_size": -5},  # negative
    {**LLAMA, "num_key_value_heads": [1]},  # a list
    [GPT2],  # not an object
    {**GPT2, "model_type": ["gpt2"]},  # an unhashable model type
], ids=["missing", "string", "float", "negative", "list", "not-object", "type-list"])
def test_convert_from_a_crafted_hf_config_is_one_line(tmp_path, raw):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(raw))
    one_line(bounded("convert", "--from-hf", str(folder), "--out", str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_backtest_refuses_a_deeply_nested_table(tmp_path):
    table = tmp_path / "t.toml"
    table.write_text("x = " + "[" * 50_000 + "]" * 50_000 + "\n")
    one_line(bounded("backtest", "--table", str(table)))


def test_backtest_refuses_wrong_types(tmp_path):
    text = (REPO / "minigpt" / "analytic" / "published_runs.toml").read_text()
    table = tmp_path / "t.toml"
    table.write_text(text.replace("seq_len = 2048", 'seq_len = "long"', 1))
    one_line(bounded("backtest", "--table", str(table)))


def test_backtest_refuses_an_endless_table(tmp_path):
    table = tmp_path / "t.toml"
    with open(table, "w") as f:
        f.write("# " + "x" * (40 << 20) + "\n")
    one_line(bounded("backtest", "--table", str(table)))


def test_backtest_refuses_a_fifo_table(tmp_path):
    table = tmp_path / "t.toml"
    os.mkfifo(table)
    one_line(bounded("backtest", "--table", str(table)))


# ------------------------------------------------------------------------------------------------
# numbers checked where they enter, found before work


@pytest.mark.parametrize("args", [
    ["--tokens", "1e300"], ["--days", "1e-300"], ["--num-gpus", "1000000000000000"], ["--price", "1e300"],
], ids=["tokens", "days", "gpus", "price"])
def test_extrapolate_refuses_numbers_that_give_no_finite_answer(args):
    r = bounded("extrapolate", "--target", "gpt3-175b", "--gpu", "H100", "--json", *args)
    if r.returncode == 0:
        out = json.loads(r.stdout)
        for key in ("days", "gpu_hours", "cost_usd", "mfu"):
            assert isinstance(out.get(key), (int, float)) and out[key] == out[key] and abs(out[key]) < float("inf"), key
    else:
        one_line(r)


def test_a_micro_batch_far_above_the_batch_is_refused_or_clamped_before_training(corpus_dir, data_cache, tmp_path):
    sets = tiny_overrides(corpus_dir, data_cache, tmp_path / "run", **{"train.micro_batch_size": 100_000,
                                                                       "train.batch_size_tokens": 256,
                                                                       "train.max_steps": 2})
    r = bounded("train", "--config", "tiny", *set_args(sets))
    if r.returncode == 2:
        one_line(r, "micro_batch_size")
    else:
        assert r.returncode == 0, r.stderr[-1500:]


def test_generate_at_a_vanishing_temperature_is_greedy_not_empty(good_run):
    r = bounded("generate", "--run", str(good_run), "--prompt", "def ", "--max-new-tokens", "6", "--temperature",
                "1e-40", "--json")
    assert r.returncode == 0, r.stderr[-1500:]
    text = json.loads(r.stdout)["samples"][0]["text"]
    greedy = json.loads(bounded("generate", "--run", str(good_run), "--prompt", "def ", "--max-new-tokens", "6",
                                "--temperature", "0", "--json").stdout)["samples"][0]["text"]
    assert text == greedy


def test_serve_refuses_a_key_http_cannot_carry(good_run):
    one_line(bounded("serve", "--run", str(good_run), "--port", "8", "--api-key", "clé-ü"), "api-key")


def test_a_full_disk_on_a_metrics_append_names_the_file(run, monkeypatch):
    import errno

    real = open

    def full(path, mode="r", *a, **k):
        if str(path).endswith("metrics.jsonl") and "a" in mode:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, mode, *a, **k)

    monkeypatch.setattr("builtins.open", full)
    one_line(bounded("train", "--resume", str(run), "--set", "train.max_steps=4"), "metrics.jsonl")


# ------------------------------------------------------------------------------------------------
# the server: every path under every limit, the right status


@pytest.fixture(scope="module")
def server(tmp_path_factory, corpus_dir, data_cache):
    from minigpt.core.config import load_config
    from minigpt.infer.serve import Limits, create_app
    from minigpt.train.loop import train

    try:
        from minigpt.run.load import load_run
    except ImportError:  # before run reading moved below training
        from minigpt.train.checkpoint import load_run
    out = tmp_path_factory.mktemp("serve3") / "run"
    train(load_config(REPO / "configs" / "tiny.toml", tiny_overrides(corpus_dir, data_cache, out, **{
        "train.max_steps": 2, "model.block_size": 64})), log=lambda *a: None)
    model, tok, cfg, _ = load_run(out)
    limits = Limits(max_tokens=32, max_prompt_tokens=24, max_queue=4, max_n=4)
    app = create_app(model, tok, "m", tok.token_to_id(cfg.sample.stop_token), max_batch=4, limits=limits)
    with serving(app) as port:
        yield {"url": f"http://127.0.0.1:{port}/v1", "model": model, "tok": tok}


def post(server, body: dict | bytes):
    import urllib.error
    import urllib.request

    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(server["url"] + "/completions", data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=HANG_S) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except json.JSONDecodeError:
            return e.code, {"not_json": raw[:200].decode("latin-1")}


LONG = "def f(x):\n    return x\n" * 40  # far over the 24 prompt tokens this server takes


@pytest.mark.parametrize("body", [
    {"model": "m", "prompt": LONG, "max_tokens": 1, "logprobs": 1},  # prompt over the limit
    {"model": "m", "prompt": LONG, "max_tokens": 1, "echo": True},
    {"model": "m", "prompt": "def ", "max_tokens": 200, "logprobs": 1},  # max_tokens over the limit
], ids=["logprobs-prompt", "echo-prompt", "logprobs-max-tokens"])
def test_the_logprobs_and_echo_path_is_under_every_limit(server, body):
    status, out = post(server, body)
    assert status == 400 and "error" in out, (status, out)


def test_echo_offsets_are_the_cumulative_text_lengths(server):
    status, out = post(server, {"model": "m", "prompt": "def f(x): return", "max_tokens": 2, "echo": True, "logprobs": 0,
                                "temperature": 0})
    assert status == 200, out
    lp = out["choices"][0]["logprobs"]
    starts = [0]
    for t in lp["tokens"][:-1]:
        starts.append(starts[-1] + len(t))
    assert lp["text_offset"] == starts


def test_a_lone_surrogate_in_a_prompt_is_a_json_400(server):
    raw = b'{"model": "m", "prompt": "abc \\ud800 def", "max_tokens": 2}'
    status, out = post(server, raw)
    assert status == 400 and "error" in out, (status, out)
    status, out = post(server, b'{"model": "m", "prompt": "abc \\ud800", "max_tokens": 2, "logprobs": 1}')
    assert status == 400 and "error" in out, (status, out)


def test_a_vanishing_temperature_is_greedy_on_the_server(server):
    body = {"model": "m", "prompt": "def ", "max_tokens": 6}
    tiny = post(server, {**body, "temperature": 1e-40})
    greedy = post(server, {**body, "temperature": 0})
    assert tiny[0] == 200 and tiny[1]["choices"][0]["text"] == greedy[1]["choices"][0]["text"], (tiny, greedy)


def test_a_request_that_can_never_fit_is_400_not_503(server):
    status, out = post(server, {"model": "m", "prompt": ["a", "b", "c"], "max_tokens": 2, "n": 4})  # 12 > batch 4 + queue 4
    assert status == 400 and "error" in out, (status, out)


def test_nan_weights_on_the_logprobs_path_give_a_json_error(server):
    import torch

    model = server["model"]
    saved = model.lm_head.weight.detach().clone()
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    try:
        status, out = post(server, {"model": "m", "prompt": "def ", "max_tokens": 2, "logprobs": 1})
    finally:
        with torch.no_grad():
            model.lm_head.weight.copy_(saved)
    assert status >= 400 and "error" in out, (status, out)


def test_a_drain_that_runs_out_mid_decode_exits_0_and_counts_what_it_cut(good_run):
    """SIGTERM with a stream that cannot finish within the drain: the process exits 0 (not SIGABRT) and says the
    stream was cut."""
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    from conftest import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "minigpt", "serve", "--run", str(good_run), "--port", str(port),
                             "--threads", "1", "--drain-seconds", "0.2"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert "serving" in proc.stdout.readline()
        body = json.dumps({"model": "x", "prompt": "def ", "max_tokens": 28, "stream": True, "ignore_eos": True}).encode()
        for _ in range(300):  # the line is printed before the port is bound
            try:
                name = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=30).read())
                break
            except OSError:
                time.sleep(0.05)
        name = name["data"][0]["id"]
        body = body.replace(b'"x"', json.dumps(name).encode())
        r = urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                                          {"content-type": "application/json"}), timeout=30)
        assert r.readline().startswith(b"data: ")
        proc.send_signal(signal.SIGTERM)
        try:
            r.read()
        except Exception:  # the stream cut by the drain's limit: what the client sees is up to the transport
            pass
        assert proc.wait(timeout=HANG_S) == 0, proc.stdout.read()[-2000:]
        out = proc.stdout.read()
        assert "requests in flight at the signal" in out and "Traceback" not in out, out[-2000:]
    finally:
        proc.kill()


def test_stopping_the_scheduler_mid_decode_ends_the_thread_between_steps_and_counts_the_cut(server):
    """What the drain's end does: the decode thread stops between two steps (never inside a torch op), and every
    request still running or queued is ended and counted."""
    import asyncio
    import time as _time

    from minigpt.infer.engine import Sampling, Sequence
    from minigpt.infer.detokenize import IncrementalText
    from minigpt.infer.serve import Job, Scheduler

    model = server["model"]
    sched = Scheduler(model, max_batch=1)
    real = sched.engine.step
    sched.engine.step = lambda: (_time.sleep(0.05), real())[1]  # each step slow: the jobs are mid-decode
    loop = asyncio.new_event_loop()
    out = asyncio.Queue()
    jobs = [Job(Sequence([1, 2, 3], 40, Sampling(0.0, 0, 1.0), 0, frozenset()), i, out, loop, IncrementalText(server["tok"], ()))
            for i in range(3)]  # one running, two queued
    for j in jobs:
        j.seq.tag = j
        sched.submit([j])
    _time.sleep(0.3)
    assert sched.stop() == 3
    assert not sched._thread.is_alive() and sched.ended_by.get("shutdown") == 3
    loop.close()
