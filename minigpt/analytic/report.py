"""Presentation of figures already measured or computed: tables of counted vs analytic FLOPs and
measured vs predicted memory, the extrapolation's lines, and the report written at the end of every
training run (report.json + report.md in the run directory). Torch-free, and it measures nothing:
its callers hand it the figures."""

from __future__ import annotations

from pathlib import Path

from minigpt.analytic import flops as F
from minigpt.core.atomic import atomic_write_text
from minigpt.core.config import Config
from minigpt.core.fmt import fmt_bytes, fmt_flops, fmt_usd, to_json
from minigpt.core.hardware import Peak

FORMULA_NOTES = {
    "kaplan_6n": "6N, N non-embedding (Kaplan 2020)",
    "six_n_all": "6N, N all parameters (GPT-3 D.1)",
    "palm": "6N + 12LHQT, N all parameters (PaLM App. B)",
    "chinchilla": "Chinchilla App. F (3x forward)",
    "megatron_72": "72BsLh^2(1+s/6h+V/12Lh) (no recompute)",
    "megatron_96": "96BsLh^2(1+s/6h+V/16Lh) (full recompute)",
}


def flops_table(r: dict) -> str:
    lines = [
        f"params: {r['params_total']:,} total, {r['params_non_embedding']:,} non-embedding, "
        f"{r['params_matmul']:,} in matmuls | batch {r['batch_size']} x seq {r['seq_len']} = {r['tokens_per_step']:,} tokens, counted on {r['device']}",
        f"counted: {fmt_flops(r['counted_train_flops_per_token'])} per token for training (forward + backward), "
        f"{fmt_flops(r['counted_train_flops_per_step'])} per step; backward/forward = {r['backward_to_forward']:.3f}",
        f"counter: {r['counter_convention']}",
        "",
        f"{'formula (train FLOPs/token)':<58} {'FLOPs/token':>14} {'formula/counted':>16}",
    ]
    for name, value in r["formulas"].items():
        lines.append(f"{name + ': ' + FORMULA_NOTES[name]:<58} {value:>14.4e} {r['ratios_to_counted'][name]:>16.4f}")
    counted = r["counted_train_flops_per_token"]
    for name in ("exact", "exact_causal", "exact_recompute"):
        lines.append(f"{name + ' (minigpt analytic)':<58} {r['exact'][name]:>14.4e} {r['exact'][name] / counted:>16.4f}")
    fwd = r["components_forward_flops_per_token"]
    train = r.get("components_train_flops_per_token") or {}
    lines += ["", f"FLOPs per token by component (counted): {'forward':>14} {'share':>7}"
              + (f" {'fwd + bwd':>14} {'share':>7}" if train else "")]
    for name, value in fwd.items():
        row = f"  {name:<39} {value:>14.4e} {value / sum(fwd.values()):>7.1%}"
        if train:
            row += f" {train[name]:>14.4e} {train[name] / sum(train.values()):>7.1%}"
        lines.append(row)
    return "\n".join(lines)


def report_summary(flops: dict, memory: dict, performance: dict, report_path: str) -> list[str]:
    """The run report in four lines (the whole of it is in report.md): counted FLOPs beside the formulas, the
    achieved rate and MFU with its peak, memory measured beside predicted, and where the rest is."""
    ratios = flops["ratios_to_counted"]
    conv = ", ".join(f"{k} {ratios[k]:.3f}" for k in ("kaplan_6n", "palm", "megatron_72") if k in ratios)
    mfu = f"{performance['mfu']:.1%}" if performance["mfu"] is not None else "n/a (no peak)"
    m, pr = memory["measured"], memory["predicted"]
    cats = ", ".join(f"{k.replace('_', ' ')} {fmt_bytes(m[k])}" for k in ("parameters", "gradients", "optimizer_state",
                                                                          "activations") if k in m)
    act = memory["ratios"].get("activations")
    return [
        f"report   FLOPs counted {fmt_flops(flops['counted_train_flops_per_token'])}/token for training; exact formula "
        f"{flops['exact_ratio_to_counted']:.3f} of it, {conv} (formula/counted)",
        f"report   {performance['achieved_tflops_per_device']:.4g} TFLOP/s per device at the median step, MFU {mfu} "
        f"(peak: {performance['peak_source']})",
        f"report   memory of one step (fake-tensor replay): {cats}; activations measured/predicted "
        f"{act:.3f}" if act else f"report   memory of one step: {cats}",
        f"report   every formula and category: {report_path} (train.report_full = true prints them here)",
    ] if pr else []


