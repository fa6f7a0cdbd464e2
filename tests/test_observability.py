"""What a user sees: lines that reach a pipe as they are printed, progress on long phases,
TensorBoard and CSV records, loss curves of several runs, and a run report that opens with the
run's own figures."""

import csv
import json
import sys

from conftest import Proc, run_cli, set_args, tiny_overrides

from minigpt.train.loop import train


def quiet(*a, **k):
    pass


def test_a_piped_run_shows_each_step_line_as_it_is_printed(corpus_dir, data_cache, tmp_path):
    run = tmp_path / "run"
    sets = [s for s in tiny_overrides(corpus_dir, data_cache, run, **{"train.max_steps": 60, "train.log_every": 10,
                                                                      "train.eval_every": 0, "train.micro_batch_size": 8})
            if not s.startswith(("model.n_embd", "model.n_head", "model.n_layer"))]  # the tiny preset's width: slower steps
    # PYTHONUNBUFFERED empty: off, as in a plain shell, where stdout into a pipe is block-buffered
    proc = Proc([sys.executable, "-m", "minigpt", "train", *set_args(sets)], env={"PYTHONUNBUFFERED": ""})
    proc.wait_for(lambda: any(line.startswith("step     10/") for _, line in proc.arrivals))
    assert proc.p.poll() is None  # the line arrived while the run was still going
    code, out, err = proc.finish()
    assert code == 0, err[-2000:]
    logged = {r["step"]: r["time"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if r["kind"] == "step"}
    arrived = {int(line.split()[1].split("/")[0]): t for t, line in proc.arrivals if line.startswith("step ")}
    assert set(arrived) == set(logged) and len(arrived) >= 6
    # no wall-clock bound (a loaded machine may stall the reader): the order says a line was not held back in
    # a buffer; each step's line reached the pipe before the run logged the next step it prints
    steps = sorted(arrived)
    for step, later in zip(steps, steps[1:]):
        assert arrived[step] < logged[later], (step, arrived[step] - logged[later])


def test_tensorboard_and_csv_record_the_run(tiny_cfg, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(tiny_cfg(**{"train.max_steps": 6, "train.eval_every": 3, "train.log_to": '["jsonl", "tensorboard", "csv"]'}),
          log=quiet)
    run = tmp_path / "run"
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    assert all({"time", "kind", "tokens", "memory_gib"} <= set(r) for r in steps)
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"step/loss", "step/lr", "step/grad_norm", "step/tokens_per_s", "step/memory_gib", "eval/val_loss",
            "step_by_tokens/loss", "eval_by_tokens/val_loss"} <= tags
    assert [e.step for e in events.Scalars("step/loss")] == [r["step"] for r in steps]
    assert [round(e.value, 5) for e in events.Scalars("step/loss")] == [round(r["loss"], 5) for r in steps]
    assert [e.step for e in events.Scalars("step_by_tokens/loss")] == [r["tokens"] for r in steps]
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert list(rows[0]) == ["kind", "time", "step", "tokens", "loss", "lr", "grad_norm", "ms_per_step", "tokens_per_s",
                             "tflops_per_device", "mfu", "hfu", "memory_gib", "train_loss", "val_loss"]
    assert [r["kind"] for r in rows] == [r["kind"] for r in records]


def test_plot_overlays_runs_and_the_report_opens_with_the_run(tiny_cfg, tmp_path):
    train(tiny_cfg(**{"train.max_steps": 8, "train.report": "true"}), log=quiet)
    train(tiny_cfg(**{"train.max_steps": 8, "train.lr": 1e-3, "train.out_dir": f'"{tmp_path / "slow"}"'}), log=quiet)
    out = tmp_path / "curves.png"
    r = run_cli("plot", str(tmp_path / "run"), str(tmp_path / "slow"), "--out", str(out))
    assert r.returncode == 0 and "run, slow" in r.stdout
    assert out.stat().st_size > 30_000
    report = (tmp_path / "run" / "report.md").read_text().splitlines()
    assert report[0] == "# minigpt run report"
    opening = "\n".join(report[:9])
    for words in ("8 steps of 8", "tokens seen", "final loss: train", "unigram entropy", "wall time",
                  "this run's peak memory", "MFU"):
        assert words in opening, words
    assert "fake-tensor replay of one step" in (tmp_path / "run" / "report.md").read_text()
    r = run_cli("plot", str(tmp_path / "nothing"))
    assert r.returncode == 2 and "has no metrics.jsonl" in r.stderr


def test_progress_lines_for_prepare_on_a_large_corpus(tmp_path, monkeypatch):
    corpus = tmp_path / "big"
    corpus.mkdir()
    for i in range(400):
        (corpus / f"doc{i:03d}.txt").write_text(f"document {i}. " + "a fairly ordinary line of text, again. " * 100)
    monkeypatch.setenv("MINIGPT_PROGRESS_EVERY_S", "0")  # a line at every update; off a terminal: plain lines
    r = run_cli("prepare", "--set", f"data.source={corpus}", "--set", f"data.cache_dir={tmp_path / 'cache'}",
                "--set", "model.vocab_size=300")
    assert r.returncode == 0, r.stderr
    assert "read corpus: " in r.stderr and "/400 files (" in r.stderr and "files/s, ETA" in r.stderr
    assert "tokenize: " in r.stderr and "documents/s" in r.stderr
    assert "\r" not in r.stderr  # no bar redraws in a log


def test_an_mfu_over_100_percent_is_said_with_the_fix(tiny_cfg):
    """A peak below what the run achieves (here 1e-9 TFLOP/s) cannot be the device's: the run
    says so once, naming the peak and how to measure it again."""
    from minigpt.train.loop import train

    lines = []
    train(tiny_cfg(**{"train.peak_tflops": 1e-9, "train.max_steps": 4, "train.report": "true"}), log=lines.append)
    warnings = [l for l in lines if l.startswith("warning: MFU")]
    assert len(warnings) == 2  # once in the steps, once in the report
    assert "over 100%" in warnings[0] and "given 1e-09 TFLOP/s fp32" in warnings[0] and "train.peak_from" in warnings[0]
