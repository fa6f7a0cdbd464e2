"""What a new user meets: every option explained, one thread rule, --json alone on stdout, --version, and a
quickstart that stops like train."""

import argparse
import json
import signal
import sys

import pytest
from conftest import Proc, run_cli, set_args, tiny_overrides

from minigpt.cli import build_parser
from minigpt.core import device


def test_every_option_of_every_command_says_what_it_does():
    missing = []

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, path + [name])
            elif action.option_strings and not action.help:
                missing.append(f"{' '.join(path)} {action.option_strings[0]}")

    walk(build_parser(), ["minigpt"])
    assert missing == []


def test_version():
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--version"])
    assert e.value.code == 0


def test_one_thread_rule_that_does_not_oversubscribe_a_busy_machine(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(device.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(device, "busy_cores", lambda: (0, "runnable tasks now"))
    assert device.default_threads()[0] == 4
    monkeypatch.setattr(device, "busy_cores", lambda: (3, "runnable tasks now"))
    n, why = device.default_threads()
    assert n == 1 and "3 busy (runnable tasks now)" in why
    monkeypatch.setattr(device, "busy_cores", lambda: (9, "runnable tasks now"))
    assert device.default_threads()[0] == 1  # never zero
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert device.default_threads() == (3, "OMP_NUM_THREADS")


def test_busy_cores_sees_a_cpu_bound_process():
    import subprocess

    idle = device.busy_cores()[0]
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        import time

        time.sleep(0.3)
        assert device.busy_cores()[0] >= min(idle + 1, 1)
    finally:
        hog.kill()


@pytest.mark.parametrize("argv", [
    ["extrapolate", "--target", "gpt3-175b", "--json"],
    ["memory", "--params", "1e9", "--dp", "8", "--json"],
    ["simulate", "--config", "tiny", "--set", "model.n_layer=1", "--plan", "dp=2", "--json"],
    ["flops", "--config", "tiny", "--json"],
    ["bench", "hardware", "--device", "cpu", "--size", "128", "--repeats", "1", "--json"],
])
def test_json_is_one_object_and_nothing_else(argv):
    r = run_cli(*argv)
    assert r.returncode == 0, r.stderr
    assert isinstance(json.loads(r.stdout), dict)  # the whole of stdout is one object


def test_prepare_says_it_in_words_or_in_one_json_object(corpus_dir, data_cache):
    args = ["prepare", "--set", f"data.source={corpus_dir}", "--set", f"data.cache_dir={data_cache}"]
    words = run_cli(*args)
    assert words.returncode == 0 and "unigram" in words.stdout and "{" not in words.stdout
    assert json.loads(run_cli(*args, "--json").stdout)["event"] == "prepared"


def test_a_set_typo_is_blamed_on_the_set_not_the_preset():
    r = run_cli("train", "--set", "train.stpes=3")
    assert r.returncode == 2 and "--set 'train.stpes=3': unknown key train.stpes" in r.stderr


def test_the_quickstart_stops_like_train(corpus_dir, data_cache, tmp_path):
    """SIGTERM during the quickstart's training saves the step, says how to resume, skips sampling and the
    extrapolation, and exits 143."""
    out = tmp_path / "qs"
    sets = [s for s in tiny_overrides(corpus_dir, data_cache, out, **{"train.max_steps": 3000, "train.eval_every": 0,
                                                                       "train.checkpoint_every": 0})
            if not s.startswith("train.out_dir")]
    proc = Proc([sys.executable, "-m", "minigpt", "quickstart", "--out-dir", str(out), *set_args(sets)])
    proc.wait_for(lambda: any(line.startswith("step ") for line in proc.out))
    proc.p.send_signal(signal.SIGTERM)
    code, stdout, err = proc.finish()
    assert code == 128 + signal.SIGTERM, err[-2000:]
    assert f"resume with: minigpt train --resume {out}" in " ".join(stdout.split())  # lines wrap at 120 columns
    assert "== samples" not in stdout and "== extrapolation" not in stdout and "Traceback" not in err


def test_train_json_is_the_summary_alone(corpus_dir, data_cache, tmp_path):
    r = run_cli("train", "--json", *set_args(tiny_overrides(corpus_dir, data_cache, tmp_path / "run",
                                                             **{"train.max_steps": 2})))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["event"] == "final" and "step " in r.stderr