def memory_table(r: dict) -> str:
    lines = [
        f"memory of one training step: {r['params_total']:,} params, micro-batch {r['batch_size']} x seq {r['seq_len']}, "
        f"{r['precision']}, {'fake tensors' if r['fake_tensors'] else r['device']}; layout: {r['layout']}",
        f"{'category':<18} {'predicted':>12} {'measured':>12} {'measured/predicted':>20}",
    ]
    if r.get("scaled_from"):
        lines.insert(1, f"({r['scaled_from']})")
    for k, pred in r["predicted"].items():
        meas = r["measured"][k]
        ratio = r["ratios"][k]
        lines.append(f"{k:<18} {fmt_bytes(pred):>12} {fmt_bytes(meas):>12} {ratio:>20.4f}")
    if r.get("activations_weight_copies"):
        lines.append(f"  (of the activations, {fmt_bytes(r['activations_weight_copies'])} are the {r['precision']} copies of the "
                     f"weight matrices that autocast makes and backward keeps, not tensors of the batch)")
    m = r["measured"]
    lines.append(f"{'peak (all)':<18} {'':>12} {fmt_bytes(m['peak_total']):>12}   (MemTracker; temporaries at peak {fmt_bytes(m['peak_temporaries'])})")
    if "cuda_peak_allocated" in m:
        lines.append(f"{'cuda allocated':<18} {'':>12} {fmt_bytes(m['cuda_peak_allocated'])!s:>12}   reserved {fmt_bytes(m['cuda_peak_reserved'])}")
    lines.append(f"Korthikanti 34sbh/layer (16-bit, flash, with dropout masks): {fmt_bytes(r['korthikanti_activations_16bit'])} for the layers")
    lines.append(f"KV cache: {fmt_bytes(r['kv_cache_bytes_per_token'])} per token")
    lines.append(f"ZeRO model states per GPU at dp={r['dp']} ({r['zero_precision']}, ZeRO paper layout):")
    lines += zero_stage_lines(r["zero"])
    return "\n".join(lines)


def zero_stage_lines(table: dict) -> list[str]:
    """One line per ZeRO stage of a memory.zero_table."""
    return [f"  stage {stage}: params {fmt_bytes(z['parameters'])}, grads {fmt_bytes(z['gradients'])}, "
            f"optimizer {fmt_bytes(z['optimizer_state'])}, total {fmt_bytes(z['total'])}" for stage, z in table.items()]


def deepspeed_estimate_lines(table: dict, ds: dict) -> list[str]:
    """DeepSpeed's own estimators beside the ZeRO paper's layout: what a cluster sized with them needs."""
    out = []
    for stage in (2, 3):
        paper = table[str(stage)]["total"]
        out.append(f"  DeepSpeed's estimator, stage {stage}: {fmt_bytes(ds[str(stage)])} per GPU ({ds[str(stage)] / paper - 1:+.0%} "
                   f"over the paper's layout" + ("; its 4 x largest-layer term not included: --params gives no layers)"
                                               if stage == 3 else ")"))
    return ["what DeepSpeed's own estimate_zero{2,3}_model_states_mem_needs (no offload) say, 2 Psi + 18 Psi/N "
            "and 4 x largest layer + 18 Psi/N:", *out]


def run_report(cfg: Config, fl: dict, mem: dict, step_seconds: float, tokens_per_step: int, world_size: int,
               peak: Peak, device_type: str, run: dict | None = None) -> dict:
    """What the run did (`run`: its summary and peak memory), then FLOPs counted vs formulas (`fl`,
    measure.flops_report), achieved FLOP/s and MFU at the median step, and memory predicted vs
    measured in a fake-tensor replay of one step (`mem`, measure.memory_report)."""
    c, tc = cfg.model, cfg.train
    model_flops = F.train_flops_per_token(c, c.block_size, "exact") * tokens_per_step
    achieved = model_flops / step_seconds if step_seconds > 0 else 0.0
    per_device = achieved / world_size
    mfu = per_device / (peak.tflops * 1e12) if peak.known else None
    perf = {
        "median_step_s": step_seconds,
        "tokens_per_step": tokens_per_step,
        "model_flops_per_step": model_flops,
        "achieved_tflops_total": achieved / 1e12,
        "achieved_tflops_per_device": per_device / 1e12,
        "mfu": mfu,
        "mfu_dtype": tc.precision,
        "peak_tflops": peak.tflops,
        "peak_source": peak.source,
        "model_flops_convention": "exact (every matmul, full attention square, 3x forward, no recompute)",
    }
    if tc.activation_checkpointing:
        hw = F.train_flops_per_token(c, c.block_size, "exact_recompute") * tokens_per_step / step_seconds / world_size
        perf["hfu"] = hw / (peak.tflops * 1e12) if peak.known else None
    return {"run": run or {}, "flops": fl, "performance": perf, "memory": mem, "device_type": device_type}


