"""From measured (or stated) efficiency to the cost of training and serving a model at scale.

Torch-free: every figure is arithmetic on (1) FLOP formulas that the counter validated (flops.py),
(2) the memory formulas of memory.py, (3) the GPU table of hardware.py, and (4) inputs that are
either measured by minigpt (an MFU from a run, a benchmark or timed layers) or labelled
assumptions (prices, reference MFUs, batch size, link bandwidth). `sources` in the result says
which is which.

Conventions: 1 PF-day = 1e15 FLOP/s x 86,400 s = 8.64e19 FLOPs (GPT-3 Table D.1). GPU-hours =
training FLOPs / (peak x MFU) / 3600, with the peak the datasheet dense figure for the dtype.
A month of serving is 30 days (720 hours).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from minigpt.analytic import flops as F, memory as M, steptime as T
from minigpt.analytic.published import backtest_note
from minigpt.core.config import ModelConfig, TargetConfig, divisors, read_json
from minigpt.core.errors import UserError
from minigpt.core.hardware import GPUS_PER_NODE, GPUSpec, collective_link_gbs, group_ranks_per_node
from minigpt.core.plan import MAX_RANKS, ParallelPlan, parse_keys

PF_DAY = 1e15 * 86400
HOURS_PER_MONTH = 720
DEFAULT_GLOBAL_BATCH_TOKENS = 4 * 2**20  # assumption when the target gives none
DEFAULT_NUM_GPUS = 1024  # assumption when neither a count nor a budget in days is given
MEMORY_HEADROOM = 0.9  # share of GPU memory a layout may plan to use (temporaries, fragmentation)
CONTEXT_SPLITS = (1, 2, 4, 8, 16)  # context-parallel degrees the layout search tries (Dubey et al. 2024, Table 4: Llama 3 at 131,072 tokens on cp 16)
WORDS_PER_TOKEN = 0.75  # 1000 tokens ~ 750 English words (OpenAI's rule of thumb)

# Published MFU of large training runs, by GPU class (the default efficiency, cited)
REFERENCE_MFU = {
    "V100": (0.213, "GPT-3 175B on V100, 21.3% MFU (Chowdhery et al. 2022, PaLM, Table 3)"),
    "A100-40GB": (0.302, "MT-NLG 530B on A100, 30.2% MFU (Chowdhery et al. 2022, PaLM, Table 3)"),
    "A100-80GB": (0.302, "MT-NLG 530B on A100, 30.2% MFU (Chowdhery et al. 2022, PaLM, Table 3)"),
    "H100": (0.40, "Llama 3 405B on H100, 38-43% BF16 MFU (Llama Team 2024, Table 4)"),
    "H200": (0.40, "assumption: Llama 3's H100 figure, 38-43% (Llama Team 2024, Table 4), for the same chip with more HBM"),
    "B200": (0.40, "assumption: Llama 3's H100 figure (Llama Team 2024, Table 4); no published B200 run"),
}


@dataclass
class Scenario:
    gpu: GPUSpec
    dtype: str = "bf16"
    num_gpus: int | None = None
    days: float | None = None  # a wall-clock budget: solve for the GPU count
    mfu: float | None = None
    mfu_source: str = ""
    efficiency: str = "predicted"  # with no mfu: "predicted" (the step-time model) or "assumed" (REFERENCE_MFU)
    kernels: str = "fused"  # how the step-time model counts memory-bound passes: "fused" or "eager" (Setup.kernels)
    price_per_gpu_hour: float | None = None
    tokens: float | str | None = None  # number, "chinchilla", or None (the target's)
    flops_convention: str = "exact"
    plan: dict = field(default_factory=dict)  # --plan keys that fix the layout (tp, pp, dp, zero); the rest searched
    seq_len: int | None = None  # training context; None: the model's block_size
    seq_source: str = "the model's block_size"
    micro_batch: int = 1
    context: int | None = None  # inference context length (default: block_size / 2)
    batch: int = 1  # inference batch for the decode bound
    serve: dict | None = None  # users, requests_per_hour, tokens_per_request, utilisation
    quantize: str = ""  # serving with weight-only quantized weights: "int8" | "int4" (beside the uncompressed fleet)
    student: ModelConfig | None = None  # a distilled (smaller) model served instead, beside the target's fleet
    student_name: str = ""
    notes: list[str] = field(default_factory=list)
    hardware: tuple | None = None  # (a `bench hardware --sweep` result, its file name): measured rates for s.gpu
    # --comm counted: (model, ParallelPlan) -> a simulated step of that layout (minigpt simulate), or
    # None when it cannot be simulated; torch-free here, supplied by the CLI
    simulator: object = field(default=None, repr=False)


def _check(s: Scenario) -> None:
    if s.mfu is not None and not 0 < s.mfu <= 1:
        raise UserError(f"MFU {s.mfu} must be in (0, 1], e.g. --mfu 0.35")
    if s.price_per_gpu_hour is not None and s.price_per_gpu_hour < 0:
        raise UserError(f"price {s.price_per_gpu_hour} per GPU-hour must be >= 0")
    if s.num_gpus is not None and s.num_gpus < 1:
        raise UserError(f"GPU count {s.num_gpus} must be a positive integer")
    if s.days is not None and s.days <= 0:
        raise UserError(f"--days {s.days} must be positive")
    if s.flops_convention not in F.ALL_CONVENTIONS:
        raise UserError(f"unknown FLOP convention {s.flops_convention!r}; choose from {', '.join(F.ALL_CONVENTIONS)}")
    if s.plan.get("cp", 1) > 1 and s.simulator is not None:
        raise UserError(f"--plan cp={s.plan['cp']} with --comm counted: the simulated step does not run context "
                        f"parallelism; drop one of them")
    if s.plan.get("zero", 1) not in (0, 1, 2, 3):
        raise UserError(f"--plan zero={s.plan['zero']} must be 0, 1, 2 or 3")
    if s.dtype not in s.gpu.tflops:
        raise UserError(f"{s.gpu.name} has no datasheet {s.dtype} peak; choose from {', '.join(s.gpu.tflops)}")
    if s.hardware:
        T.hardware_gpu(s.hardware[0], s.hardware[1], s.gpu.name, s.dtype)
        scenario_rates(s)  # a usable sweep, before any work


def _check_context(c: ModelConfig, s: Scenario) -> None:
    """A context-parallel plan splits each training sequence into 2 cp equal chunks (Megatron-Core's balance)."""
    cp = s.plan.get("cp", 1)
    if c.block_size % (2 * cp):
        raise UserError(f"--plan cp={cp} splits each sequence into {2 * cp} equal chunks: the training context "
                        f"{c.block_size:,} must divide by {2 * cp}; change cp or --seq-len")


def resolve_tokens(c: ModelConfig, target: TargetConfig, tokens) -> tuple[float, str]:
    if tokens == "chinchilla":
        n = F.param_counts(c).active
        return 20 * n, "Chinchilla-optimal: 20 tokens per (active) parameter (Hoffmann et al. 2022)"
    if tokens is not None:
        value = float(tokens)
        if value <= 0:
            raise UserError(f"--tokens {tokens} must be positive, or 'chinchilla'")
        return value, "given (--tokens)"
    if target.train_tokens <= 0:
        raise UserError("this target has no token count: give --tokens N (or --tokens chinchilla), or target.train_tokens")
    return target.train_tokens, "the target's config (target.train_tokens)"


# ----------------------------------------------------------------------------------------------
# parallel layout


def per_gpu_bytes(c: ModelConfig, plan: ParallelPlan, seq: int, micro_batch: int, recompute: bool = True) -> dict:
    """Memory of one GPU under a plan (mixed-precision Adam, 16-bit activations).

    Model states 16 Psi split over tp*pp, with the plan's ZeRO stage over its dp ranks on top (ZeRO
    paper). Activations per layer (Korthikanti et al. 2022): with full recompute each layer keeps its
    input, 2 s b h bytes, divided by tp (sequence parallelism); without, s b h (10 + 24/t) (flash
    attention: no s x s term, no sequence parallelism). A 1F1B pipeline's first stage holds pp
    micro-batches of its L/pp layers, i.e. L layers' worth. Context parallelism (cp) keeps s/cp of each
    sequence's tokens on a rank and shards ZeRO's states over the dp x cp ranks that share the parameters.
    """
    psi = F.param_counts(c).total / (plan.tp * plan.pp)
    states = M.model_state_bytes(psi, "bf16", plan.zero, plan.grad_ranks)
    # the layout search assumes sequence parallelism with full recompute; without recompute, none
    per_layer = M.korthikanti_activation_bytes_per_layer(c, micro_batch, seq // plan.cp, flash=True, recompute=recompute,
                                                         tp=plan.tp, sequence_parallel=recompute)
    act = c.n_layer * per_layer
    return {"model_states": states.total, "activations": act, "total": states.total + act,
            "convention": "16 bytes/param (ZeRO paper) split over tp x pp, ZeRO-%d over dp; Korthikanti activations, %s"
                          % (plan.zero, "full recompute (2sbh/t per layer)" if recompute else "no recompute, s*b*h*(10+24/t)")}


def suggest_layout(c: ModelConfig, gpu: GPUSpec, num_gpus: int, seq: int, fixed: dict, micro_batch: int,
                   simulator=None, rank=None) -> dict:
    """The layout to train on; `fixed` holds the --plan keys the user gave (tp, pp, dp, zero), the rest of the
    GPUs go to data parallelism. With `rank` (plan -> predicted seconds per step): the fastest predicted of
    the tensor x pipeline x context-parallel splits that fit (cp from CONTEXT_SPLITS where the context divides
    into 2 cp chunks; a long context's few sequences per step leave a pipeline idle, which cp relieves).
    Without: the smallest split that fits, cp = 1 first, tensor parallel first (<= 8, within a node).

    With a simulator (--comm counted) a layout must also fit by the memory its simulated step measured;
    candidates are simulated in order until one does, and the ones it rejects are listed."""
    zero, tp, pp = fixed.get("zero", 1), fixed.get("tp"), fixed.get("pp")
    if tp is not None and c.n_head % tp:
        raise UserError(f"--plan tp={tp} does not divide n_head = {c.n_head}; choose from "
                        f"{[d for d in divisors(c.n_head) if d <= GPUS_PER_NODE]}")
    if pp is not None and pp > c.n_layer:
        raise UserError(f"--plan pp={pp} is more than the {c.n_layer} layers; choose from {divisors(c.n_layer)}")
    budget = gpu.memory_gb * 1e9 * MEMORY_HEADROOM
    tps = [tp] if tp else [d for d in (1, 2, 4, 8) if c.n_head % d == 0]
    pps = [pp] if pp else divisors(c.n_layer)
    candidates = sorted(((t, p) for t in tps for p in pps), key=lambda tp_pp: (tp_pp[0] * tp_pp[1], -tp_pp[0]))
    extra = {k: v for k, v in fixed.items() if k not in ("tp", "pp", "dp", "zero")}  # sp, ep, schedule, ...
    fitting = []
    cps = [fixed["cp"]] if "cp" in fixed else [x for x in CONTEXT_SPLITS if seq % (2 * x) == 0 and (
        x == 1 or simulator is None)]  # the simulator does not run cp
    for cp in cps:
        for t, p in candidates:
            plan = ParallelPlan.from_keys({**extra, "dp": fixed.get("dp", max(1, num_gpus // (t * p * cp))), "tp": t,
                                           "pp": p, "zero": zero, "cp": cp})
            mem = per_gpu_bytes(c, plan, seq, micro_batch)
            if plan.world <= num_gpus and mem["total"] <= budget:
                fitting.append((plan, mem))
    if not fitting:
        _too_small(c, gpu, num_gpus, seq, zero, micro_batch, candidates, budget, fixed.get("cp", 1))
    ranked = [(plan, mem, rank(plan) if rank else None) for plan, mem in fitting]
    if rank:
        ranked.sort(key=lambda x: (x[2]["step_s"], x[0].world))
    rejected: list[dict] = []
    for plan, mem, step_s in ranked:
        layout = {"tp": plan.tp, "pp": plan.pp, "dp": plan.dp, "cp": plan.cp, "zero_stage": zero, "plan": plan.spelling(),
                  "plan_description": plan.describe(), "gpus_used": plan.world, "gpus_given": num_gpus,
                  "per_gpu_bytes": mem, "fits": True, "budget_bytes": budget, **_choice(ranked, rank)}
        if simulator is None:
            return layout
        sim = simulator(c, plan)
        if sim is None or sim["memory_per_gpu_bytes"] <= budget:
            return {**layout, "simulated": sim, "rejected_by_simulation": rejected}
        rejected.append({"tp": plan.tp, "pp": plan.pp, "dp": plan.dp, "simulated_bytes": sim["memory_per_gpu_bytes"]})
    raise UserError(f"no layout on {gpu.name} fits by its simulated memory (rejected: {rejected}); raise --num-gpus "
                    f"or give --plan")


def _choice(ranked: list, rank) -> dict:
    """How the layout was chosen, with the runners-up when ranked by predicted step time."""
    if not rank:
        return {"chosen_by": "the smallest tensor x pipeline split that fits, without context parallelism if one "
                             "fits (--efficiency assumed)"}
    return {"chosen_by": f"the fastest predicted step of the {len(ranked)} tensor x pipeline x context splits that fit "
                         f"(step-time model, analytic/steptime.py)",
            "alternatives": [{"plan": p.spelling(), "predicted_step_s": st["step_s"], "parts_s": st["parts_s"],
                              "mfu": st["mfu"]} for p, _, st in ranked[:5]]}


def _too_small(c: ModelConfig, gpu: GPUSpec, num_gpus: int, seq: int, zero: int, micro_batch: int,
               candidates: list, budget: float, cp: int = 1) -> None:
    """Nothing fits in num_gpus: say how many GPUs would be needed."""
    for need in (2**i for i in range(0, 24)):
        for t, p in candidates:
            plan = ParallelPlan(dp=max(1, need // (t * p * cp)), tp=t, pp=p, zero=zero, cp=cp)
            if t * p * cp <= need and per_gpu_bytes(c, plan, seq, micro_batch)["total"] <= budget:
                raise UserError(
                    f"{num_gpus} x {gpu.name} cannot hold this model (ZeRO-{zero}, micro-batch {micro_batch}, "
                    f"full recompute); it needs at least {need} GPUs, e.g. --plan {plan.spelling()}: "
                    f"raise --num-gpus to {need} or more"
                )
    raise UserError(f"no layout on {gpu.name} holds this model; give --plan tp=..,pp=.. or a GPU with more memory")


# ----------------------------------------------------------------------------------------------
# the estimate


def extrapolate(c: ModelConfig, target: TargetConfig, s: Scenario) -> dict:
    """Training cost, memory and layout, communication, inference and (optionally) serving."""
    _check(s)
    c = dataclasses.replace(c, block_size=s.seq_len) if s.seq_len else c
    c.validate()
    _check_context(c, s)
    p = F.param_counts(c)
    seq = c.block_size
    tokens, tokens_source = resolve_tokens(c, target, s.tokens)
    peak = s.gpu.tflops[s.dtype] * 1e12
    flops_6n = F.train_flops_per_token(c, seq, "six_n_all") * tokens  # 6 x (active) params x tokens
    flops_conv = F.train_flops_per_token(c, seq, s.flops_convention) * tokens
    sources = {"tokens": tokens_source, "seq_len": f"{seq:,} tokens: {s.seq_source}"}
    gbt = target.global_batch_tokens or DEFAULT_GLOBAL_BATCH_TOKENS
    rank = layout_ranker(c, s, gbt)  # one per estimate: each layout's step is predicted once
    mfu, mfu_source, predicted, num_gpus, sources["num_gpus"] = _efficiency(c, s, flops_conv / peak, rank)
    gpu_hours = flops_conv / (peak * mfu) / 3600
    sources["mfu"] = mfu_source
    price = s.price_per_gpu_hour if s.price_per_gpu_hour is not None else s.gpu.price_usd_per_hour
    sources["price"] = ("given (--price)" if s.price_per_gpu_hour is not None
                        else f"assumption: ${price:g}/GPU-hour, a typical cloud rate for {s.gpu.name} (override with --price)")
    sources["global_batch_tokens"] = "the target's config" if target.global_batch_tokens else f"assumption: {gbt:,.0f} tokens"
    step_s = gbt * F.train_flops_per_token(c, seq, s.flops_convention) / (peak * mfu * num_gpus)
    ctx = s.context if s.context is not None else seq // 2
    result = {
        "target_label": target.label,
        "params_total": p.total,
        "params_active": p.active,
        "train_tokens": tokens,
        "train_flops_6n": flops_6n,
        "train_flops_exact": F.train_flops_per_token(c, seq, "exact") * tokens,
        "train_flops": flops_conv,
        "flops_convention": s.flops_convention,
        "pf_days_6n": flops_6n / PF_DAY,
        "pf_days": flops_conv / PF_DAY,
        "gpu": s.gpu.name,
        "dtype": s.dtype,
        "peak_tflops": peak / 1e12,
        "peak_source": f"{s.gpu.name} datasheet dense {s.dtype}",
        "num_gpus": num_gpus,
        "mfu": mfu,
        "mfu_source": mfu_source,
        "gpu_hours": gpu_hours,
        "node_hours_8_gpus": gpu_hours / GPUS_PER_NODE,
        "days": gpu_hours / num_gpus / 24,
        "price_per_gpu_hour": price,
        "cost_usd": gpu_hours * price,
        "memory": _memory(c, s, num_gpus, gbt, tokens, step_s, rank),
        "step_time": predicted,
        "inference": _inference(c, s, ctx, peak, mfu),
        "sources": sources,
        "notes": s.notes,
    }
    if target.published_plan:
        result["published_layout"] = compare_published(c, target, s, result["memory"]["layout"], gbt, step_s, rank)
    if s.serve:
        result.update(_serving_results(c, s, peak, mfu, price, ctx))
    return result


def _serving_results(c: ModelConfig, s: Scenario, peak: float, mfu: float, price: float, ctx: int) -> dict:
    """The compute-bound fleet, the per-user-speed fleet, and (--quantize) that fleet with quantized weights."""
    out = {"serving": serving(c, s, mfu_peak=peak, price=price, context=ctx),
           "serving_at_user_speed": serving_at_user_speed(c, s, mfu=mfu, price=price, context=ctx)}
    if s.serve.get("serve_bench"):
        out["serving_measured"] = serving_measured(c, s)
    if s.quantize:
        per, why = QUANTIZED_BYTES_PER_WEIGHT[s.quantize]
        q = serving_at_user_speed(c, s, mfu=mfu, price=price, context=ctx, weight_bytes_per_param=per)
        out["serving_at_user_speed_quantized"] = {**q, "quantize": s.quantize, "weight_bytes_source": f"assumed: {why}",
                                                  "quality_source": "measured on small models only: "
                                                                    "benchmarks/bench_compress_cpu.jsonl"}
    if s.student is not None:
        st = serving_at_user_speed(s.student, s, mfu=mfu, price=price, context=ctx)
        out["serving_at_user_speed_student"] = {
            **st, "student": s.student_name, "student_params": F.param_counts(s.student).total,
            "quality_source": "assumed: the student's quality is not predicted here; distillation measured on small "
                              "models only (benchmarks/bench_distill_cpu.jsonl)"}
    return out


def _efficiency(c: ModelConfig, s: Scenario, peak_seconds: float, rank) -> tuple:
    """(MFU, its source, the predicted step or None, GPU count, its source). Given or measured MFU first;
    else predicted by the step-time model on the layout for the GPU count (with --days: the count sized
    at the assumed MFU, then re-solved at the predicted one); else (--efficiency assumed) the reference."""
    mfu, source, predicted = s.mfu, s.mfu_source, None
    if mfu is None:
        mfu, source = REFERENCE_MFU[s.gpu.name][0], f"assumed: {REFERENCE_MFU[s.gpu.name][1]}"
    num_gpus, gpus_source = _gpu_count(s, peak_seconds / mfu / 3600)
    if s.mfu is None and s.efficiency == "predicted":
        predicted = predict_step(c, s, num_gpus, rank)
        mfu, source = predicted["mfu_in_convention"], predicted["mfu_source"]
        if s.days is not None and not all(k in s.plan for k in ("dp", "tp", "pp")):
            num_gpus = _solved_count(peak_seconds / mfu / 3600, s.days)
            gpus_source += " (at the predicted MFU, for the layout sized at the assumed one)"
    return mfu, source, predicted, num_gpus, gpus_source


def _predict_setup(c: ModelConfig, s: Scenario, plan: ParallelPlan, gbt: float) -> tuple[ParallelPlan, T.Setup]:
    """How extrapolate assumes a layout trains: full recompute (what the memory search assumes), flash
    attention, fused memory-bound kernels (or eager ones: --kernels), Megatron-Core-style overlap of every
    transfer, sequence parallelism with tp, ZeRO as planned."""
    seq = c.block_size
    plan = dataclasses.replace(plan, sp=plan.tp > 1)
    batch = max(plan.dp * s.micro_batch, round(gbt / seq / (plan.dp * s.micro_batch)) * plan.dp * s.micro_batch)
    width = 4 if s.dtype == "fp32" else 2  # activations and parameters in the compute dtype (fp8 runs keep bf16 ones)
    return plan, T.Setup(seq_len=seq, micro_batch=s.micro_batch, global_batch=batch, recompute="full",
                         attention="flash", overlap="full", grad_bytes=4, act_bytes=width, param_bytes=width,
                         kernels=s.kernels)


def scenario_rates(s: Scenario) -> T.Rates:
    """The GPU's cited rates, or (--hardware) what was measured on it."""
    rates = T.gpu_rates(s.gpu, s.dtype)
    if not s.hardware:
        return rates
    return T.measured_rates(s.hardware[0], rates, s.hardware[1], gemms_only=T.stands_for(s.hardware[0], s.gpu.name) == "gemms")


def layout_ranker(c: ModelConfig, s: Scenario, gbt: float):
    """plan -> the step-time model's predicted step, each plan's computed once (None under --efficiency
    assumed: the layout search then takes the smallest split that fits)."""
    if s.efficiency != "predicted":
        return None
    rates, steps = scenario_rates(s), {}

    def rank(plan: ParallelPlan) -> dict:
        if plan not in steps:
            trained, setup = _predict_setup(c, s, plan, gbt)
            steps[plan] = {**T.step_time(c, trained, setup, rates), "plan": trained.spelling()}
        return steps[plan]
    return rank


def predict_step(c: ModelConfig, s: Scenario, num_gpus: int, rank) -> dict:
    """The step-time model (steptime.py) on the layout the search picks. Its MFU is re-counted in the
    scenario's FLOP convention, so that GPU-hours = FLOPs / (peak x MFU) stays one formula."""
    seq = c.block_size
    layout = suggest_layout(c, s.gpu, num_gpus, seq, s.plan, s.micro_batch, rank=rank)
    st = rank(ParallelPlan.parse(layout["plan"]))
    mfu = F.train_flops_per_token(c, seq, s.flops_convention) * st["tokens_per_step"] / st["step_s"] / layout[
        "gpus_used"] / (s.gpu.tflops[s.dtype] * 1e12)
    source = (f"predicted: step-time model on {st['plan']} (full recompute, flash attention, {s.kernels} memory-bound "
              f"kernels, overlapped transfers; {backtest_note(s.gpu.name)})" + ("" if s.flops_convention == "exact" else
                                                   f", MFU {st['mfu']:.1%} exact = {mfu:.1%} {s.flops_convention}"))
    return {**st, "mfu_in_convention": mfu, "mfu_source": source}


def _solved_count(gpu_hours: float, days: float) -> int:
    """GPUs that finish `gpu_hours` in `days`, within what a plan can hold."""
    need = math.ceil(gpu_hours / (days * 24))
    if need > MAX_RANKS:
        raise UserError(f"--days {days:g} needs {need:,} GPUs, more than the {MAX_RANKS:,} a plan can hold: allow more "
                        f"days (at least {gpu_hours / MAX_RANKS / 24:.3g})")
    return need


def _gpu_count(s: Scenario, gpu_hours: float) -> tuple[int, str]:
    if all(k in s.plan for k in ("dp", "tp", "pp")):  # a whole layout: its GPU count
        world = ParallelPlan.from_keys(s.plan).world
        product = "dp x tp x pp" + (" x cp" if s.plan.get("cp", 1) > 1 else "")
        if s.num_gpus is not None and s.num_gpus != world:
            raise UserError(f"--plan gives {product} = {world:,} GPUs but --num-gpus is {s.num_gpus:,}: drop one, or "
                            f"make them agree")
        return world, f"the plan's {product} (--plan)"
    if s.num_gpus is not None:
        return s.num_gpus, "given (--num-gpus)"
    if s.days is not None:
        return _solved_count(gpu_hours, s.days), f"solved for a {s.days:g}-day budget (--days)"
    return DEFAULT_NUM_GPUS, f"assumption: {DEFAULT_NUM_GPUS} GPUs (give --num-gpus or --days)"


def _memory(c: ModelConfig, s: Scenario, num_gpus: int, gbt: float, tokens: float, step_s: float, rank) -> dict:
    """Model states, the suggested layout with its pipeline bubble, and the per-step communication."""
    p = F.param_counts(c)
    seq = c.block_size
    states = M.model_state_bytes(p.total, "bf16", 0, 1)
    layout = suggest_layout(c, s.gpu, num_gpus, seq, s.plan, s.micro_batch, s.simulator, rank)
    micro_batches = max(1, round(gbt / (seq * s.micro_batch * layout["dp"])))
    plan = ParallelPlan.parse(layout["plan"])
    bubble = plan.bubble_formula(micro_batches) or 0.0
    p2p = pipeline_p2p_bytes(c, plan, seq, s.micro_batch, micro_batches)
    return {
        "model_states_bytes": states.total,
        "model_states_convention": "mixed-precision Adam: 2 + 2 + 12 = 16 bytes per parameter (ZeRO paper); all experts",
        "min_gpus": math.ceil(states.total / (s.gpu.memory_gb * 1e9)),
        "min_gpus_convention": f"model states alone, perfectly partitioned over {s.gpu.name} {s.gpu.memory_gb:g} GB",
        "zero_per_gpu": M.zero_table(p.total, "bf16", num_gpus),
        "activations_per_layer_bytes": {
            "no_recompute_flash": M.korthikanti_activation_bytes_per_layer(c, s.micro_batch, seq, flash=True),
            "no_recompute": M.korthikanti_activation_bytes_per_layer(c, s.micro_batch, seq),
            "full_recompute": M.korthikanti_activation_bytes_per_layer(c, s.micro_batch, seq, recompute=True),
        },
        "layout": {**layout, "micro_batch": s.micro_batch,
                   "micro_batches_per_step": micro_batches, "pipeline_bubble": bubble,
                   "pipeline_p2p_bytes_per_gpu_per_step": p2p, "pipeline_p2p_s_per_step": p2p / (s.gpu.internode_gbs * 1e9),
                   "pipeline_p2p_convention": "formula: 2 m v b s h 16-bit values per middle rank per step, / tp "
                                              "(sequence parallel); neighbouring stages on different nodes"},
        "communication": _communication(p.total, layout, s, step_s, tokens / gbt, micro_batches),
    }


def pipeline_p2p_bytes(c: ModelConfig, plan: ParallelPlan, seq: int, micro_batch: int, micro_batches: int) -> float:
    """Bytes a middle pipeline rank sends per step: each micro-batch's activation forward and gradient
    backward, b*s*h 16-bit values each, per chunk (v-fold for interleaved), divided by tp (sequence
    parallelism, assumed with full recompute: each rank sends its T/tp positions; Narayanan et al. 2021)."""
    if plan.pp == 1:
        return 0.0
    return 2 * micro_batches * plan.stages_per_rank * micro_batch * seq // plan.cp * c.n_embd * 2 / plan.tp


def layout_figures(c: ModelConfig, plan: ParallelPlan, s: Scenario, gbt: float, step_s: float, rank) -> dict:
    """One layout's memory, bubble and traffic per step on the scenario's GPUs, and a predicted step time:
    the step-time model's (--efficiency predicted), else compute stretched by the bubble plus the
    data-parallel and pipeline transfers not overlapped (an upper bound; bandwidth terms only)."""
    seq = c.block_size
    mem = per_gpu_bytes(c, plan, seq, s.micro_batch)
    m = max(1, round(gbt / (seq * s.micro_batch * plan.dp)))
    bubble = plan.bubble_formula(m) or 0.0
    grad_bytes = 2 * F.param_counts(c).total / (plan.tp * plan.pp)
    n = plan.grad_ranks
    dp_bytes = (2 * (n - 1) / n * grad_bytes) * (1.5 if plan.zero == 3 else 1) if n > 1 else 0.0
    dp_link = collective_link_gbs(s.gpu, n, group_ranks_per_node(plan.tp, n))[0]
    p2p = pipeline_p2p_bytes(c, plan, seq, s.micro_batch, m)
    p2p_link = s.gpu.internode_gbs if plan.tp * n >= GPUS_PER_NODE else s.gpu.nvlink_gbs
    dp_s, p2p_s = dp_bytes / (dp_link * 1e9), p2p / (p2p_link * 1e9)
    predicted = rank(plan)["step_s"] if rank else step_s / (1 - bubble) + dp_s + p2p_s
    return {"plan": plan.spelling(), "plan_description": plan.describe(), "per_gpu_bytes": mem["total"],
            "fits": mem["total"] <= s.gpu.memory_gb * 1e9 * MEMORY_HEADROOM, "micro_batches": m, "bubble": bubble,
            "dp_bytes": dp_bytes, "dp_s": dp_s, "p2p_bytes": p2p, "p2p_s": p2p_s, "predicted_step_s": predicted}


def compare_published(c: ModelConfig, target: TargetConfig, s: Scenario, own: dict, gbt: float, step_s: float,
                      rank) -> dict:
    """The target's published layout beside the one the search chose, on the same GPUs, and why the search
    prefers its own (or that it chose the published one)."""
    keys = parse_keys(target.published_plan, "target.published_plan")
    world = own["gpus_used"]
    per_replica = keys.get("tp", 1) * keys.get("pp", 1) * keys.get("cp", 1)
    pub_plan = ParallelPlan.from_keys({"zero": own["zero_stage"], **keys, "dp": max(1, world // per_replica)})
    own_plan = ParallelPlan.parse(own["plan"])
    pub, mine = (layout_figures(c, p, s, gbt, step_s, rank) for p in (pub_plan, own_plan))
    reasons = []
    if pub["plan"] == mine["plan"]:
        fixed = all(s.plan.get(k) == v for k, v in keys.items())
        reasons.append("the layout is the published one, as --plan asked" if fixed else
                       "the search chose the published layout itself")
    else:
        if not pub["fits"]:
            reasons.append(f"the published layout needs {pub['per_gpu_bytes'] / 1e9:.1f} GB per GPU, over the "
                           f"{s.gpu.memory_gb * MEMORY_HEADROOM:g} GB budget")
        faster = mine["predicted_step_s"] <= pub["predicted_step_s"]
        if rank:
            reasons.append(f"the search takes the fastest predicted step of the layouts that fit: {own_plan.tp * own_plan.pp * own_plan.cp} "
                           f"GPUs per replica vs {per_replica}, predicted step {mine['predicted_step_s']:.3g} s vs "
                           f"{pub['predicted_step_s']:.3g} s (step-time model; bubble {mine['bubble']:.1%} vs "
                           f"{pub['bubble']:.1%}, pipeline transfers {mine['p2p_s']:.3g} s vs {pub['p2p_s']:.3g} s)"
                           + ("" if faster else "; the published one would be faster, but it does not fit"
                              if not pub["fits"] else "; the published one is predicted faster"))
        else:
            reasons.append(f"the search takes the smallest tp x pp that fits ({own_plan.tp * own_plan.pp * own_plan.cp} GPUs per replica "
                           f"vs {per_replica}) (--efficiency assumed): bubble {mine['bubble']:.1%} vs {pub['bubble']:.1%}, "
                           f"pipeline transfers {mine['p2p_s']:.3g} s vs {pub['p2p_s']:.3g} s, data-parallel "
                           f"{mine['dp_s']:.3g} s vs {pub['dp_s']:.3g} s per step; predicted step (compute + exposed "
                           f"transfers) {mine['predicted_step_s']:.3g} s vs {pub['predicted_step_s']:.3g} s"
                           + ("" if faster else " (the published one is faster: this search optimises fit, not time)"))
        reasons.append("not modelled: the batch-size ramp, failures and restarts, and what the published team "
                       "weighed besides speed (e.g. memory headroom for longer contexts)")
    return {"published": pub, "own": mine, "source": target.published_plan_source, "reasons": reasons}


def _communication(params: int, layout: dict, s: Scenario, step_s: float, steps: float, micro_batches: int) -> dict:
    """The data-parallel gradient all-reduce (and ZeRO-3 gathers) per step, on the link it crosses;
    with --comm counted, also what the simulated step of the layout sent, and which is used."""
    grad_bytes = 2 * params / (layout["tp"] * layout["pp"])  # bf16 gradients of one model shard
    dp = ParallelPlan.parse(layout["plan"]).grad_ranks  # with context parallelism the cp ranks reduce together too
    ring = 2 * (dp - 1) / dp * grad_bytes if dp > 1 else 0.0  # ring all-reduce bytes sent per GPU
    zero3 = 1.5 * ring  # all-gather (forward) + all-gather (backward) + reduce-scatter
    # Megatron's rank order (tensor innermost, then data, then pipeline): a data-parallel group stays inside
    # one node only when tp x dp GPUs do; otherwise its ring leaves each node on the NICs of its ranks there
    link, link_name = collective_link_gbs(s.gpu, dp, group_ranks_per_node(layout["tp"], dp))
    link *= 1e9
    intra = layout["tp"] * dp <= GPUS_PER_NODE
    return {
        "dp_allreduce_bytes_per_gpu_per_step": ring,
        "dp_allreduce_s_per_step": ring / link,
        "zero3_gather_bytes_per_gpu_per_step": zero3,
        "zero3_s_per_step": zero3 / link,
        "link_bytes_per_s": link,
        "dp_group_within_node": intra,
        "link": link_name + "; ring all-reduce of bf16 gradients, bandwidth term only, no overlap",
        "compute_s_per_step": step_s,
        "steps": steps,
        "source": "formula: ring all-reduce of 2 Psi bytes / (tp pp) (ZeRO-3: 1.5x); tensor-parallel traffic not counted",
        **_counted(layout.get("simulated"), s, link, micro_batches, zero3 if layout["zero_stage"] == 3 else ring),
    }


def _counted(sim: dict | None, s: Scenario, link: float, micro_batches: int, formula: float) -> dict:
    """The simulated step's bytes per GPU per optimizer step: the data-parallel traffic once (a
    ZeRO-3 run re-gathers per micro-batch; the count is of one), tensor-parallel all-reduces per
    micro-batch; each on its link."""
    if s.simulator is None:
        return {}
    if sim is None:
        return {"source": "formula (--comm counted: this layout could not be simulated, see notes)"}
    tp_bytes = sim["tp_bytes"] * micro_batches
    pp_bytes = 2 * sim.get("pp_bytes_per_micro_batch", 0) * micro_batches * sim.get("stages_per_rank", 1)
    nvlink = s.gpu.nvlink_gbs * 1e9
    return {
        "source": f"counted: {sim['method']}",
        "counted_pp_bytes_per_gpu_per_step": pp_bytes,
        "counted_pp_s_per_step": pp_bytes / (s.gpu.internode_gbs * 1e9),
        "counted_dp_bytes_per_gpu_per_step": sim["dp_bytes"],
        "counted_tp_bytes_per_gpu_per_step": tp_bytes,
        "counted_dp_s_per_step": sim["dp_bytes"] / link,
        "counted_tp_s_per_step": tp_bytes / nvlink,
        "counted_over_formula_dp": sim["dp_bytes"] / formula if formula else None,
        "simulated_memory_per_gpu_bytes": sim["memory_per_gpu_bytes"],
    }


def _inference(c: ModelConfig, s: Scenario, ctx: int, peak: float, mfu: float) -> dict:
    """One decode step's FLOPs and bytes at context `ctx`: the bandwidth and compute bounds, prefill."""
    flops_tok = F.decode_flops(c, ctx)
    kv = M.kv_cache_bytes_per_token(c, 2)
    weight_bytes = 2 * _weights_read(c, s.batch)
    step_bytes = weight_bytes + s.batch * ctx * kv
    mem_bound = s.batch * s.gpu.bandwidth_tbs * 1e12 / step_bytes
    compute_bound = peak / flops_tok
    return {
        "context": ctx,
        "batch": s.batch,
        "flops_per_token": flops_tok,
        "flops_convention": "one decode step: 2 x active matmul params + 4 L t h attention at context t",
        "kv_bytes_per_token": kv,
        "weights_bytes_read_per_step": weight_bytes,
        "decode_tokens_per_s_per_gpu": min(mem_bound, compute_bound),
        "decode_memory_bound_tokens_per_s_per_gpu": mem_bound,
        "decode_compute_bound_tokens_per_s_per_gpu": compute_bound,
        "prefill_tokens_per_s_per_gpu": peak * mfu / (F.prefill_flops(c, ctx, all_logits=True) / ctx),
        "bandwidth": f"{s.gpu.name} HBM {s.gpu.bandwidth_tbs:g} TB/s; bf16 weights and KV cache",
    }


def _weights_read(c: ModelConfig, batch: int) -> float:
    """Parameters read from HBM per decode step: all of a dense model; for a mixture, the shared
    weights plus the experts the batch's tokens can touch (at most batch x k of E)."""
    p = F.param_counts(c)
    if not c.is_moe:
        return p.total
    per_expert = (p.total - p.active) / (c.n_expert - c.n_expert_active)
    shared = p.total - c.n_expert * per_expert
    return shared + min(c.n_expert, batch * c.n_expert_active) * per_expert


def serving(c: ModelConfig, s: Scenario, mfu_peak: float, price: float, context: int) -> dict:
    """GPUs to serve a steady load at a compute utilisation, and their monthly rent."""
    sv = s.serve
    for key in ("users", "requests_per_hour", "tokens_per_request", "utilisation"):
        if sv.get(key) is None or sv[key] <= 0:
            raise UserError(f"--serve needs a positive --{key.replace('_', '-')}")
    if sv["utilisation"] > 1:
        raise UserError(f"--utilisation {sv['utilisation']} must be in (0, 1]")
    tokens_per_s = sv["users"] * sv["requests_per_hour"] * sv["tokens_per_request"] / 3600
    flops_tok = F.decode_flops(c, context)
    gpus = math.ceil(tokens_per_s * flops_tok / (mfu_peak * sv["utilisation"]))
    return {
        **{k: v for k, v in sv.items() if k != "serve_bench"},  # the bench's own figures are in serving_measured
        "tokens_per_s": tokens_per_s,
        "flops_per_token": flops_tok,
        "num_gpus": gpus,
        "nodes_8_gpus": math.ceil(gpus / GPUS_PER_NODE),
        "cost_usd_per_month": gpus * price * HOURS_PER_MONTH,
        "convention": f"compute-bound: demand tokens/s x FLOPs per token / (peak x utilisation); {HOURS_PER_MONTH} h a month",
    }


USER_TOKENS_PER_S = (30.0, "assumption: about 30 tokens/s per user, a reading speed at which a generated answer "
                          "feels acceptable (the figure industry cost estimates of LLM serving use)")


SERVED_SHAPE = ("n_layer", "n_head", "n_kv_head", "n_embd", "vocab_size", "ffn_hidden", "n_expert", "n_expert_active")


def read_serve_bench(path: str) -> tuple[dict, str]:
    """A `minigpt bench serve` result (its sweep of arrival rates), checked enough to size a fleet from."""
    try:
        data = read_json(Path(path), "serve benchmark")
        points = data["points"]
        if data.get("bench") != "serve" or not points or any("output_throughput_tokens_per_s" not in q for q in points):
            raise ValueError
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{path} is not a serve benchmark: write one with 'minigpt bench serve --out {path}'") from None
    device = (data.get("server") or {}).get("device", "an unnamed machine")
    return data, f"measured: {path} ({data['model']} on {device}, {len(points)} arrival rates)"


def best_at_user_speed(points: list[dict], per_user: float) -> dict | None:
    """The sweep point with the most output tokens/s whose median request reached per_user tokens/s and that lost no
    request; None when none did."""
    ok = [q for q in points if q.get("per_user_tokens_per_s") and not q.get("failed")
          and q["per_user_tokens_per_s"]["p50"] >= per_user]
    return max(ok, key=lambda q: q["output_throughput_tokens_per_s"]) if ok else None


def serving_measured(c: ModelConfig, s: Scenario) -> dict:
    """Servers like the benchmarked one to carry the demand: demand tokens/s / the measured output tokens/s at the
    highest arrival rate whose median user still reached the per-user speed. The bench must have served this model."""
    bench, source = s.serve["serve_bench"]
    served = (bench.get("server") or {}).get("config") or {}
    differ = [k for k in SERVED_SHAPE if k in served and served[k] != getattr(c, k)]
    if not served or differ:
        what = ", ".join(f"{k} {served.get(k)} vs {getattr(c, k)}" for k in differ) or "its config is not in the file"
        raise UserError(f"--from-serve-bench: the benchmarked server ran another model ({what}): give --target the run "
                        f"it served")
    target = s.serve.get("tokens_per_s_per_user") or USER_TOKENS_PER_S[0]
    demand = s.serve["users"] * s.serve["requests_per_hour"] * s.serve["tokens_per_request"] / 3600
    best = best_at_user_speed(bench["points"], target)
    base = {"source": source, "tokens_per_s_per_user": target, "device": bench["server"].get("device"),
            "batching": bench["server"].get("batching"), "demand_tokens_per_s": demand}
    if best is None:
        fastest = max((q["per_user_tokens_per_s"]["p50"] for q in bench["points"] if q.get("per_user_tokens_per_s")), default=0)
        return {**base, "met": False, "note": f"no measured rate kept the median user at {target:g} tokens/s (fastest "
                                                f"{fastest:.1f}): benchmark lower arrival rates or a faster server"}
    return {**base, "met": True, "rate_requests_per_s": best["rate_requests_per_s"],
            "server_tokens_per_s": best["output_throughput_tokens_per_s"],
            "per_user_tokens_per_s": best["per_user_tokens_per_s"]["p50"], "ttft_ms_p99": (best["ttft_ms"] or {}).get("p99"),
            "servers": math.ceil(demand / best["output_throughput_tokens_per_s"]),
            "convention": "measured: servers = ceil(demand tokens/s / a server's output tokens/s at the highest benchmarked "
                          "arrival rate whose median request reached the per-user speed)"}


def decode_efficiency(path: str) -> tuple[dict[int, float], str]:
    """Fraction of the bandwidth bound a decode curve (`minigpt bench decode` JSON) reached at each
    batch (its longest context): measured efficiency instead of an assumed utilisation."""
    try:
        data = read_json(Path(path), "decode curve")
        rows = data["rows"]
        ctx = max(r["context"] for r in rows)
        eff = {int(r["batch"]): float(r["fraction_of_bandwidth_bound"]) for r in rows if r["context"] == ctx}
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{path} is not a decode curve: write one with 'minigpt bench decode --out {path}'") from None
    return eff, f"measured: {path} ({data.get('device_name', '?')}, context {ctx}, batches {sorted(eff)})"


def _efficiency_at(eff: dict[int, float], batch: int) -> float:
    """The measured fraction at the largest measured batch <= batch (the smallest one below it)."""
    below = [b for b in eff if b <= batch]
    return eff[max(below)] if below else eff[min(eff)]


QUANTIZED_BYTES_PER_WEIGHT = {  # weight-only quantization (nn/quantize.py): values plus their scales
    "int8": (1.0, "int8: 1 byte a weight (one bf16 scale per output row, negligible)"),
    "int4": (0.625, "int4 in groups of 32: half a byte a weight plus a bf16 scale and zero per 32 = 0.625 bytes"),
}


def serving_at_user_speed(c: ModelConfig, s: Scenario, mfu: float, price: float, context: int,
                          weight_bytes_per_param: float | None = None) -> dict:
    """GPUs to serve the load with every user decoding at >= tokens_per_s_per_user.

    A replica holds the weights (in --dtype) and its batch's KV cache on the fewest GPUs that fit
    (MEMORY_HEADROOM) or on more (up to 64, tensor parallel), their bandwidth and peak pooled;
    the replica size and batch with the most tokens/s per GPU are chosen. A decode step reads the weights and the
    batch's KV cache once: bound time = bytes / bandwidth, divided by the efficiency reached (a
    decode curve's measured fraction of that bound at this batch, or the assumed utilisation),
    and no faster than the compute bound at the MFU. The largest batch (a power of two) whose
    per-user speed, times the speculative speed-up, meets the target sets each replica's output.
    """
    sv = s.serve
    target, target_source = sv.get("tokens_per_s_per_user") or USER_TOKENS_PER_S[0], sv.get("user_speed_source") or USER_TOKENS_PER_S[1]
    eff_table, eff_source = sv.get("efficiency") or (None, f"assumption: --utilisation {sv['utilisation']:g} of the bandwidth bound")
    speedup, speedup_source = sv.get("speculate") or (1.0, "no speculative decoding")
    el = 2 if s.dtype in ("bf16", "fp16") else (1 if s.dtype == "fp8" else 4)
    wel = weight_bytes_per_param or el  # quantized weights; the KV cache stays in the compute dtype
    weights = F.param_counts(c).total * wel  # held; read per step: weights_read(batch)
    kv_tok = M.kv_cache_bytes_per_token(c, el) * context
    mem, bw = s.gpu.memory_gb * 1e9 * MEMORY_HEADROOM, s.gpu.bandwidth_tbs * 1e12
    best = None
    for g in range(max(1, math.ceil(weights / mem)), 65):  # more GPUs per replica pool more bandwidth
        for batch in (2**i for i in range(13)):
            if weights + batch * kv_tok > g * mem:
                break
            eff = _efficiency_at(eff_table, batch) if eff_table else sv["utilisation"]
            step = max((_weights_read(c, batch) * wel + batch * kv_tok) / (g * bw) / eff,
                       batch * F.decode_flops(c, context) / (g * s.gpu.tflops[s.dtype] * 1e12 * mfu))
            per_user = speedup / step
            if per_user < target:
                break
            row = {"batch_per_replica": batch, "gpus_per_replica": g, "per_user_tokens_per_s": per_user,
                   "replica_tokens_per_s": batch * per_user, "efficiency": eff}
            if best is None or row["replica_tokens_per_s"] / g > best["replica_tokens_per_s"] / best["gpus_per_replica"]:
                best = row
    if best is None:
        return {"met": False, "tokens_per_s_per_user": target, "tokens_per_s_per_user_source": target_source,
                "efficiency_source": eff_source, "note": f"no replica of up to 64 x {s.gpu.name} decodes this model at "
                f"{target:g} tokens/s per user: lower --tokens-per-s-per-user, measure the efficiency, or use a faster GPU"}
    demand = sv["users"] * sv["requests_per_hour"] * sv["tokens_per_request"] / 3600
    replicas = math.ceil(demand / best["replica_tokens_per_s"])
    gpus = replicas * best["gpus_per_replica"]
    return {**best, "met": True, "tokens_per_s_per_user": target, "tokens_per_s_per_user_source": target_source,
            "efficiency_source": eff_source, "speculative_speedup": speedup, "speculative_source": speedup_source,
            "demand_tokens_per_s": demand, "replicas": replicas, "num_gpus": gpus,
            "cost_usd_per_month": gpus * price * HOURS_PER_MONTH, "context": context,
            "convention": "decode step = max(weights + batch KV cache / (GPUs x HBM bandwidth) / efficiency, batch decode "
                          f"FLOPs / (GPUs x {s.dtype} peak x MFU)); largest power-of-two batch meeting the per-user speed; tensor-parallel "
                          "communication inside a replica not modelled"}


# ----------------------------------------------------------------------------------------------
# efficiency measured by minigpt


def mfu_from_run(run_dir: str, gpu: GPUSpec) -> tuple[float, str]:
    """The MFU a training run measured (report.json), labelled with where it was measured."""
    path = Path(run_dir) / "report.json"
    try:
        perf = read_json(path, "run report")["performance"]
    except (UserError, KeyError, TypeError):
        raise UserError(f"{path} is missing or unreadable: train with train.report = true, or give --mfu") from None
    if perf.get("mfu") is None:
        raise UserError(f"the run in {run_dir} has no MFU (unknown peak): retrain with train.peak_from, or give --mfu")
    source = f"measured in run {run_dir}: {perf['mfu_dtype']} MFU against {perf['peak_source']}"
    if gpu.name.lower() not in perf["peak_source"].lower():
        source += f" (WARNING: measured on another device than the target {gpu.name})"
    return float(perf["mfu"]), source


def mfu_from_bench(path: str, gpu: GPUSpec) -> tuple[float, str]:
    """The MFU in a benchmark JSON line: an 'mfu' key, or achieved_tflops / peak_tflops."""
    try:
        data = json.loads(Path(path).read_text().strip().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        raise UserError(f"cannot read a benchmark JSON line from {path}") from None
    if data.get("mfu"):
        mfu = float(data["mfu"])
    elif data.get("achieved_tflops") and data.get("peak_tflops"):
        mfu = float(data["achieved_tflops"]) / float(data["peak_tflops"])
    else:
        raise UserError(f"{path} has no 'mfu' (nor achieved_tflops and peak_tflops); give --mfu instead")
    source = f"measured by benchmark {path} on {data.get('device_name', data.get('device', '?'))}"
    if gpu.name.lower() not in str(data.get("device_name", "")).lower():
        source += f" (WARNING: measured on another device than the target {gpu.name})"
    return mfu, source


def speculate_factor(value: str) -> tuple[float, str]:
    """--speculate: a speed-up factor, or a scripts/bench_speculative.py JSON file (its best K)."""
    try:
        factor = float(value)
    except ValueError:
        factor = None
    if factor is not None:
        if not 0 < factor < 100:
            raise UserError(f"--speculate {value} must be a speed-up factor in (0, 100), e.g. 1.8, or a benchmark file")
        return factor, f"given (--speculate {factor:g})"
    try:
        data = json.loads(Path(value).read_text().strip().splitlines()[-1])
        best = max((r for r in data["rows"] if r.get("speedup")), key=lambda r: r["speedup"])
    except (OSError, ValueError, KeyError, IndexError):
        raise UserError(f"--speculate {value}: neither a number nor a scripts/bench_speculative.py result") from None
    return best["speedup"], f"measured: {value} (K={best['k']}, on {data.get('device', '?')})"
