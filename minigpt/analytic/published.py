"""Published training runs (published_runs.toml) and the backtest of the step-time model against them.

Torch-free. `backtest()` predicts each run's throughput with analytic/steptime.py from its model, GPU,
layout and batch alone, converts it to the figure the source published (TFLOP/s per GPU under the
source's FLOP convention, MFU, or tokens/s/GPU) and reports the error, with the median and maximum
|error| per set: "development" runs were looked at while the model was written, "held-out" runs were
added after the model was frozen and evaluated once. Errors are on throughput: positive means the model
predicts a faster step than the source measured.
"""

from __future__ import annotations

import functools
import math
import statistics
from pathlib import Path

from minigpt.analytic import band as B, eager, flops as F, steptime as T
from minigpt.core.config import ModelConfig, build_section, parse_file, tomllib
from minigpt.core.errors import UserError
from minigpt.core.hardware import gpu_by_name
from minigpt.core.plan import LOOPED, ParallelPlan, parse_keys

TABLE = Path(__file__).with_name("published_runs.toml")
SETUP_KEYS = ("seq_len", "micro_batch", "recompute", "attention", "overlap", "grad_bytes", "kernels", "loss",
              "latency", "first_stage_layers", "last_stage_layers", "capacity_factor")
METRICS = ("tflops_per_gpu", "mfu", "step_s", "tokens_per_s_per_gpu")  # what a source may publish
SETS = ("development", "held-out")


# how a code base ran (a family's keys, or a run's own): the Setup's keys and the plan's and rates' settings
SETTINGS = (*SETUP_KEYS, "model", "schedule", "stages_per_rank", "sequence_parallel", "flash_kernel", "hbm_tbs",
            "internode_gbs", "peak_tflops_between")
KEYS = {"family": (*SETTINGS, "assumed", "unknown"),
        "run": (*SETTINGS, "name", "family", "set", "source", "gpu", "dtype", "plan", "global_batch", "published",
                "assumed_run"),
        "published": (*METRICS, "convention")}


def _check_keys(data: dict, path: Path) -> None:
    """Unknown keys are errors (a misspelt setting would silently take the default)."""
    tables = [("family", f"family {name!r:.40}", fam) for name, fam in data.get("family", {}).items()]
    for run in data.get("run", []):
        where = f"published run {run.get('name', '?')!r:.60}"
        tables += [("run", where, run), ("published", f"{where}, published", run.get("published", {}))]
    for kind, where, table in [("top", "the file", data)] + tables:
        known = KEYS.get(kind, ("family", "run"))
        unknown = [k for k in table if k not in known] if isinstance(table, dict) else []
        if unknown:
            raise UserError(f"{path}: {where}: unknown key {unknown[0]!r:.40}; known: {', '.join(known)}")


def load_runs(path: Path = TABLE) -> list[dict]:
    """Each run with its family's settings filled in (the run's own keys win)."""
    # a table from anyone: a regular file under the size limit, and nesting too deep for a table is one line
    data = parse_file(Path(path), "published-runs table", tomllib.loads, tomllib.TOMLDecodeError, "TOML")
    _check_keys(data, path)
    runs = []
    for run in data["run"]:
        fam = data["family"][run["family"]]
        model = {**fam.get("model", {}), **run.get("model", {})}
        runs.append({**fam, **run, "model": model, "assumed": fam.get("assumed", []) + run.get("assumed_run", [])})
    return runs


