"""From measured (or stated) efficiency to the cost of training and serving a model at scale.

Torch-free: every figure is arithmetic on (1) FLOP formulas that the counter validated (flops.py),
(2) the memory formulas of memory.py, (3) the GPU table of hardware.py, and (4) inputs that are
either measured by minigpt (an MFU from a run, a benchmark or timed layers) or labelled
assumptions (prices, reference MFUs, batch size, link bandwidth). `sources` in the result says
which is which.

Conventions: 1 PF-day = 1e15 FLOP/s x 86,400 s = 8.64e19 FLOPs (GPT-3 Table D.1). GPU-hours =
training FLOPs / (peak x MFU) / 3600, with the peak the datasheet dense figure for the dtype.
A month of serving is 30 days (720 hours).

This module assembles the training cost; what it is asked lives in scenario.py, the parallel layout in
layout.py, the serving fleet in serving.py, MFU read from minigpt's own runs in measured_mfu.py.
"""

from __future__ import annotations

import dataclasses
import math

from minigpt.analytic import flops as F, memory as M
from minigpt.analytic.layout import layout_figures, layout_ranker, pipeline_p2p_bytes, predict_step, suggest_layout
from minigpt.analytic.scenario import (
    DEFAULT_GLOBAL_BATCH_TOKENS,
    DEFAULT_NUM_GPUS,
    MEMORY_HEADROOM,
    PF_DAY,
    REFERENCE_MFU,
    Scenario,
    check_context,
    check_scenario,
    resolve_tokens,
)
from minigpt.analytic.serving import inference_figures, serving_results
from minigpt.core.config import ModelConfig, TargetConfig
from minigpt.core.errors import UserError
from minigpt.core.hardware import GPUS_PER_NODE, collective_link_gbs, group_ranks_per_node
from minigpt.core.plan import MAX_RANKS, ParallelPlan, parse_keys

# ----------------------------------------------------------------------------------------------
# parallel layout


# ----------------------------------------------------------------------------------------------
# the estimate


def extrapolate(c: ModelConfig, target: TargetConfig, s: Scenario) -> dict:
    """Training cost, memory and layout, communication, inference and (optionally) serving."""
    check_scenario(s)
    c = dataclasses.replace(c, block_size=s.seq_len) if s.seq_len else c
    c.validate()
    check_context(c, s)
    p = F.param_counts(c)
    seq = c.block_size
    tokens, tokens_source = resolve_tokens(c, target, s.tokens)
    peak = s.gpu.tflops[s.dtype] * 1e12
    flops_6n = F.train_flops_per_token(c, seq, "six_n_all") * tokens  # 6 x (active) params x tokens
    flops_conv = F.train_flops_per_token(c, seq, s.flops_convention) * tokens
    sources = {"tokens": tokens_source, "seq_len": f"{seq:,} tokens: {s.seq_source}"}
    gbt = s.global_batch_tokens or target.global_batch_tokens or DEFAULT_GLOBAL_BATCH_TOKENS
    rank = layout_ranker(c, s, gbt)  # one per estimate: each layout's step is predicted once
    mfu, mfu_source, predicted, num_gpus, sources["num_gpus"] = _efficiency(c, s, flops_conv / peak, rank)
    gpu_hours = flops_conv / (peak * mfu) / 3600
    sources["mfu"] = mfu_source
    price = _price_and_batch_sources(s, target, gbt, sources)
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
        "inference": inference_figures(c, s, ctx, peak, mfu),
        "sources": sources,
        "notes": s.notes,
    }
    if predicted and "band" in predicted:
        result["band"] = _band(predicted["band"], mfu, result)
    if c.is_moe:
        result["experts"] = _experts(c, result)
    if target.published_plan:
        result["published_layout"] = compare_published(c, target, s, result["memory"]["layout"], gbt, step_s, rank)
    if s.serve:
        result.update(serving_results(c, s, peak, mfu, price, ctx))
    return _finite(result)