def run_lines(run: dict, p: dict) -> list[str]:
    """The report's opening: the run's own figures."""
    if not run:
        return []
    mfu = f"{p['mfu']:.1%}" if p["mfu"] is not None else "n/a (unknown peak)"
    loss = lambda x: f"{x:.4f}" if x is not None else "n/a"  # noqa: E731
    gap = (run["unigram_entropy_nats"] - run["val_loss"]) if run.get("val_loss") is not None else None
    return [
        f"- run `{run['run_dir']}`: {run['config']}",
        f"- {run['step']:,} steps of {run['max_steps']:,}, {run['tokens_seen']:,} tokens seen "
        f"({p['tokens_per_step']:,} per step), {run['world_size']} process(es) on {run['device']}, {run['precision']}, "
        f"{run['backend']}, compile {'on' if run['compile'] else 'off'}",
        f"- final loss: train {loss(run['train_loss'])}, validation {loss(run['val_loss'])} nats/token; unigram entropy "
        f"{run['unigram_entropy_nats']:.4f}" + ("" if gap is None else f" (the model learned {gap:.3f} nats/token of context)"
                                                if gap > 0 else " (not yet below it: no better than ignoring context)"),
        f"- in bits per byte of text (comparable across tokenizers): train {loss(run.get('train_bpb'))}, validation "
        f"{loss(run.get('val_bpb'))}; unigram entropy {loss(run.get('unigram_entropy_bpb'))}",
        f"- wall time {run['wall_s']:.1f} s, {run['tokens_per_s']:,} tokens/s; median step {p['median_step_s'] * 1e3:.1f} ms",
        f"- {p['mfu_dtype']} MFU {mfu} against {p['peak_source']}"
        + (f" ({p['peak_tflops']:g} TFLOP/s)" if p["peak_tflops"] else ""),
        f"- this run's peak memory: {fmt_bytes(run['peak_memory_bytes'])} ({run['peak_memory_kind']})"
        if run.get("peak_memory_bytes") else "- this run's peak memory: n/a",
    ]


def report_markdown(r: dict) -> str:
    p = r["performance"]
    mfu = f"{p['mfu']:.1%}" if p["mfu"] is not None else "n/a (unknown peak)"
    return "\n".join([
        "# minigpt run report", "", *run_lines(r.get("run", {}), p), "",
        "## FLOPs per token: counted vs formulas", "", "```", flops_table(r["flops"]), "```", "",
        "## Throughput", "",
        f"- median step {p['median_step_s'] * 1e3:.1f} ms, {p['tokens_per_step']:,} tokens/step",
        f"- achieved {p['achieved_tflops_per_device']:.4f} TFLOP/s per device ({p['model_flops_convention']})",
        f"- {p['mfu_dtype']} MFU {mfu}; peak: {p['peak_source']}"
        + (f" ({p['peak_tflops']:g} TFLOP/s)" if p["peak_tflops"] else ""), "",
        "## Memory: predicted vs measured in a fake-tensor replay of one step", "",
        "Not this run's allocator: PyTorch's MemTracker over one training step of the same model on fake tensors "
        "(what autograd and the optimizer hold, by category); the run's own peak is above.", "",
        "```", memory_table(r["memory"]), "```", "",
    ])


def write_report(run_dir: Path, r: dict) -> None:
    atomic_write_text(Path(run_dir) / "report.json", to_json(r, indent=2))
    atomic_write_text(Path(run_dir) / "report.md", report_markdown(r))


def _counted_lines(comm: dict, lay: dict) -> list[str]:
    """--comm counted: the simulated layout's traffic and memory beside the formulas, or why not."""
    if "counted_dp_bytes_per_gpu_per_step" not in comm:
        return [f"communication source: {comm['source']}"] if comm["source"].startswith("formula (") else []
    ratio = comm["counted_over_formula_dp"]
    lines = [
        f"communication counted (used): data-parallel {fmt_bytes(comm['counted_dp_bytes_per_gpu_per_step'])} per GPU "
        f"= {comm['counted_dp_s_per_step']:.3g} s (counted/formula above {ratio:.4f}; the formula divides every "
        f"parameter by tp, the embeddings are replicated)" if ratio else
        "communication counted (used): data-parallel none (dp = 1)",
        f"  tensor-parallel {fmt_bytes(comm['counted_tp_bytes_per_gpu_per_step'])} per GPU = "
        f"{comm['counted_tp_s_per_step']:.3g} s on NVLink (the formula leaves it out); pipeline point-to-point "
        f"{fmt_bytes(comm['counted_pp_bytes_per_gpu_per_step'])} = {comm['counted_pp_s_per_step']:.3g} s "
        f"(formula above {fmt_bytes(lay['pipeline_p2p_bytes_per_gpu_per_step'])}); simulated memory "
        f"{fmt_bytes(comm['simulated_memory_per_gpu_bytes'])} per GPU; {comm['source']}",
    ]
    for rej in lay.get("rejected_by_simulation") or []:
        lines.append(f"  rejected: tp={rej['tp']} pp={rej['pp']} dp={rej['dp']} simulates to "
                     f"{fmt_bytes(rej['simulated_bytes'])} per GPU, over the budget")
    return lines


