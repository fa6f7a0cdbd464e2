"""Two CPU ranks under torchrun (gloo): DDP and DeepSpeed ZeRO stages 0-3 against one process.

The same global batch and data on every setting, so losses, gradient norms and the final weights
agree to float32 rounding (the reductions add in a different order), with clipping off and on.
Jobs are launched a few at a time (they are bound by process start-up, not compute).
"""

import json
import sys

import pytest
import torch
from conftest import (
    REPO,
    final_weights as weights,
    readme_torchrun_lines,
    run_cli,
    run_concurrently,
    set_args,
    step_records as records,
    tiny_overrides,
    torchrun_cmd,
)

pytest.importorskip("deepspeed")

# 2 ranks x micro-batch 4 x 32 tokens = 256 tokens per step; one rank accumulates 2 micro-batches.
# Clipping at 0.5 is active (the gradient norm starts near 0.7), so "clip" and "noclip" differ.
COMMON = {"train.max_steps": 6, "train.batch_size_tokens": 256, "train.eval_every": 6, "train.checkpoint_every": 3,
          "train.grad_clip": 0.5}
DS = {"train.backend": '"deepspeed"'}


@pytest.fixture(scope="module")
def runs(corpus_dir, data_cache, tmp_path_factory):
    """Every launch of this module, a few at a time; the one-process references run in-process."""
    from minigpt.core.config import load_config
    from minigpt.train.loop import train

    root = tmp_path_factory.mktemp("dist")

    def sets(name, **extra):
        return set_args(tiny_overrides(corpus_dir, data_cache, root / name, **{**COMMON, **extra}))

    jobs = {
        "ddp": torchrun_cmd(2, sets("ddp")),
        "ddp_noclip": torchrun_cmd(2, sets("ddp_noclip", **{"train.grad_clip": 0})),
        # stages 0-1 with clipping, 2-3 without: each against the DDP run of the same setting
        **{f"zero{s}": torchrun_cmd(2, sets(f"zero{s}", **DS, **{"train.zero_stage": s},
                                            **({"train.grad_clip": 0} if s >= 2 else {}))) for s in range(4)},
        "split": torchrun_cmd(2, sets("split", **DS, **{"train.zero_stage": 2, "train.grad_clip": 0}) + ["--stop-at", "3"]),
        "offload": torchrun_cmd(2, sets("offload", **DS, **{"train.zero_stage": 3, "train.offload_optimizer": "true",
                                                            "train.offload_params": "true", "train.max_steps": 3})),
        # DeepSpeed's own launcher passes --local_rank
        "launcher": [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", "29531",
                     "--module", "minigpt.train", *sets("launcher", **DS, **{"train.zero_stage": 1, "train.max_steps": 3})],
    }
    for i, line in enumerate(readme_torchrun_lines()):  # as written, made small: few steps, the test corpus
        small = tiny_overrides(corpus_dir, data_cache, root / f"readme{i}", **{"train.max_steps": 2})
        keep = [s for s in small if s.startswith(("data.", "train.out_dir", "train.max_steps", "train.eval", "train.report"))]
        jobs[line] = [sys.executable, "-m", "torch.distributed.run", "--standalone", *line.split()[1:], *set_args(keep)]
    out = run_concurrently(jobs, torchrun=tuple(readme_torchrun_lines()[:1]))  # the README's first line through torchrun itself
    for name, r in out.items():
        assert r.returncode == 0, f"{name}: {r.stdout[-1000:]} {r.stderr[-3000:]}"
    for name, clip in (("one", {}), ("one_noclip", {"train.grad_clip": 0})):  # 1 rank accumulating 2 micro-batches
        cfg = load_config(REPO / "configs" / "tiny.toml", tiny_overrides(corpus_dir, data_cache, root / name, **{**COMMON, **clip}))
        train(cfg, log=lambda *a: None)
    out["root"] = root
    return out


def paths(runs, *names):
    return [runs["root"] / n for n in names]


@pytest.mark.slow
@pytest.mark.parametrize("clip", ["", "_noclip"])
def test_two_ranks_equal_one_rank_accumulating(runs, clip):
    ddp, one = paths(runs, "ddp" + clip, "one" + clip)
    finals = [l for l in runs["ddp" + clip].stdout.splitlines() if l.startswith('{"event": "final"')]
    assert len(finals) == 1 and json.loads(finals[0])["world_size"] == 2  # rank 0 alone logs
    a, b = records(ddp), records(one)
    assert len(a) == len(b) == 6
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)
    wa, wb = weights(ddp), weights(one)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6, msg=k)
    assert a[-1]["loss"] < a[0]["loss"]


@pytest.mark.slow
def test_clipping_is_active_and_the_norm_is_logged_without_it(runs):
    clipped, free = records(runs["root"] / "ddp"), records(runs["root"] / "ddp_noclip")
    assert clipped[0]["grad_norm"] == pytest.approx(free[0]["grad_norm"], rel=1e-6)  # the norm before clipping
    assert clipped[0]["grad_norm"] > 0.5  # so clipping at 0.5 acts
    wa, wb = weights(runs["root"] / "ddp"), weights(runs["root"] / "ddp_noclip")
    assert any(not torch.allclose(wa[k], wb[k]) for k in wa)  # clipping changed the updates