def _price_and_batch_sources(s: Scenario, target: TargetConfig, gbt: float, sources: dict) -> float:
    """The price per GPU-hour; where it and the global batch come from, into `sources`."""
    price = s.price_per_gpu_hour if s.price_per_gpu_hour is not None else s.gpu.price_usd_per_hour
    sources["price"] = ("given (--price)" if s.price_per_gpu_hour is not None
                        else f"assumption: ${price:g}/GPU-hour, a typical cloud rate for {s.gpu.name} (override with --price)")
    sources["global_batch_tokens"] = ("given (--global-batch-tokens)" if s.global_batch_tokens else "the target's config"
                                      if target.global_batch_tokens else f"assumption: {gbt:,.0f} tokens")
    return price


def _band(band: dict, mfu: float, r: dict) -> dict:
    """The prediction's band (band.py) on MFU, and what it makes of GPU-hours, days and cost (inversely: the
    same FLOPs on the same GPUs)."""
    low, high = band["mfu"]
    span = lambda key: [r[key] * mfu / high, r[key] * mfu / low]  # noqa: E731
    return {"mfu": [low, high], "gpu_hours": span("gpu_hours"), "days": span("days"), "cost_usd": span("cost_usd"),
            "settings_tried": band["settings_tried"], "backtest_error": band["backtest_error"],
            "convention": band["convention"]}


def _experts(c: ModelConfig, r: dict) -> dict:
    """A mixture's expert parallelism on the chosen layout: expert states per GPU, the all-to-all bytes a GPU sends
    per step and their time (the predicted step), beside simulate's count when --comm counted ran it."""
    lay, st = r["memory"]["layout"], r.get("step_time") or {}
    plan = ParallelPlan.parse(lay["plan"])
    comm = r["memory"]["communication"]
    predicted = st.get("ep_bytes_per_step")
    counted = comm.get("counted_ep_bytes_per_gpu_per_step")
    # the prediction dispatches each tp rank's sequence-parallel share (Megatron-Core); minigpt's code, counted, each
    # tp rank's share of the slots (parallel/expert.py): the same bytes
    return {"ep": plan.ep, "n_expert": c.n_expert, "experts_per_gpu": c.n_expert // plan.ep,
            "expert_states_bytes_per_gpu": lay["per_gpu_bytes"]["expert_states"],
            "all_to_all_bytes_per_gpu_per_step": predicted, "all_to_all_s_per_step": st.get("traffic_s", {}).get("ep"),
            "all_to_all_exposed_s_per_step": st.get("parts_s", {}).get("ep_comm"),
            "counted_all_to_all_bytes_per_gpu_per_step": counted,
            "counted_over_predicted": counted / predicted if counted is not None and predicted else None,
            "convention": "predicted: the step-time model's all-to-alls (4 per MoE layer, 6 with full recompute; each "
                          "rank's tokens x k x h, (ep-1)/ep leaving it) on the busiest stage; expert states 16 bytes a "
                          "parameter over tp x pp x ep, ZeRO over dp / ep; counted: minigpt simulate's fake process group"}


def _finite(result: dict) -> dict:
    """A guard on the headline figures: the inputs are bounded, so a non-finite one names a combination no check
    foresaw."""
    bad = [k for k in ("gpu_hours", "days", "cost_usd", "mfu") if not math.isfinite(result[k])]
    if bad:
        raise UserError(f"the inputs give no finite {', '.join(bad)} (tokens {result['train_tokens']:g}, "
                        f"{result['num_gpus']:,} GPUs, price {result['price_per_gpu_hour']:g}): give smaller --tokens "
                        f"or --price")
    return result


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
    ep_bytes = sim.get("ep_bytes", 0) * micro_batches
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
        "counted_ep_bytes_per_gpu_per_step": ep_bytes,
        "counted_over_formula_dp": sim["dp_bytes"] / formula if formula else None,
        "simulated_memory_per_gpu_bytes": sim["memory_per_gpu_bytes"],
    }


# ----------------------------------------------------------------------------------------------
# efficiency measured by minigpt