def _published_lines(p: dict | None) -> list[str]:
    """The target's published layout beside the search's, and why the search prefers its own."""
    if not p:
        return []
    out = []
    for name, f in (("published", p["published"]), ("chosen", p["own"])):
        out.append(f"  {name} layout {f['plan_description']}: {fmt_bytes(f['per_gpu_bytes'])} per GPU"
                   f"{'' if f['fits'] else ' (does not fit)'}, m = {f['micro_batches']}, bubble {f['bubble']:.1%}, "
                   f"point-to-point {f['p2p_s']:.3g} s, data-parallel {f['dp_s']:.3g} s, predicted step "
                   f"{f['predicted_step_s']:.3g} s")
    return [f"published layout ({p['source']}) beside the search's:", *out,
            *[f"  why: {reason}" for reason in p["reasons"]]]


def step_time_lines(st: dict | None) -> list[str]:
    """The predicted step, by part: seconds and share of the step."""
    if not st:
        return []
    parts = ", ".join(f"{k} {v:.3g} s ({v / st['step_s']:.0%})" for k, v in st["parts_s"].items() if v > 0)
    counts = st.get("stage_layers", [])
    uneven = ([f"  pipeline stages hold {', '.join(map(str, counts))} layers: the busiest, stage {st['busiest_stage']}, "
               f"is timed"] if len(set(counts)) > 1 else [])
    return [f"predicted time of one optimizer step ({st['micro_batches']} micro-batches) on {st['plan']}: "
            f"{st['step_s']:.3g} s = {parts}; {st['tokens_per_s_per_gpu']:,.0f} tokens/s/GPU, "
            f"MFU {st['mfu']:.1%}, HFU {st['hfu']:.1%} (exact FLOPs over the datasheet peak)", *uneven,
            "  transfers before overlap: " + ", ".join(f"{k} {v:.3g} s" for k, v in st["traffic_s"].items())
            + " (the step above holds only what the backend leaves exposed: tp_comm, cp_comm, ep_comm, pp_comm, dp_comm)",
            "  rates: " + "; ".join(f"{k}: {v}" for k, v in st["sources"].items())]


def _communication_line(comm: dict, predicted: bool) -> str:
    """The data-parallel traffic by formula, a cross-check of the predicted step's dp_comm when there is one."""
    return (f"communication per step: data-parallel gradient all-reduce {fmt_bytes(comm['dp_allreduce_bytes_per_gpu_per_step'])} "
            f"per GPU = {comm['dp_allreduce_s_per_step']:.3g} s (ZeRO-3 gathers {comm['zero3_s_per_step']:.3g} s) vs compute "
            f"{comm['compute_s_per_step']:.2f} s; {comm['link']}" + (" (a formula cross-check: the predicted step counts "
            "the reduction in its own dtype and what the backend hides)" if predicted else ""))


def expert_lines(e: dict | None) -> list[str]:
    """A mixture's expert parallelism: states per GPU, the all-to-all per step, and simulate's count beside it."""
    if not e:
        return []
    line = (f"experts: {e['n_expert']} over ep {e['ep']} ({e['experts_per_gpu']} per GPU), expert states "
            f"{fmt_bytes(e['expert_states_bytes_per_gpu'])} per GPU")
    if e["all_to_all_bytes_per_gpu_per_step"] is not None:
        line += (f"; all-to-all {fmt_bytes(e['all_to_all_bytes_per_gpu_per_step'])} per GPU per step = "
                 f"{e['all_to_all_s_per_step']:.3g} s, exposed {e['all_to_all_exposed_s_per_step']:.3g} s (predicted)")
    if e["counted_over_predicted"] is not None:
        line += (f"; simulate counted {fmt_bytes(e['counted_all_to_all_bytes_per_gpu_per_step'])}, counted/predicted "
                 f"{e['counted_over_predicted']:.4f}")
    return [line]


def band_lines(b: dict | None) -> list[str]:
    """The prediction's band: MFU, days, GPU-hours and cost low-high, and where the band comes from."""
    if not b:
        return []
    e = b["backtest_error"]
    tried = ", ".join(f"{k} {v:.1%}" for k, v in b["settings_tried"].items()) or "none (every setting given)"
    return [f"band: MFU {b['mfu'][0]:.1%}-{b['mfu'][1]:.1%}, {b['days'][0]:,.1f}-{b['days'][1]:,.1f} days, "
            f"{b['gpu_hours'][0]:,.0f}-{b['gpu_hours'][1]:,.0f} GPU-hours, {fmt_usd(b['cost_usd'][0])}-"
            f"{fmt_usd(b['cost_usd'][1])} (settings not given, tried one at a time: {tried}; then the backtest's "
            f"error on {e['source'].split(': ', 1)[-1]}, {e['low']:+.0%} to {e['high']:+.0%})"]