def run_inputs(run: dict, hardware: tuple[dict, str] | None = None) -> tuple[ModelConfig, ParallelPlan, T.Setup, T.Rates]:
    """A run's model, plan, setup and rates: cited ones, or measured (`hardware`: a sweep and its file
    name) when the sweep was measured on the run's GPU."""
    c = build_section(ModelConfig, "model", run["model"], f"published run {run['name']!r:.60}")
    keys = parse_keys(run["plan"], f"published run {run['name']!r}")
    if keys.get("pp", 1) > 1 and run.get("schedule"):
        looped = run["schedule"] in LOOPED
        chunks = run.get("stages_per_rank", 2)
        try:  # more stages than layers: check_run says so
            counts = [c.n_layer] if keys["pp"] > c.n_layer else T.stage_layers(c.n_layer, keys["pp"], run.get("first_stage_layers", 0), run.get("last_stage_layers", 0))
        except UserError as e:
            raise UserError(f"published run {run['name']!r:.60}: {e}") from None
        even = looped and max(counts) % chunks == 0 and (c.n_layer % keys["pp"] == 0 or "first_stage_layers" in run
                                                         or "last_stage_layers" in run)
        keys = {**keys, "schedule": run["schedule"] if even or not looped else "1f1b",
                **({"stages_per_rank": chunks} if even else {})}
    if keys.get("tp", 1) > 1 and run.get("sequence_parallel"):
        keys["sp"] = True
    plan = ParallelPlan.from_keys(keys)
    try:
        setup = T.Setup(global_batch=run["global_batch"], **{k: run[k] for k in SETUP_KEYS if k in run})
    except UserError as e:
        raise UserError(f"published run {run['name']!r:.60}: {e}") from None
    gpu = gpu_by_name(run["gpu"])
    check_run(run, c, plan, setup, gpu)
    rates = T.gpu_rates(gpu, run["dtype"], run.get("flash_kernel", "fast"), run.get("hbm_tbs"), run.get("internode_gbs"),
                        peak_tflops(run))
    how = T.stands_for(hardware[0], gpu.name) if hardware else None
    if how:
        rates = T.measured_rates(hardware[0], rates, hardware[1], gemms_only=how == "gemms")
    return c, plan, setup, rates


def peak_tflops(run: dict) -> float | None:
    """The dense peak of a run's parts when its source says they are not the datasheet's but lie between two
    (`peak_tflops_between`): the middle, unless a band variant tries an end (`peak_tflops`)."""
    between = run.get("peak_tflops_between")
    if between is None:
        return None
    return run.get("peak_tflops", sum(between) / 2)


def check_run(run: dict, c: ModelConfig, plan: ParallelPlan, setup: T.Setup, gpu) -> None:
    """A run the model can predict as written: its shape valid, its plan fitting the shape, its batch whole
    micro-batches on every data-parallel rank, its dtype on the GPU, one positive published figure, a known set."""
    where = f"published run {run['name']!r:.60}"
    try:
        c.validate()
        plan.check_model(c, runs_here=False)
        if setup.kernels == "eager":
            eager.check_covered(c, 'kernels = "fused"')
        T.check_context_parallel(plan, setup)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    if setup.global_batch % (plan.dp * setup.micro_batch):
        raise UserError(f"{where}: global_batch {setup.global_batch} is not a whole number of micro-batches of "
                        f"{setup.micro_batch} on each of dp = {plan.dp} ranks; fix global_batch or the plan")
    for key in ("hbm_tbs", "internode_gbs"):
        if key in run and not _positive(run[key]):
            raise UserError(f"{where}: {key} = {run[key]!r:.30} must be a positive number")
    between = run.get("peak_tflops_between")
    if between is not None and not (isinstance(between, list) and len(between) == 2 and all(map(_positive, between))
                                    and between[0] < between[1]):
        raise UserError(f"{where}: peak_tflops_between = {between!r:.40} must be [low, high] TFLOP/s, 0 < low < high")
    known = (*B.RUN_ALTERNATIVES, *(("peak_tflops",) if between is not None else ()))
    bad = [k for k in run.get("unknown", []) if k not in known]
    if bad:
        raise UserError(f"{where}: unknown = [{bad[0]!r:.30}] is not a setting the band can try; choose from {', '.join(known)}")
    if run["dtype"] not in gpu.tflops:
        raise UserError(f"{where}: dtype {run['dtype']!r:.20} has no {gpu.name} peak; choose from {', '.join(gpu.tflops)}")
    figures = [v for k, v in run["published"].items() if k in METRICS]
    if len(figures) != 1 or not all(_positive(v) for v in figures):
        raise UserError(f"{where}: published needs one positive figure among {', '.join(METRICS)}")
    if run["set"] not in SETS:
        raise UserError(f"{where}: set {run['set']!r:.30} is not one of {', '.join(SETS)}")


