"""lm-evaluation-harness on a minigpt run, offline: tasks defined by local YAML over JSONL the test writes. The
minigpt model class scores every example as lm-eval's `hf` model scores the same run exported to Hugging Face
(per-example log-likelihoods within 1e-4), through `minigpt eval --tasks` and through lm-eval's own API."""

import json

import pytest
from conftest import run_cli, serving

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

MC = [{"question": "def add(a, b):\n    return a", "choices": [" + b", " * b", " - c"], "answer": 0},
      {"question": "import os\nimport", "choices": [" sys", " 123", " ("], "answer": 0},
      {"question": "for i in range(10):\n   ", "choices": [" print(i)", " return", " else:"], "answer": 0},
      {"question": "class Foo:\n    def __init__(self", "choices": ["):", ", x):", " 7"], "answer": 1}]
TEXTS = [{"text": "def f(x):\n    return x + 1\n" * 6}, {"text": "import os, sys\nprint(os.getcwd())\n" * 3}]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    (d / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MC))
    (d / "texts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TEXTS))
    (d / "minigpt_mc.yaml").write_text(f"""task: minigpt_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {d / 'mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""")
    (d / "minigpt_rolling.yaml").write_text(f"""task: minigpt_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {d / 'texts.jsonl'}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
""")
    return d


def per_example(results, task) -> list[float]:
    return [float(r[0]) if isinstance(r, (list, tuple)) else float(r)
            for s in results["samples"][task] for r in s["filtered_resps"]]


def test_minigpt_model_scores_equal_the_hf_export_under_lm_eval(good_run, tasks, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from minigpt.infer.harness import MinigptLM

    hf_dir = tmp_path / "hf"
    assert run_cli("convert", "--to-hf", str(good_run), "--out", str(hf_dir)).returncode == 0
    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    names = ["minigpt_mc", "minigpt_rolling"]
    ours = simple_evaluate(model=MinigptLM(str(good_run)), tasks=names, task_manager=manager, log_samples=True)
    theirs = simple_evaluate(model="hf", model_args=f"pretrained={hf_dir},dtype=float32,device=cpu", tasks=names,
                             task_manager=manager, log_samples=True, batch_size=4)
    for task in names:
        a, b = per_example(ours, task), per_example(theirs, task)
        assert len(a) == len(b) > 0
        assert a == pytest.approx(b, abs=1e-4), task
    assert ours["results"]["minigpt_mc"]["acc,none"] == theirs["results"]["minigpt_mc"]["acc,none"]


def test_minigpt_eval_tasks_writes_lm_evals_results(good_run, tasks, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    r = run_cli("eval", "--run", str(good_run), "--tasks", "minigpt_mc,minigpt_rolling", "--include-path", str(tasks),
                "--output", str(tmp_path / "out"), "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert 0 <= out["results"]["minigpt_mc"]["acc,none"] <= 1 and out["results"]["minigpt_rolling"]["bits_per_byte,none"] > 0
    assert list((tmp_path / "out").rglob("results_*.json"))
    r = run_cli("eval", "--run", str(good_run), "--tasks", "no_such_task_xyz")  # lm-eval's own tasks indexed too
    assert r.returncode == 2 and "no lm-eval task named no_such_task_xyz" in r.stderr


def test_lm_evals_local_completions_scores_a_running_minigpt_serve(good_run, tasks, tmp_path, monkeypatch):
    """lm-eval's `local-completions` client (echo + logprobs, token-id prompts) against `minigpt serve` on
    127.0.0.1 gives the minigpt model class's per-example log-likelihoods. (The API client keeps max_length - 1
    tokens and rolls windows of max_length - 2 predictions: max_length = block_size + 2 gives the windows of
    block_size that the model class and lm-eval's `hf` model roll.)"""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from minigpt.infer.harness import MinigptLM
    from minigpt.infer.serve import create_app
    from minigpt.run.load import load_run

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf_dir = tmp_path / "hf"  # lm-eval's client tokenizes with the run's tokenizer, exported
    assert run_cli("convert", "--to-hf", str(good_run), "--out", str(hf_dir)).returncode == 0
    model, tok, cfg, _ = load_run(good_run)
    app = create_app(model, tok, "minigpt-run", tok.token_to_id(cfg.sample.stop_token))
    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    names = ["minigpt_mc", "minigpt_rolling"]
    with serving(app) as port:
        served = simple_evaluate(
            model="local-completions", tasks=names, task_manager=manager, log_samples=True,
            model_args=f"model=minigpt-run,base_url=http://127.0.0.1:{port}/v1/completions,tokenizer={hf_dir},"
                       f"tokenizer_backend=huggingface,tokenized_requests=True,max_length=34,num_concurrent=1,"
                       f"max_retries=1")
    local = simple_evaluate(model=MinigptLM(str(good_run)), tasks=names, task_manager=manager, log_samples=True)
    for task in names:
        assert per_example(served, task) == pytest.approx(per_example(local, task), abs=1e-4), task


def test_lm_evals_own_cli_runs_the_registered_minigpt_model(good_run, tasks, monkeypatch, capsys):
    """`python -m minigpt.infer.harness ...` (the README's command) is lm-eval's CLI with the model
    registered: its main(), called here in-process with that command's arguments (lm-eval asks for cuda:0
    by default, which means the CPU on a machine without CUDA)."""
    import sys

    from minigpt.infer.harness import main

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(sys, "argv", ["minigpt.infer.harness", "--model", "minigpt", "--model_args", f"run={good_run}",
                                      "--tasks", "minigpt_mc", "--include_path", str(tasks)])
    main()
    out = capsys.readouterr().out
    assert "minigpt_mc" in out and "acc" in out