def extrapolation_lines(r: dict) -> list[str]:
    m, inf, lay = r["memory"], r["inference"], r["memory"]["layout"]
    comm = m["communication"]
    label = f" [{r['target_label']}]" if r["target_label"] else ""
    lines = [
        f"target{label}: {r['params_total']:,.0f} parameters ({r['params_active']:,.0f} active per token), "
        f"{r['train_tokens']:.4g} training tokens ({r['sources']['tokens']}); training context "
        f"{r['sources'].get('seq_len', '-')}",
        f"training FLOPs: {r['train_flops_6n']:.4g} under 6N ({r['pf_days_6n']:,.1f} PF-days); "
        f"{r['train_flops_exact']:.4g} exact (every matmul, validated by counting); "
        f"used: {r['flops_convention']} = {r['train_flops']:.4g} ({r['pf_days']:,.1f} PF-days)",
        f"hardware: {r['num_gpus']:,} x {r['gpu']} ({r['sources']['num_gpus']}), peak {r['peak_tflops']:g} TFLOP/s "
        f"({r['peak_source']})",
        f"efficiency: MFU {r['mfu']:.1%} ({r['mfu_source']})",
        *step_time_lines(r.get("step_time")),
        f"time and cost: {r['gpu_hours']:,.0f} GPU-hours ({r['node_hours_8_gpus']:,.0f} 8-GPU node-hours), "
        f"{r['days']:,.1f} days, {fmt_usd(r['cost_usd'])} at ${r['price_per_gpu_hour']:g}/GPU-hour ({r['sources']['price']})",
        *band_lines(r.get("band")),
        *expert_lines(r.get("experts")),
        f"memory: model states {fmt_bytes(m['model_states_bytes'])} ({m['model_states_convention']}); at least "
        f"{m['min_gpus']:,} GPUs to hold them ({m['min_gpus_convention']})",
        f"layout: {lay['plan_description']} (--plan {lay['plan']})"
        + (f", {lay['gpus_used']:,} of the {lay['gpus_given']:,} GPUs" if lay["gpus_used"] != lay["gpus_given"] else "")
        + f"; micro-batch {lay['micro_batch']}, full recompute: {fmt_bytes(lay['per_gpu_bytes']['total'])} per GPU "
        f"(states {fmt_bytes(lay['per_gpu_bytes']['model_states'])}, activations {fmt_bytes(lay['per_gpu_bytes']['activations'])}); "
        f"pipeline bubble {lay['pipeline_bubble']:.1%} at {lay['micro_batches_per_step']} micro-batches per step"
        + (f", point-to-point {fmt_bytes(lay['pipeline_p2p_bytes_per_gpu_per_step'])} = "
           f"{lay['pipeline_p2p_s_per_step']:.3g} s per step ({lay['pipeline_p2p_convention']})" if lay["pp"] > 1 else ""),
        *_choice_lines(lay),
        _communication_line(comm, predicted=bool(r.get("step_time"))),
        *_counted_lines(comm, lay),
        *_published_lines(r.get("published_layout")),
        f"inference (context {inf['context']}, batch {inf['batch']}): {inf['flops_per_token']:.4g} FLOPs per generated token; "
        f"KV cache {fmt_bytes(inf['kv_bytes_per_token'])} per token; decode <= {inf['decode_tokens_per_s_per_gpu']:,.1f} "
        f"tokens/s per GPU (memory bound {inf['decode_memory_bound_tokens_per_s_per_gpu']:,.1f}, compute bound "
        f"{inf['decode_compute_bound_tokens_per_s_per_gpu']:,.0f}); prefill {inf['prefill_tokens_per_s_per_gpu']:,.0f} tokens/s per GPU at the MFU",
    ]
    if "serving" in r:
        s = r["serving"]
        lines.append(
            f"serving: {s['users']:,.0f} users x {s['requests_per_hour']:g} requests/h x {s['tokens_per_request']:g} tokens "
            f"= {s['tokens_per_s']:,.0f} tokens/s at {s['utilisation']:.1%} utilisation: {s['num_gpus']:,} x {r['gpu']} "
            f"({s['nodes_8_gpus']:,} nodes), {fmt_usd(s['cost_usd_per_month'])} per month"
        )
    if "serving_at_user_speed" in r and not r["serving_at_user_speed"]["met"]:
        lines.append(f"serving at a per-user speed: {r['serving_at_user_speed']['note']}")
    elif "serving_at_user_speed" in r:
        u = r["serving_at_user_speed"]
        lines += [
            f"serving at {u['tokens_per_s_per_user']:g} tokens/s per user ({u['tokens_per_s_per_user_source']}): batch "
            f"{u['batch_per_replica']:,} per replica of {u['gpus_per_replica']} x {r['gpu']} ({u['per_user_tokens_per_s']:,.1f} "
            f"tokens/s each, {u['replica_tokens_per_s']:,.0f} per replica) -> {u['replicas']:,} replicas = {u['num_gpus']:,} GPUs, "
            f"{fmt_usd(u['cost_usd_per_month'])} per month",
            f"  efficiency {u['efficiency']:.1%} of the bandwidth bound ({u['efficiency_source']}); speculative speed-up "
            f"{u['speculative_speedup']:g} ({u['speculative_source']}); {u['convention']}",
        ]
    lines += measured_serving_lines(r)
    lines += quantized_serving_lines(r)
    lines += [f"note: {n}" for n in r["notes"]]
    return lines