def _positive(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def predict(run: dict, hardware: tuple[dict, str] | None = None, inputs: tuple | None = None) -> dict:
    """The step-time model's figure for one run, beside the published one (`inputs`: its run_inputs)."""
    c, plan, setup, rates = inputs or run_inputs(run, hardware)
    st = T.step_time(c, plan, setup, rates)
    pub = run["published"]
    if "tflops_per_gpu" in pub:
        metric, published = "tflops_per_gpu", pub["tflops_per_gpu"]
        predicted = T.tflops_per_gpu(c, plan, setup, st["step_s"], pub["convention"])
    elif "mfu" in pub:
        metric, published = "mfu", pub["mfu"]
        predicted = T.tflops_per_gpu(c, plan, setup, st["step_s"], pub["convention"]) * 1e12 / rates.peak_flops
    elif "step_s" in pub:
        metric, published, predicted = "step_s", pub["step_s"], st["step_s"]
    else:
        metric, published = "tokens_per_s_per_gpu", pub["tokens_per_s_per_gpu"]
        predicted = st["tokens_per_s_per_gpu"]
    # the error is on throughput whatever the unit: positive means the model predicts faster than published
    error = published / predicted - 1 if metric == "step_s" else predicted / published - 1
    return {
        "name": run["name"], "set": run["set"], "family": run["family"], "source": run["source"], "gpu": run["gpu"], "gpus": plan.world,
        "plan": plan.spelling(), "params": F.param_counts(c).total, "metric": metric,
        "convention": pub.get("convention", ""), "published": published, "predicted": predicted,
        "error": error, "predicted_mfu": st["mfu"], "step_s": st["step_s"], "kernels": setup.kernels,
        "parts_fraction": {k: v / st["step_s"] for k, v in st["parts_s"].items()}, "assumed": run["assumed"],
        "rates": rates.sources, "rates_measured": rates.gemm_time is not None,
    }


def _check_hardware(runs: list[dict], hardware: tuple[dict, str]) -> None:
    """A usable sweep, measured on a GPU some run trained on: checked before any prediction."""
    T.measured_rates(hardware[0], T.gpu_rates(gpu_by_name("H100")), hardware[1])
    on = T.measured_on(hardware[0])
    if not any(T.stands_for(hardware[0], gpu_by_name(r["gpu"]).name) for r in runs):
        raise UserError(f"{hardware[1]} was measured on {on or hardware[0].get('device_name', 'no GPU in the table')!s:.60}; "
                        f"no run of the table trained on it: measure on one of their GPUs or drop --hardware")


@functools.lru_cache(maxsize=16)
def backtest_note(gpu_name: str) -> str:
    """What the shipped backtest says of the model on one GPU: the signed error on its runs (+: predicted
    faster), for a prediction to carry beside it."""
    rows = [predict(run) for run in load_runs() if gpu_by_name(run["gpu"]).name == gpu_name]
    if not rows:
        return f"no published run on {gpu_name} to backtest against"
    errs = sorted(r["error"] for r in rows)
    return (f"backtest of the cited rates on the {len(rows)} published {gpu_name} runs: predicted throughput {statistics.median(errs):+.0%} "
            f"vs published at the median, {errs[0]:+.0%} to {errs[-1]:+.0%} (minigpt backtest)")


def predictable_inputs(run: dict) -> tuple | None:
    """A variant's run_inputs, or None when the model cannot predict it (its micro-batches not whole on every rank,
    its setup invalid)."""
    try:
        return run_inputs(run)
    except UserError:
        return None


@functools.lru_cache(maxsize=16)
def _development_errors() -> tuple[tuple[str, str, float], ...]:
    return tuple((r["name"], B.gpu_class(gpu_by_name(r["gpu"]).name), predict(r)["error"])
                 for r in load_runs() if r["set"] == "development")


def error_range(gpu_name: str, leave_out: str = "") -> dict:
    """The signed throughput errors (+: predicted faster) of the development runs on `gpu_name`'s class, without
    the run named `leave_out` (a development run's own band must not hold its own error)."""
    rows = [(name, cls, e) for name, cls, e in _development_errors() if name != leave_out]
    cls = B.gpu_class(gpu_name)
    own = [e for _, c, e in rows if c == cls]
    errs, what = (own, f"the {len(own)} development runs on {cls}") if own else (
        [e for *_, e in rows], f"all {len(rows)} development runs (none on {cls})")
    return {"low": min(errs), "high": max(errs), "runs": len(errs), "source": f"minigpt backtest: {what}"}


def run_band(run: dict, error: float) -> dict:
    """A published run's band: its prediction's error and those of its unknown settings' other values (lowest and
    highest), then the development runs' errors on its GPU class (without its own): the published figure lies
    inside when the lowest variant error is at most the largest development error and the highest at least the
    smallest (published = predicted / (1 + error))."""
    errs = [error]
    for variant in B.run_variants(run):
        inputs = predictable_inputs(variant)
        if inputs is not None:  # each variant's inputs built once
            errs.append(predict(variant, inputs=inputs)["error"])
    dev = error_range(gpu_by_name(run["gpu"]).name, leave_out=run["name"])
    return {"settings_error": [min(errs), max(errs)], "variants": len(errs) - 1, "development_error": [dev["low"], dev["high"]],
            "covered": min(errs) <= dev["high"] and max(errs) >= dev["low"]}


def _errors(rows: list[dict]) -> dict:
    errs = [abs(r["error"]) for r in rows]
    out = {"runs": len(errs), "median_abs_error": statistics.median(errs), "max_abs_error": max(errs)}
    if all("band" in r for r in rows):
        out["band_coverage"] = sum(r["band"]["covered"] for r in rows) / len(rows)
    return out


def backtest(path: Path = TABLE, hardware: tuple[dict, str] | None = None, latency: str | None = None) -> dict:
    """Every run predicted, the errors summarised per set and per family. `hardware`: a GEMM sweep and its file
    name, used for the runs on the GPU it was measured on (refused when no run is). `latency`: every run's
    Setup.latency instead of its table entry's (bands then not drawn: they are the default model's)."""
    try:
        runs = [{**run, "latency": latency} if latency else run for run in load_runs(path)]
        if hardware:
            _check_hardware(runs, hardware)
        inputs = [run_inputs(run, hardware) for run in runs]  # every run checked before any is predicted
        rows = [predict(run, hardware, i) for run, i in zip(runs, inputs)]
        if not hardware and not latency and path == TABLE:  # the band's development errors: the shipped table's, cited rates
            for run, row in zip(runs, rows):
                row["band"] = run_band(run, row["error"])
    except UserError:
        raise
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path} is not valid TOML ({e}): fix the file or drop --table") from None
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: a run is missing or misnames a field ({type(e).__name__}: {e}); every run needs name, "
                        f"family, set, source, gpu, dtype, model, plan, global_batch, published") from None
    summary = {name: _errors([r for r in rows if name in ("all", r["set"])])
               for name in (*SETS, "all") if any(name in ("all", r["set"]) for r in rows)}
    families = {fam: {"set": next(r["set"] for r in rows if r["family"] == fam),
                      **_errors([r for r in rows if r["family"] == fam])} for fam in dict.fromkeys(r["family"] for r in rows)}
    return {"runs": rows, "summary": summary, "by_family": families,
            "model": (f"analytic/steptime.py, rates from cited microbenchmarks and one fitted constant (the sustained share "
                      f"{T.SUSTAINED[0]:g} of the matmul and attention rates, chosen on the development runs alone)"
                      + (f"; collective latency: {latency} in every run" if latency else "")),
            "rates": "per run, as that run used them (its GPU, dtype, attention kernel and HBM)"
                     + (f"; GEMMs and HBM measured ({hardware[1]}) for the runs on {T.measured_on(hardware[0])}"
                        + "".join(f", GEMMs alone for those on {b} (the same compute)" for a, b in sorted(T.SAME_COMPUTE)
                                  if a == T.measured_on(hardware[0])) if hardware else "")}

