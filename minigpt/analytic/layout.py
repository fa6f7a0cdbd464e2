"""The parallel layout of an extrapolation: memory per GPU of a plan (ZeRO states, activations by
Korthikanti et al. 2022), the search over (dp, tp, pp, cp, zero) that fit, ranked by predicted step time
(analytic/steptime.py), and the figures of a chosen layout (bubble, pipeline transfers). Torch-free."""

from __future__ import annotations

import dataclasses
import itertools

from minigpt.analytic import band as B, flops as F, memory as M, steptime as T
from minigpt.analytic.published import backtest_note, error_range
from minigpt.analytic.scenario import CONTEXT_SPLITS, EXPERT_SPLITS, MEMORY_HEADROOM, Scenario, scenario_rates, setting
from minigpt.core.config import ModelConfig, divisors
from minigpt.core.errors import UserError
from minigpt.core.hardware import GPUS_PER_NODE, GPUSpec, collective_link_gbs, group_ranks_per_node
from minigpt.core.plan import MAX_RANKS, ParallelPlan


def per_gpu_bytes(c: ModelConfig, plan: ParallelPlan, seq: int, micro_batch: int, recompute: bool = True) -> dict:
    """Memory of one GPU under a plan (mixed-precision Adam, 16-bit activations).

    Model states 16 Psi split over tp*pp, with the plan's ZeRO stage over its dp ranks on top (ZeRO
    paper). Activations per layer (Korthikanti et al. 2022): with full recompute each layer keeps its
    input, 2 s b h bytes, divided by tp (sequence parallelism); without, s b h (10 + 24/t) (flash
    attention: no s x s term, no sequence parallelism). A 1F1B pipeline's first stage holds pp
    micro-batches of its L/pp layers, i.e. L layers' worth. Context parallelism (cp) keeps s/cp of each
    sequence's tokens on a rank and shards ZeRO's states over the dp x cp ranks that share the parameters.
    A mixture's experts are split over ep as well (expert parallelism), sharded by ZeRO over dp / ep.
    """
    experts = T.expert_params(c)
    dense = (F.param_counts(c).total - experts) / (plan.tp * plan.pp)
    states = M.model_state_bytes(dense, "bf16", plan.zero, plan.grad_ranks).total
    # a mixture's experts split over ep too, their ZeRO shards over the grad_ranks / ep ranks that hold the same ones
    expert_states = M.model_state_bytes(experts / (plan.tp * plan.pp * plan.ep), "bf16", plan.zero,
                                        plan.grad_ranks // plan.ep).total if experts else 0.0
    # the layout search assumes sequence parallelism with full recompute; without recompute, none
    per_layer = M.korthikanti_activation_bytes_per_layer(c, micro_batch, seq // plan.cp, flash=True, recompute=recompute,
                                                         tp=plan.tp, sequence_parallel=recompute)
    act = c.n_layer * per_layer
    return {"model_states": states + expert_states, "expert_states": expert_states, "activations": act,
            "total": states + expert_states + act,
            "convention": "16 bytes/param (ZeRO paper) split over tp x pp (experts also over ep), ZeRO-%d over dp (experts: "
                          "dp / ep); Korthikanti activations (a mixture's MLP from its inventory), %s"
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
    # a mixture's experts over ep of the dp ranks (the simulator runs ep with tp 1 only: it keeps the plan's)
    eps = [fixed["ep"]] if "ep" in fixed else [e for e in EXPERT_SPLITS if c.is_moe and c.n_expert % e == 0
                                               and (e == 1 or simulator is None)] or [1]
    for cp, ep, (t, p) in itertools.product(cps, eps, candidates):
        dp = fixed.get("dp", max(1, num_gpus // (t * p * cp)))
        if dp * t * p * cp > min(num_gpus, MAX_RANKS) or dp % ep:  # more ranks than given, or ep not dividing dp
            continue
        plan = ParallelPlan.from_keys({**extra, "dp": dp, "tp": t, "pp": p, "zero": zero, "cp": cp, "ep": ep})
        mem = per_gpu_bytes(c, plan, seq, micro_batch)
        if plan.world <= num_gpus and mem["total"] <= budget:
            fitting.append((plan, mem))
    if not fitting:
        _too_small(c, gpu, num_gpus, seq, fixed, micro_batch, candidates, budget)
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
    return {"chosen_by": f"the fastest predicted step of the {len(ranked)} tensor x pipeline x context (x expert) splits that fit "
                         f"(step-time model, analytic/steptime.py)",
            "alternatives": [{"plan": p.spelling(), "predicted_step_s": st["step_s"], "parts_s": st["parts_s"],
                              "mfu": st["mfu"]} for p, _, st in ranked[:5]]}


def _too_small(c: ModelConfig, gpu: GPUSpec, num_gpus: int, seq: int, fixed: dict, micro_batch: int,
               candidates: list, budget: float) -> None:
    """Nothing fits: say why. A plan whose dp was given: what one of its GPUs would hold beside the GPU's memory.
    Else the fewest GPUs (a power of two, at most MAX_RANKS) that would hold the model, with a plan."""
    zero, cp = fixed.get("zero", 1), fixed.get("cp", 1)
    extra = {k: v for k, v in fixed.items() if k not in ("tp", "pp", "dp", "zero", "cp")}  # ep, sp, schedule, ...
    if "dp" in fixed:
        t, p = candidates[0]
        plan = ParallelPlan.from_keys({**extra, "dp": fixed["dp"], "tp": t, "pp": p, "zero": zero, "cp": cp})
        need = per_gpu_bytes(c, plan, seq, micro_batch)["total"]
        if plan.world > num_gpus:
            raise UserError(f"--plan {plan.spelling()} is {plan.world:,} GPUs, more than the {num_gpus:,} given: raise "
                            f"--num-gpus or lower dp")
        raise UserError(f"--plan {plan.spelling()} needs {need / 2**30:,.1f} GiB per GPU (full recompute, micro-batch "
                        f"{micro_batch}), over the {budget / 2**30:,.1f} GiB a {gpu.name} offers: raise tp or pp, or zero")
    for need in (2**i for i in range(0, MAX_RANKS.bit_length())):
        for t, p in candidates:
            if t * p * cp > need:
                continue
            plan = ParallelPlan(dp=max(1, need // (t * p * cp)), tp=t, pp=p, zero=zero, cp=cp)
            if per_gpu_bytes(c, plan, seq, micro_batch)["total"] <= budget:
                raise UserError(
                    f"{num_gpus} x {gpu.name} cannot hold this model (ZeRO-{zero}, micro-batch {micro_batch}, "
                    f"full recompute); it needs at least {need} GPUs, e.g. --plan {plan.spelling()}: "
                    f"raise --num-gpus to {need} or more"
                )
    raise UserError(f"no layout on {gpu.name} holds this model at any GPU count up to {MAX_RANKS:,}; give --plan "
                    f"tp=..,pp=.. with more splits, a higher zero, or a GPU with more memory")


def _predict_setup(c: ModelConfig, s: Scenario, plan: ParallelPlan, gbt: float, vary: dict | None = None
                   ) -> tuple[ParallelPlan, T.Setup]:
    """How extrapolate assumes a layout trains: the settings the user gave (--recompute, --overlap, ...), the rest
    at their defaults (scenario.SETTINGS: full recompute, as the memory search assumes, flash attention,
    Megatron-Core-style overlap, an fp32 reduce, Megatron's unfused cross-entropy), fused memory-bound kernels (or eager ones: --kernels), sequence
    parallelism with tp, ZeRO as planned. `vary`: settings (and micro_batch) the band tries instead."""
    vary = vary or {}
    get = lambda key: vary.get(key, setting(s, key))  # noqa: E731
    seq, micro = c.block_size, vary.get("micro_batch", s.micro_batch)
    plan = dataclasses.replace(plan, sp=plan.tp > 1, **{k: vary[k] for k in ("schedule", "stages_per_rank") if k in vary})
    batch = max(plan.dp * micro, round(gbt / seq / (plan.dp * micro)) * plan.dp * micro)
    width = 4 if s.dtype == "fp32" else 2  # activations and parameters in the compute dtype (fp8 runs keep bf16 ones)
    return plan, T.Setup(seq_len=seq, micro_batch=micro, global_batch=batch, recompute=get("recompute"),
                         attention=get("attention"), overlap=get("overlap"), act_bytes=width, param_bytes=width,
                         grad_bytes=4 if get("reduce_dtype") == "fp32" else 2, kernels=s.kernels, loss=get("loss"), latency=get("latency"),
                         first_stage_layers=get("first_stage_layers"), last_stage_layers=get("last_stage_layers"),
                         capacity_factor=get("capacity_factor"), expert_imbalance=get("expert_imbalance"))


def layout_ranker(c: ModelConfig, s: Scenario, gbt: float):
    """plan -> the step-time model's predicted step, each plan's computed once (None under --efficiency
    assumed: the layout search then takes the smallest split that fits). rank(plan, vary): the step with some
    settings varied (band.py), not cached."""
    if s.efficiency != "predicted":
        return None
    rates, steps = scenario_rates(s), {}

    def rank(plan: ParallelPlan, vary: dict | None = None) -> dict:
        if vary:
            trained, setup = _predict_setup(c, s, plan, gbt, vary)
            return T.step_time(c, trained, setup, scenario_rates(s, vary.get("flash_kernel")))
        if plan not in steps:
            trained, setup = _predict_setup(c, s, plan, gbt)
            steps[plan] = {**T.step_time(c, trained, setup, rates), "plan": trained.spelling()}
        return steps[plan]
    return rank


def settings_said(s: Scenario) -> str:
    """The step settings a prediction used, each given or its default."""
    from minigpt.analytic.scenario import SETTINGS

    return ", ".join(f"{k} {setting(s, k)}" + ("" if k in s.settings else " (default)") for k in SETTINGS
                     if k in s.settings or k in ("recompute", "attention", "overlap", "reduce_dtype", "loss", "latency"))


def predict_step(c: ModelConfig, s: Scenario, num_gpus: int, rank) -> dict:
    """The step-time model (steptime.py) on the layout the search picks, with its band (band.py). Its MFU is
    re-counted in the scenario's FLOP convention, so that GPU-hours = FLOPs / (peak x MFU) stays one formula."""
    seq = c.block_size
    layout = suggest_layout(c, s.gpu, num_gpus, seq, s.plan, s.micro_batch, rank=rank)
    plan = ParallelPlan.parse(layout["plan"])
    st = rank(plan)
    convert = F.train_flops_per_token(c, seq, s.flops_convention) / F.train_flops_per_token(c, seq, "exact")
    mfu = st["mfu"] * convert
    source = (f"predicted: step-time model on {st['plan']} ({settings_said(s)}; {s.kernels} memory-bound kernels; "
              f"{backtest_note(s.gpu.name)})" + ("" if s.flops_convention == "exact" else
                                                 f", MFU {st['mfu']:.1%} exact = {mfu:.1%} {s.flops_convention}"))
    tried = {label: rank(plan, vary)["mfu"] * convert for label, vary in B.variants(s, plan, c.is_moe)}
    err = error_range(s.gpu.name)
    low, high = B.widen((min([mfu, *tried.values()]), max([mfu, *tried.values()])), err)
    band = {"mfu": [low, high], "settings_tried": tried, "backtest_error": err,
            "convention": "settings not given tried one at a time (their lowest and highest MFU), then divided by 1 + "
                          "the largest and smallest backtest error of the development runs on this GPU class"}
    return {**st, "mfu_in_convention": mfu, "mfu_source": source, "band": band}


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