def measured_serving_lines(r: dict) -> list[str]:
    m = r.get("serving_measured")
    if not m:
        return []
    if not m["met"]:
        return [f"serving, measured ({m['source']}): {m['note']}"]
    u = r.get("serving_at_user_speed") or {}
    beside = (f"; the roofline above: {u['replica_tokens_per_s'] / u['gpus_per_replica']:,.0f} tokens/s per {r['gpu']} "
              f"(predicted)" if u.get("met") else "")
    rate = f"{m['rate_requests_per_s']:g} requests/s" if m["rate_requests_per_s"] else "all requests at once"
    return [f"serving, measured ({m['source']}): one {m['batching']} server gave {m['server_tokens_per_s']:,.1f} output "
            f"tokens/s at {rate} with the median user at {m['per_user_tokens_per_s']:.1f} "
            f"tokens/s (>= {m['tokens_per_s_per_user']:g}; TTFT p99 {m['ttft_ms_p99']:,.0f} ms) -> {m['servers']:,} such "
            f"servers for {m['demand_tokens_per_s']:,.0f} tokens/s{beside}"]


def quantized_serving_lines(r: dict) -> list[str]:
    lines = []
    st = r.get("serving_at_user_speed_student")
    if st:
        lines.append(f"  a distilled student {st['student']} ({st['student_params']:,} parameters) instead: " + (
            f"batch {st['batch_per_replica']:,} per replica of {st['gpus_per_replica']} x {r['gpu']} -> {st['num_gpus']:,} "
            f"GPUs, {fmt_usd(st['cost_usd_per_month'])} per month ({st['quality_source']})" if st["met"] else st["note"]))
    q = r.get("serving_at_user_speed_quantized")
    if not q:
        return lines
    return lines + _quantized_line(r, q)


def _quantized_line(r: dict, q: dict) -> list[str]:
    if not q["met"]:
        return [f"  with {q['quantize']} weights: {q['note']}"]
    return [f"  with {q['quantize']} weights ({q['weight_bytes_source']}): batch {q['batch_per_replica']:,} per "
            f"replica of {q['gpus_per_replica']} x {r['gpu']} -> {q['num_gpus']:,} GPUs, "
            f"{fmt_usd(q['cost_usd_per_month'])} per month (quality: {q['quality_source']})"]


def extrapolation_markdown(r: dict, title: str) -> str:
    return "\n".join([f"# {title}", ""] + [f"- {line}" for line in extrapolation_lines(r)]) + "\n"


def per_rank_memory_table(t: dict) -> str:
    """Per-rank bytes a backend held (memory_per_rank.json): DeepSpeed's, read from its buffers and
    partitions, beside the ZeRO paper's formula and DeepSpeed's own accounting."""
    paper, ds = t["predicted_paper"], t["predicted_deepspeed"]
    lines = [
        f"ZeRO-{t['zero_stage']} memory per rank ({t['world_size']} ranks, {t['precision']}, {t['params']:,} params), "
        f"read from DeepSpeed's buffers and partitions",
        f"{'rank':<5} {'category':<16} {'measured':>12} {'ZeRO paper':>12} {'ratio':>7} {'DeepSpeed':>12} {'ratio':>7}",
    ]
    for rank, row in enumerate(t["per_rank"]):
        for k in ("parameters", "gradients", "optimizer_state"):
            m = row.get(k, 0)
            lines.append(f"{rank:<5} {k:<16} {fmt_bytes(m):>12} {fmt_bytes(paper[k]):>12} {m / paper[k]:>7.3f} "
                         f"{fmt_bytes(ds[k]):>12} {m / ds[k]:>7.3f}")
    lines.append("ZeRO paper: 4+4+8 bytes/param in fp32, 2+2+12 mixed; DeepSpeed also keeps an fp32 master partition "
                 "(fp32: 4+4+12) and fp32 gradient partitions (mixed: 2+6+12). Gradients are read after the last backward.")
    return "\n".join(lines)


