"""Compression measured (issue 45): a trained run beside its pruned, recovered and quantized versions (size, decode
speed, held-out bits per byte), and the seeds' "90-95% cheaper in a domain" claim: a student pruned from a general
run and distilled on one domain's text, compared on that domain and on general text, with its cost per token served.

Every model is a real run made here by minigpt's own commands (train, prune, convert --quantize-run); every figure
is measured on this machine: bits per byte by `eval` on held-out tokens, decode speed as greedy tokens/s at batch 1
and 16 (the median of three), cost per token as decode time (the machine's price per hour cancels in the ratio).
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from minigpt.analytic.flops import decode_flops, param_counts
from minigpt.apps.pruned_run import save_pruned_run
from minigpt.apps.quantized_run import save_quantized_run
from minigpt.core.progress import note
from minigpt.infer.evaluate import evaluate_text, run_split_tokens
from minigpt.infer.generate import generate_ids
from minigpt.nn.quantize import weight_bytes
from minigpt.run.load import load_run

PRUNE = {"heads": 0.5, "mlp": 0.5, "layers": 1}  # half the heads and MLP channels, one layer of four


def train_run(out: Path, steps: int, sets: dict, config: str = "tiny") -> Path:
    """`minigpt train` in this process, quietly; returns its directory."""
    from minigpt.core.resolve import train_config
    from minigpt.train.loop import train

    merged = {"train.out_dir": f'"{out}"', "train.max_steps": steps, "train.eval_every": 0, "train.sample_every": 0,
              "train.report": "false", **sets}
    note(f"compress bench: training {out.name} ({steps} steps)")
    train(train_config(config or None, [f"{k}={v}" for k, v in merged.items()]), log=lambda *a, **k: None)
    return out


def decode_tokens_per_s(model, batch: int, new_tokens: int = 64) -> float:
    """Greedy decode tokens/s (all rows), the median of three, after a warm-up."""
    ids = [[1, 2, 3, 4]] * batch
    generate_ids(model, ids, max_new_tokens=8, temperature=0.0)
    speeds = [generate_ids(model, ids, max_new_tokens=new_tokens, temperature=0.0).stats()["tokens_per_s"] for _ in range(3)]
    return statistics.median(speeds)


def measure(run: Path, held_out: dict[str, object]) -> dict:
    """One run: parameters, weight bytes, decode speed, bits per byte on each held-out token set."""
    model, tokenizer, _, _ = load_run(str(run))
    torch.manual_seed(0)
    row = {"run": run.name, "params": param_counts(model.config).total,  # quantized matrices count as their shapes
           "weight_bytes": weight_bytes(model)["total_bytes"],
           # extrapolate --serve's compute-bound cost: forward FLOPs of one decoded token at a full context
           "decode_flops_per_token": decode_flops(model.config, model.config.block_size),
           "decode_tokens_per_s_batch1": decode_tokens_per_s(model, 1),
           "decode_tokens_per_s_batch16": decode_tokens_per_s(model, 16)}
    for name, tokens in held_out.items():
        row[f"bpb_{name}"] = evaluate_text(model, tokenizer, tokens, show=False)["bits_per_byte"]
    return row


def prune_rows(root: Path, teacher: Path, recovery_steps: int, data_sets: dict) -> list[dict]:
    """The teacher, the teacher trained `recovery_steps` more (the fair baseline), pruned, pruned + recovered by
    distillation from the teacher, and that quantized to int8."""
    _, _, cfg, _ = load_run(str(teacher))
    val = {"general": run_split_tokens(teacher, cfg, "val", 1 << 15)}
    more = train_run(root / "teacher-more", recovery_steps, {"train.init_from": f'"{teacher}"', **data_sets}, config="")
    pruned = root / "pruned"
    save_pruned_run(str(teacher), PRUNE["heads"], PRUNE["mlp"], PRUNE["layers"], str(pruned))
    recovered = train_run(root / "pruned-recovered", recovery_steps,
                          {"train.init_from": f'"{pruned}"', "train.distill_from": f'"{teacher}"', **data_sets}, config="")
    quantized = root / "pruned-recovered-int8"
    save_quantized_run(str(recovered), "int8", str(quantized))
    return [measure(run, val) for run in (teacher, more, pruned, recovered, quantized)]


STUDENTS = {"half": PRUNE, "quarter": {"heads": 0.75, "mlp": 0.75, "layers": 2}}  # what each domain student removes


def domain_rows(root: Path, teacher: Path, domain: str, steps: int, data_sets: dict) -> list[dict]:
    """Students pruned from the general teacher (STUDENTS) and distilled on `domain` (a glob of files) for `steps`,
    each also int8; every model on the domain's held-out text and on the general held-out text."""
    _, _, cfg, _ = load_run(str(teacher))
    runs = [teacher]
    for name, cut in STUDENTS.items():
        pruned = root / f"domain-{name}-pruned"
        save_pruned_run(str(teacher), cut["heads"], cut["mlp"], cut["layers"], str(pruned))
        sets = {**data_sets, "data.source": f'"{domain}"', "train.init_from": f'"{pruned}"',
                "train.distill_from": f'"{teacher}"'}
        student = train_run(root / f"domain-{name}", steps, sets, config="")
        save_quantized_run(str(student), "int8", str(root / f"domain-{name}-int8"))
        runs += [student, root / f"domain-{name}-int8"]
    _, _, scfg, _ = load_run(str(runs[1]))
    held = {"domain": run_split_tokens(runs[1], scfg, "val", 1 << 15),
            "general": run_split_tokens(teacher, cfg, "val", 1 << 15)}
    return [measure(run, held) for run in runs]


def cost_summary(rows: list[dict]) -> dict:
    """Each student's cost per token (decode time, batch 16) as a share of the teacher's, measured and as
    extrapolate --serve predicts it, and its quality loss."""
    base = rows[0]
    out = {}
    for r in rows[1:]:
        out[r["run"]] = {"cost_per_token_vs_teacher": base["decode_tokens_per_s_batch16"] / r["decode_tokens_per_s_batch16"],
                         # predicted as extrapolate --serve prices a token: compute-bound (FLOPs), and bandwidth-bound
                         # (weights read per decode step): weight_bytes_vs_teacher below
                         "predicted_compute_bound_vs_teacher": r["decode_flops_per_token"] / base["decode_flops_per_token"],
                         "bpb_domain_change": r["bpb_domain"] / base["bpb_domain"] - 1,
                         "bpb_general_change": r["bpb_general"] / base["bpb_general"] - 1,
                         "weight_bytes_vs_teacher": r["weight_bytes"] / base["weight_bytes"]}
    return out


def emit(result: dict, out: str | None) -> None:
    """The benchmark's one JSON line, with the machine and its load, on stdout (and into `out`)."""
    import json
    import os

    line = json.dumps({**result, "machine": {"cpus": os.cpu_count(), "load_1min": os.getloadavg()[0]}})
    if out:
        Path(out).write_text(line + "\n")
    print(line)