@pytest.mark.slow
def test_every_zero_stage_matches_ddp(runs):
    for stage in range(4):
        ref = "ddp_noclip" if stage >= 2 else "ddp"
        reference, ref_w = records(runs["root"] / ref), weights(runs["root"] / ref)
        curve = records(runs["root"] / f"zero{stage}")
        # DeepSpeed reduces gradients in its own buckets and order: equal to float32 rounding
        assert [r["loss"] for r in curve] == pytest.approx([r["loss"] for r in reference], rel=1e-5), stage
        assert [r["grad_norm"] for r in curve] == pytest.approx([r["grad_norm"] for r in reference], rel=1e-5), stage
        w = weights(runs["root"] / f"zero{stage}")  # ZeRO-3 partitions gathered into safetensors
        for k in ref_w:
            torch.testing.assert_close(w[k], ref_w[k], rtol=1e-4, atol=1e-6, msg=f"ZeRO-{stage} {k}")


@pytest.mark.slow
def test_measured_memory_per_rank_matches_the_zero_formulas(runs):
    for stage in (1, 2, 3):
        table = json.loads((runs["root"] / f"zero{stage}" / "memory_per_rank.json").read_text())
        assert len(table["per_rank"]) == 2
        for row in table["per_rank"]:
            predicted = table["predicted_deepspeed"]["optimizer_state"]
            assert row["optimizer_state"] == pytest.approx(predicted, rel=0.05), f"ZeRO-{stage}"
            # the ZeRO paper's fp32 Adam partitions m and v only: DeepSpeed adds an fp32 master copy
            assert row["optimizer_state"] == pytest.approx(1.5 * table["predicted_paper"]["optimizer_state"], rel=0.05)
            whole = 4 * table["params"]
            assert row["parameters"] / whole == pytest.approx(0.5 if stage == 3 else 1.0, rel=0.05)
    r = run_cli("memory", "--run", str(runs["root"] / "zero3"))
    assert r.returncode == 0 and "ZeRO-3 memory per rank" in r.stdout
    assert "+offload optimizer +offload params" in runs["offload"].stdout


@pytest.mark.slow
def test_deepspeed_resume_is_exact_and_checked(runs):
    split = runs["root"] / "split"
    out = run_concurrently({"resume": torchrun_cmd(2, ["--resume", str(split)])})
    assert out["resume"].returncode == 0, out["resume"].stderr[-3000:]
    # bit for bit: the same backend and stage, resumed
    assert [r["loss"] for r in records(split)] == [r["loss"] for r in records(runs["root"] / "zero2")]
    # another stage or world size cannot read these partitions: said in one line before anything is built
    before = sorted(p.name for p in split.rglob("*"))
    for sets, says in ((["train.zero_stage=3"], "holds ZeRO-2 partitions; resume with --set train.zero_stage=2"),
                       ([], "holds DeepSpeed partitions of 2 ranks, not 1: resume with the same number of processes")):
        r = run_cli("train", "--resume", str(split), *[a for s in ["train.max_steps=8", *sets] for a in ("--set", s)])
        assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert sorted(p.name for p in split.rglob("*")) == before
    assert json.loads((runs["root"] / "zero3" / "deepspeed_config.json").read_text())["zero_optimization"]["stage"] == 3
    r = run_cli("generate", "--run", str(runs["root"] / "zero3"), "--prompt", "def", "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
def test_deepspeeds_own_launcher_trains(runs):
    """`deepspeed --num_gpus 2 --module minigpt.train` (it passes --local_rank) gives DDP's losses."""
    out = runs["root"] / "launcher"
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2
    assert [x["loss"] for x in records(out)] == pytest.approx([x["loss"] for x in records(runs["root"] / "ddp")][:3], rel=1e-5)


@pytest.mark.slow
def test_the_readme_torchrun_commands_run(runs):
    """Every torchrun line of the README runs as written (with overrides that make it small): the
    tiny preset's 4,096-token batch splits over 2 ranks by deriving the micro-batch, said."""
    lines = readme_torchrun_lines()
    assert len(lines) >= 2
    for line in lines:
        assert "micro-batch 32 -> 16" in runs[line].stdout, line


@pytest.mark.parametrize("sets, message", [
    (['train.backend="deepspeed"', "train.zero_stage=4"], "train.zero_stage = 4 must be 0, 1, 2 or 3"),
    (['train.backend="deepspeed"', "train.zero_stage=2", "train.offload_params=true"], "offload=params needs zero=3"),
    (["train.zero_stage=2"], "ZeRO-2 shards model states: use backend=deepspeed"),
    (['train.backend="deepspeed"', "train.compile=true"], "train.compile = true is not supported"),
])
def test_bad_deepspeed_settings(corpus_dir, data_cache, tmp_path, sets, message):
    base = tiny_overrides(corpus_dir, data_cache, tmp_path / "run")
    r = run_cli("train", *set_args(base + sets))
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run" / "latest.json").exists()


def test_override_files_are_checked(tmp_path):
    from minigpt.core.config import load_config
    from minigpt.core.errors import UserError
    from minigpt.core.plan import batch_layout
    from minigpt.parallel import zero

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    fights = tmp_path / "fights.json"
    fights.write_text(json.dumps({"train_micro_batch_size_per_gpu": 99}))
    fine = tmp_path / "fine.json"
    fine.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 1000}}))

    def build(path):
        cfg = load_config(REPO / "configs" / "tiny.toml", ['train.backend="deepspeed"', "train.zero_stage=1",
                                                           f'train.deepspeed_config="{path}"'])
        return zero.build_config(cfg, batch_layout(cfg.train, cfg.model.block_size, 1))

    with pytest.raises(UserError, match="is not valid JSON"):
        build(bad)
    with pytest.raises(UserError, match="fights minigpt's 32; set train.micro_batch_size"):
        build(fights)
    assert build(fine)["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 1000}