def simulate_table(r: dict) -> str:
    """`minigpt simulate`'s report: memory and communication per rank, measured beside predicted."""
    t = r["time_per_step"]
    lines = [
        f"plan: {r['plan_description']} (--plan {r['plan']})",
        f"one training step of {'the first pipeline stage, ' if r['pp'] > 1 else ''}{r['stage_layers']} layers on "
        f"{r['dp'] * r['tp']:,} simulated ranks, {r['precision']} (gradients reduced in {r['reduce_precision']}), "
        f"micro-batch {r['micro_batch']} x {r['seq_len']} tokens{', recompute' if r['recompute'] else ''}; "
        f"{r['params_total']:,} parameters",
        f"method: {r['method']}",
        *[f"note: {n}" for n in r["notes"]],
        "",
        f"{'memory per rank':<28}{'measured':>13}{'predicted':>13}{'measured/predicted':>20}",
    ]
    names = {"params": "params (fp32, at rest)", "grads": "grads (fp32)", "optimizer": "optimizer (Adam m, v)",
             "gathered_params": "gathered 16-bit params", "activations_peak": "activations (peak)",
             "total": "total (peak, + temporaries)"}
    for key, label in names.items():
        m, p, q = r["memory_per_rank"][key], r["predicted_memory_per_rank"][key], r["memory_ratio"][key]
        lines.append(f"{label:<28}{fmt_bytes(m):>13}{fmt_bytes(p):>13}{(f'{q:.3f}' if q is not None else '-'):>20}")
    g = r["memory_per_gpu"]
    q = g["simulated_over_extrapolate"]
    lines += ["predicted: ZeRO's partitioning of fp32 params, grads and Adam m, v (4 + 4 + 8 bytes/param); "
              "Korthikanti s*b*h*(10 + 24/t) bytes per layer + minigpt's LM-head term", "",
              f"memory per GPU, simulated {fmt_bytes(g['simulated_bytes'])} beside extrapolate's "
              f"{fmt_bytes(g['extrapolate_bytes'])} for the same plan (states {fmt_bytes(g['extrapolate_model_states_bytes'])}, "
              f"activations {fmt_bytes(g['extrapolate_activations_bytes'])}): simulated/extrapolate "
              + (f"{q:.3f}" if q is not None else "-"), f"  ({g['convention']})",
              (f"  fits one {g['gpu']} ({fmt_bytes(g['gpu_memory_bytes'])})" if g.get("fits", True) else
               f"  DOES NOT FIT one {g['gpu']} ({fmt_bytes(g['gpu_memory_bytes'])}): shard more (a larger dp with zero=3, "
               f"or more tp or pp)"), "",
              f"{'collectives per rank per step':<32}{'group':>10}{'count':>8}{'bytes sent per rank (ring)':>30}"]
    for c in r["collectives"]:
        lines.append(f"{c['op']:<32}{c['group'] + ' of ' + str(c['group_size']):>10}{c['count']:>8,}"
                     f"{fmt_bytes(c['bytes_per_rank']):>30}")
    counted, formula = r["comm_bytes_per_rank_by_group"], r["predicted_comm_bytes_per_rank_by_group"]
    for g, what in (("dp", "data parallel (DDP 2*Psi ring; ZeRO-3/FSDP 1.5x)"),
                    ("tp", "tensor parallel (2 + 2k all-reduces of b*s*h per layer, k active experts; dense k = 1)"),
                    ("ep", "expert parallel (4 all-to-alls of k*b*s*h per MoE layer, (ep-1)/ep leaving the rank)")):
        if counted.get(g) or formula.get(g):
            ratio = f"{counted[g] / formula[g]:.4f}" if formula[g] else "-"
            lines.append(f"  {what}: counted {fmt_bytes(counted[g])}, formula {fmt_bytes(formula[g])}, counted/formula {ratio}")
    total_ratio = f"{r['comm_ratio']:.4f}" if r["comm_ratio"] is not None else "-"
    lines += [f"  all: counted {fmt_bytes(r['comm_bytes_per_rank'])}, formula {fmt_bytes(r['predicted_comm_bytes_per_rank'])}, "
              f"counted/formula {total_ratio}", "",
              f"time of one micro-batch on {t['gpu']} (and the step's data-parallel reduction): compute {t['compute_s']:.3f} s, "
              f"tensor-parallel traffic {t['tp_comm_s']:.3f} s "
              f"({t['tp_link']}), data-parallel {t['dp_comm_s']:.3f} s ({t['dp_link']}; expert replicas on their own "
              f"group's), expert all-to-all {t.get('ep_comm_s', 0.0):.3f} s ({t.get('ep_link', '-')}): communication "
              f"{t['comm_share']:.0%} of the micro-batch",
              f"  ({t['convention']})", *_pipeline_lines(r.get("pipeline")), f"simulated in {r['elapsed_s']:.1f} s"]
    return "\n".join(lines)


