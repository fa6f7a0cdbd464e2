"""The range a predicted step carries: what its unknown settings span and what the backtest says of the model.

Torch-free. A prediction is made with every setting the user did not give at its default (scenario.SETTINGS).
Its band has two sources, applied one after the other:

  settings   each setting not given is tried at its other plausible values (SETTINGS' third field; the
             micro-batch at 2 when not given; an interleaved schedule with 2 chunks per rank when the pipeline's
             schedule is not given), one at a time: the lowest and highest throughput over them.
  backtest   the model's own error on the development runs of `minigpt backtest` on that GPU class (A100s
             together, H100 and H200 together; every development run for a GPU with none): the published
             throughput of those runs lay between predicted / (1 + largest error) and predicted / (1 + smallest).

MFU low = settings low / (1 + largest error), MFU high = settings high / (1 + smallest error); days, GPU-hours
and cost move inversely. The backtest reports how often a held-out run's published figure falls inside the band
its own assumed settings and the development errors give (`coverage`).
"""

from __future__ import annotations

GPU_CLASS = {"A100-40GB": "A100", "A100-80GB": "A100", "H100": "H100", "H200": "H100"}


def gpu_class(name: str) -> str:
    return GPU_CLASS.get(name, name)


def has_kernel_choice(gpu_name: str) -> bool:
    """Whether the flash-attention kernel is a choice on this GPU (the FlashAttention-2 rate is cited for Hopper)."""
    return gpu_class(gpu_name) == "H100"


def widen(throughput: tuple[float, float], err: dict) -> tuple[float, float]:
    """A throughput range (settings) widened by the backtest's errors: published = predicted / (1 + error)."""
    return throughput[0] / (1 + err["high"]), throughput[1] / (1 + err["low"])


def variants(s, plan, is_moe: bool) -> list[tuple[str, dict]]:
    """(label, settings to vary) for every setting of an extrapolation the user did not give."""
    from minigpt.analytic.scenario import SETTINGS

    out = [(f"{key}={alt}", {key: alt}) for key, (default, _, alts) in SETTINGS.items()
           if key not in s.settings and alts for alt in alts if alt != default]
    if not is_moe:
        out = [v for v in out if "expert_imbalance" not in v[1]]
    if not has_kernel_choice(s.gpu.name):
        out = [v for v in out if "flash_kernel" not in v[1]]
    if not s.micro_batch_given:
        out.append(("micro_batch=2", {"micro_batch": 2}))
    if plan.pp > 1 and "schedule" not in s.plan:
        out.append(("interleaved, 2 chunks", {"schedule": "interleaved-1f1b", "stages_per_rank": 2}))
    return out


# what each unknown setting of a published run is tried at (published_runs.toml, `unknown`)
RUN_ALTERNATIVES = {"micro_batch": (1, 2, 4, 8), "recompute": ("none", "selective", "full"), "stages_per_rank": (1, 2, 4),
                    "grad_bytes": (2, 4), "flash_kernel": ("fast", "fa2"), "overlap": ("none", "full"),
                    "attention": ("flash", "materialized"), "loss": ("fused", "megatron")}


def run_variants(run: dict) -> list[dict]:
    """A published run at each other value of each setting its source does not state (one at a time); a peak the
    source puts between two figures (`peak_tflops_between`) at each of them."""
    out = []
    for key in run.get("unknown", []):
        if key == "flash_kernel" and not has_kernel_choice(run["gpu"]):
            continue
        alternatives = run["peak_tflops_between"] if key == "peak_tflops" else RUN_ALTERNATIVES[key]
        for alt in alternatives:
            if run.get(key) == alt or (key == "stages_per_rank" and "pp=1" in run["plan"].replace(" ", "")):
                continue
            if key == "micro_batch" and run["global_batch"] % alt:
                continue
            variant = {**run, key: alt}
            if key == "stages_per_rank":
                variant["schedule"] = "1f1b" if alt == 1 else "interleaved-1f1b"
            out.append(variant)
    return out