def _pipeline_lines(p: dict | None) -> list[str]:
    if not p:
        return []
    ratio = f"{p['p2p_ratio']:.4f}" if p["p2p_ratio"] is not None else "-"
    bubble = f"{p['bubble_formula']:.1%}" if p["bubble_formula"] is not None else "no closed form (ZB-V)"
    return ["", f"pipeline: {p['stages']} stages ({p['schedule']}, {p['stages_per_rank']} per rank), m = "
                f"{p['micro_batches']} micro-batches per step ({p['micro_batches_source']})",
            f"  point-to-point per boundary per micro-batch: counted {fmt_bytes(p['p2p_activation_bytes_per_boundary_per_micro_batch'])} "
            f"activation forward (+ its gradient backward), formula {fmt_bytes(p['p2p_formula_bytes_per_boundary_per_micro_batch'])}, "
            f"counted/formula {ratio}",
            f"  per rank per step {fmt_bytes(p['p2p_bytes_per_rank_per_step'])}: {p['p2p_s_per_step']:.3f} s on {p['p2p_link']}",
            f"  bubble (predicted, formula): {bubble} of the step; first stage holds {p['in_flight_micro_batches']} "
            f"micro-batches of activations ({fmt_bytes(p['first_stage_activations_bytes'])})",
            f"  ({p['convention']}; {p['bubble_convention']})"]


def _choice_lines(lay: dict) -> list[str]:
    if "chosen_by" not in lay:
        return []
    alts = "; ".join(f"{a['plan']} {a['predicted_step_s']:.3g} s" for a in lay.get("alternatives", []))
    return [f"  chosen: {lay['chosen_by']}" + (f"; predicted step of the fastest: {alts}" if alts else "")]


BACKTEST_UNITS = {"tflops_per_gpu": "TFLOP/s/GPU", "mfu": "MFU", "tokens_per_s_per_gpu": "tok/s/GPU", "step_s": "s/step"}


def backtest_unit(r: dict) -> str:
    """A backtest figure's unit, with the FLOP convention it is counted in where it has one."""
    return BACKTEST_UNITS[r["metric"]] + (f" ({r['convention']})" if r["convention"] else "")


def backtest_lines(b: dict) -> list[str]:
    """The backtest as a table: predicted vs published per run, then the error summary per set."""
    lines = [f"{'run (its plan and set below it)':<46} {'GPUs':>5} {'unit':<25} {'published':>10} {'predicted':>10} "
             f"{'error':>7}"]  # under 120 columns: a plan can be 76 characters, so it has a line of its own
    for r in b["runs"]:
        lines.append(f"{r['name'] + (' [measured]' if r.get('rates_measured') else ''):<46.46} {r['gpus']:>5} "
                     f"{backtest_unit(r):<25} {r['published']:>10.4g} {r['predicted']:>10.4g} {r['error']:>+7.1%}")
        lines.append(f"    {r['plan']} ({r['set']})" + _band_said(r.get("band")))
    for name, s in b["summary"].items():
        lines.append(f"{name}: {s['runs']} runs, median |error| {s['median_abs_error']:.1%}, max {s['max_abs_error']:.1%}"
                     + (f", published inside the band {s['band_coverage']:.0%}" if "band_coverage" in s else ""))
    for name, s in b["by_family"].items():
        lines.append(f"  {name} ({s['set']}): {s['runs']} runs, median |error| {s['median_abs_error']:.1%}, "
                     f"max {s['max_abs_error']:.1%}")
    lines.append(f"model: {b['model']}; development runs were looked at while it was written or revised; held-out runs "
                 f"were added after it was frozen and evaluated once; error on throughput (+: predicted faster); band: "
                 f"the errors of the run's unknown settings at their other values, against the development runs' errors "
                 f"on its GPU class (analytic/band.py)")
    return lines


def _band_said(band: dict | None) -> str:
    if not band:
        return ""
    (lo, hi), (dlo, dhi) = band["settings_error"], band["development_error"]
    return (f"; band: {'inside' if band['covered'] else 'OUTSIDE'} (settings {lo:+.0%} to {hi:+.0%} over "
            f"{band['variants']} variants, development {dlo:+.0%} to {dhi:+.0%})")


def backtest_markdown(b: dict) -> str:
    rows = ["| run | set | GPUs | plan | unit (FLOP convention) | published | predicted | error | in band | source |",
            "|---|---|---:|---|---|---:|---:|---:|---|---|"]
    for r in b["runs"]:
        inside = ("yes" if r["band"]["covered"] else "no") if "band" in r else "-"
        rows.append(f"| {r['name']}{' (measured rates)' if r.get('rates_measured') else ''} | {r['set']} | {r['gpus']:,} | "
                    f"`{r['plan']}` | {backtest_unit(r)} | {r['published']:.4g} | {r['predicted']:.4g} | {r['error']:+.1%} | "
                    f"{inside} | {r['source']} |")
    rows += ["", *(f"- {name}: {s['runs']} runs, median |error| {s['median_abs_error']:.1%}, max {s['max_abs_error']:.1%}"
                   + (f", published inside the band {s['band_coverage']:.0%}" if "band_coverage" in s else "")
                   for name, s in b["summary"].items()),
             *(f"  - {name} ({s['set']}): {s['runs']} runs, median |error| {s['median_abs_error']:.1%}, max "
               f"{s['max_abs_error']:.1%}" for name, s in b["by_family"].items())]
    return "\n".join(rows)
