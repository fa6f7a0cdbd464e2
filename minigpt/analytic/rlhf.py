"""What post-training costs at scale: supervised fine-tuning, a reward model and RLHF (PPO as DeepSpeed-Chat and
InstructGPT run it), from the FLOPs each stage executes and two assumed efficiencies, beside DeepSpeed-Chat's
published step-3 times (Yao et al. 2023, arXiv 2308.01320; its blog's Tables 1 and 2).

Per query-answer pair of P prompt and A answer tokens, actor N_a parameters, reward model and critic N_r (the
critic starts from the reward model, as in DeepSpeed-Chat), F(N, T) the forward matmul FLOPs of T tokens:

    generation  the actor decodes A tokens after prefilling P: time per decode step is the larger of reading the
                replica's weights and KV cache from HBM (at bw_util of the datasheet bandwidth) and its FLOPs (at
                mfu of the peak), a step serving the replica's whole batch
    experience  forwards over P + A: the actor's log-probs, the reference (both N_a), the reward model and the critic
    training    the actor and the critic, forward and backward (3 F) per PPO epoch
    ZeRO-3      every pass gathers each model's 16-bit weights over the links (NVLink in a node, the NICs across
                nodes), and a fully trained model reduce-scatters its gradients: per round, the longer of this
                traffic and the passes' FLOPs

The compute phases run at `mfu` of the peak on every GPU. Generation runs on replicas of gen_tp GPUs (DeepSpeed-HE's
inference_tp_size), gen_batch_per_gpu prompts per GPU per round; a step reads the replica's weights from HBM, or
first gathers them over the links when they do not fit beside the partitioned states (ZeRO-3 without enough
tensor parallelism). The defaults
and each published row's settings are DeepSpeed-Chat's released step-3 scripts. mfu and bw_util are
assumptions, not fits: their ranges make the band. SFT and reward-model training are 3 F per token trained (the reward model
2 sequences per pair).
"""

from __future__ import annotations

import copy
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import tomllib

from minigpt.analytic.flops import forward_matmul_flops_per_token, param_counts
from minigpt.core.config import ModelConfig
from minigpt.core.errors import UserError
from minigpt.core.hardware import GPUS_PER_NODE, GPUSpec, gpu_by_name

MFU = (0.15, 0.30, 0.45)  # low, assumed, high: compute phases of a ZeRO-3 fine-tune (no pipeline)
BW_UTIL = (0.30, 0.55, 0.80)  # low, assumed, high: share of HBM bandwidth a decode step reaches
PUBLISHED = Path(__file__).with_name("published_rlhf.toml")


@dataclass
class RLHFJob:
    actor: ModelConfig
    reward: ModelConfig  # also the critic's shape
    queries: int = 131_900  # prompts of step 3 (DeepSpeed-Chat's recipe: one epoch)
    prompt_tokens: int = 256
    answer_tokens: int = 256
    gen_batch_per_gpu: int = 4  # prompts each GPU generates for per round (DeepSpeed-Chat's per_device batch)
    gen_tp: int = 1  # GPUs a generating replica spans (DeepSpeed-HE's inference_tp_size)
    actor_lora: bool = False  # the actor trains LoRA adapters: its backward computes no weight gradients
    actor_recompute: bool = True  # activation checkpointing: one more actor forward in training
    ppo_epochs: int = 1
    method: str = "ppo"  # "ppo" (actor, critic, reference, reward model) | "grpo" (group answers, verified rewards)
    group: int = 8  # grpo: answers per prompt
    sft_tokens: float = 0.0  # tokens trained in step 1
    rm_pairs: float = 0.0  # preference pairs in step 2 (each a chosen and a rejected sequence)
    rm_tokens_per_sequence: int = 512

    def validate(self) -> None:
        for key in ("queries", "prompt_tokens", "answer_tokens", "gen_batch_per_gpu", "gen_tp", "ppo_epochs"):
            if getattr(self, key) < 1:
                raise UserError(f"--{key.replace('_', '-')} must be at least 1 (got {getattr(self, key)})")
        if self.sft_tokens < 0 or self.rm_pairs < 0:
            raise UserError("--sft-tokens and --rm-pairs must be >= 0")
        if self.method not in ("ppo", "grpo") or self.group < 2:
            raise UserError(f"--rl {self.method} with --group {self.group}: give ppo or grpo, and a group of 2 or more")

    @property
    def sequences(self) -> int:
        """Answers generated and trained on: one per query (PPO), a group per query (GRPO)."""
        return self.queries * (self.group if self.method == "grpo" else 1)


def _fwd(c: ModelConfig, tokens: int) -> float:
    """Forward matmul FLOPs of one sequence of `tokens` (attention over its own square)."""
    return forward_matmul_flops_per_token(c, tokens) * tokens


def step3_flops(job: RLHFJob) -> dict[str, float]:
    """FLOPs of RLHF (step 3) over every query, by phase. The actor's training pass is forward + backward: 3 F, or
    2 F with LoRA (activation gradients only, the adapters' being negligible), + 1 F recomputed."""
    T, q = job.prompt_tokens + job.answer_tokens, job.sequences
    a, r = _fwd(job.actor, T), _fwd(job.reward, T)
    actor_pass = (2 if job.actor_lora else 3) + (1 if job.actor_recompute else 0)
    if job.method == "grpo":  # no critic and no reward model (a verifier); the reference's forward; one update
        return {"generation": q * a, "experience": q * a, "training": q * job.ppo_epochs * actor_pass * a}
    return {"generation": q * a, "experience": q * (2 * a + 2 * r),
            "training": q * job.ppo_epochs * (actor_pass * a + 3 * r)}


def generation_seconds(job: RLHFJob, gpu: GPUSpec, n_gpus: int, mfu: float, bw_util: float, peak: float) -> dict:
    """Decode time of every answer. A replica of gen_tp GPUs decodes gen_batch_per_gpu x gen_tp prompts per round;
    each decode step reads its weights and KV cache from HBM, or, when its share of the 16-bit weights, its KV cache
    and the partitioned training states do not fit a GPU together, gathers the weights from the ZeRO-3 partitions
    over the links first (DeepSpeed-HE without enough tensor parallelism)."""
    c, tp = job.actor, min(job.gen_tp, n_gpus)
    replicas, batch = max(1, n_gpus // tp), job.gen_batch_per_gpu * tp
    rounds = math.ceil(job.sequences / (batch * replicas))
    weights = 2 * param_counts(c).total / tp
    kv_per_token = 2 * 2 * c.n_layer * c.n_kv_head * c.head_dim / tp  # K and V, 16-bit
    held = weights + resident_bytes(job, n_gpus) + batch * (job.prompt_tokens + job.answer_tokens) * kv_per_token
    gathered = held > gpu.memory_gb * 1e9
    link = (gpu.nvlink_gbs if n_gpus <= GPUS_PER_NODE else gpu.internode_gbs) * 1e9
    gather = weights * (n_gpus - 1) / n_gpus / link if gathered else 0.0
    P, A, total = job.prompt_tokens, job.answer_tokens, 0.0
    dense = forward_matmul_flops_per_token(c, 0)  # + 4 t H D L of attention at context t (flops.py's formula)
    for t in range(P, P + A):  # one decode step at context t
        read = (weights + batch * t * kv_per_token) / (gpu.bandwidth_tbs * 1e12 * bw_util)
        compute = batch * (dense + 4 * t * c.n_head * c.head_dim * c.n_layer) / tp / (peak * mfu)
        total += max(read + gather, compute)
    prefill = batch * _fwd(c, P) / tp / (peak * mfu) + gather
    return {"generation_s": rounds * (total + prefill), "generation_tp": tp, "weights_gathered_per_step": gathered,
            "rounds": rounds}


def resident_bytes(job: RLHFJob, n_gpus: int) -> float:
    """What each GPU holds beside the generating weights, every model ZeRO-3-partitioned over the GPUs: the actor
    (16 bytes a parameter trained, 2 when LoRA freezes it), the reference (2), the critic (16) and the reward model (2)."""
    a, r = param_counts(job.actor).total, param_counts(job.reward).total
    critic_and_reward = 0 if job.method == "grpo" else 16 * r + 2 * r
    return ((2 if job.actor_lora else 16) * a + 2 * a + critic_and_reward) / n_gpus


def gathered_bytes_per_round(job: RLHFJob) -> float:
    """16-bit weights ZeRO-3 gathers (and gradients it reduce-scatters) per PPO round, whole-model bytes: the actor
    in the experience forward, the reference, and the training forward, recompute and backward (its gradients
    when trained fully); the critic likewise (trained fully); the reward model once."""
    a, r = 2 * param_counts(job.actor).total, 2 * param_counts(job.reward).total
    actor_passes = 1 + 3 + (1 if job.actor_recompute else 0) + (0 if job.actor_lora else 1)
    if job.method == "grpo":  # the reference's forward and the actor's training passes
        return (1 + (actor_passes - 1) * job.ppo_epochs) * a
    return (actor_passes * job.ppo_epochs + 1) * a + (1 + 4 * job.ppo_epochs) * r + r


def step3_seconds(job: RLHFJob, gpu: GPUSpec, n_gpus: int, mfu: float, bw_util: float, dtype: str = "bf16") -> dict:
    """Generation, then per round the experience and training passes: the longer of their FLOPs at mfu and the
    ZeRO-3 traffic at the link rate (prefetch overlaps the two; a small per-GPU batch leaves the traffic exposed)."""
    peak = gpu.tflops[dtype] * 1e12
    f = step3_flops(job)
    gen = generation_seconds(job, gpu, n_gpus, mfu, bw_util, peak)
    rounds = math.ceil(job.sequences / (job.gen_batch_per_gpu * n_gpus))
    compute = (f["experience"] + f["training"]) / rounds / (n_gpus * peak * mfu)
    link = (gpu.nvlink_gbs if n_gpus <= GPUS_PER_NODE else gpu.internode_gbs) * 1e9
    traffic = gathered_bytes_per_round(job) * (n_gpus - 1) / n_gpus / link
    rest = rounds * max(compute, traffic)
    return {**gen, "experience_and_training_s": rest, "zero3_traffic_bound": traffic > compute,
            "total_s": gen["generation_s"] + rest}


def sft_rm_seconds(job: RLHFJob, gpu: GPUSpec, n_gpus: int, mfu: float, dtype: str = "bf16") -> dict:
    peak = gpu.tflops[dtype] * 1e12 * n_gpus * mfu
    sft = job.sft_tokens * 3 * forward_matmul_flops_per_token(job.actor, job.prompt_tokens + job.answer_tokens)
    rm = job.rm_pairs * 2 * 3 * _fwd(job.reward, job.rm_tokens_per_sequence)
    return {"sft_flops": sft, "sft_s": sft / peak, "rm_flops": rm, "rm_s": rm / peak}


def pipeline_cost(job: RLHFJob, gpu_name: str, n_gpus: int, price: float | None = None) -> dict:
    """Every stage's FLOPs and time at the assumed efficiencies, with the band from their ranges."""
    job.validate()
    gpu = gpu_by_name(gpu_name)
    rate = price if price is not None else gpu.price_usd_per_hour
    points = {}
    for name, mfu, bw in (("low", MFU[0], BW_UTIL[0]), ("assumed", MFU[1], BW_UTIL[1]), ("high", MFU[2], BW_UTIL[2])):
        s3, s12 = step3_seconds(job, gpu, n_gpus, mfu, bw), sft_rm_seconds(job, gpu, n_gpus, mfu)
        total = s3["total_s"] + s12["sft_s"] + s12["rm_s"]
        points[name] = {**s3, **s12, "pipeline_s": total, "gpu_hours": total * n_gpus / 3600,
                        "usd": total * n_gpus / 3600 * rate}
    return {"gpu": gpu.name, "num_gpus": n_gpus, "usd_per_gpu_hour": rate, "flops": step3_flops(job),
            "assumed": points["assumed"],
            "band": {"slow (low efficiency)": points["low"], "fast (high efficiency)": points["high"]},
            "efficiencies": {"mfu": MFU, "hbm_bandwidth_utilisation": BW_UTIL}}


def opt(n_layer: int, n_embd: int) -> ModelConfig:
    """An OPT model's shape (Zhang et al. 2022: GPT-3's shapes, 50,272 tokens, 2,048 positions)."""
    return ModelConfig(n_layer=n_layer, n_head=n_embd // 128 if n_embd >= 2048 else 16, n_embd=n_embd, block_size=2048,
                       vocab_size=50272, mlp="gelu", norm="layernorm", pos_emb="learned", tie_embeddings=True, bias=True)


def published_runs(path: Path = PUBLISHED) -> list[dict]:
    with open(path, "rb") as f:
        return tomllib.load(f)["run"]


def backtest(path: Path = PUBLISHED) -> list[dict]:
    """Each published step-3 time beside the prediction at the assumed efficiencies and its band (the low and high
    ends), with predicted / published."""
    out = []
    for run in published_runs(path):
        job = RLHFJob(opt(*run["actor_shape"]), opt(*run["reward_shape"]), run["queries"], run["prompt_tokens"],
                      run["answer_tokens"], run["gen_batch_per_gpu"], run["gen_tp"], run["actor_lora"])
        gpu = gpu_by_name(run["gpu"])
        pred = {k: step3_seconds(copy.deepcopy(job), gpu, run["num_gpus"], m, b)["total_s"] / 3600
                for k, m, b in (("low", MFU[0], BW_UTIL[0]), ("assumed", MFU[1], BW_UTIL[1]), ("high", MFU[2], BW_UTIL[2]))}
        out.append({"name": run["name"], "gpu": gpu.name, "num_gpus": run["num_gpus"],
                    "published_hours": run["hours"], "predicted_hours": pred["assumed"],
                    "band_hours": (pred["high"], pred["low"]), "ratio": pred["assumed"] / run["hours"],
                    "inside_band": pred["high"] <= run["hours"] <= pred["low"], "source": run["source"]})
    return out


def rlhf_report(job: RLHFJob, gpu_name: str, n_gpus: int, price: float | None, label: str) -> dict:
    return {"target": label, "actor_params": param_counts(job.actor).total, "reward_params": param_counts(job.reward).total,
            "job": {k: v for k, v in vars(job).items() if k not in ("actor", "reward")},
            **pipeline_cost(job, gpu_name, n_gpus, price), "backtest": (rows := backtest()),
            "backtest_summary": {"rows": len(rows), "inside_band": sum(b["inside_band"] for b in rows),
                                 "median_abs_error": statistics.median(abs(b["ratio"] - 1) for b in rows),
                                 "min_ratio": min(b["ratio"] for b in rows), "max_ratio": max(b["ratio"] for b in rows)},
            "convention": "exact matmul FLOPs as executed; time at assumed efficiencies (mfu of the dense 16-bit peak, "
                          "a share of HBM bandwidth for decoding), not fitted; the band: their low and high ends"}


def rlhf_lines(r: dict) -> list[str]:
    from minigpt.core.fmt import fmt_flops, fmt_usd

    a, j = r["assumed"], r["job"]
    lo, hi = r["band"]["fast (high efficiency)"], r["band"]["slow (low efficiency)"]
    models = (f"{r['reward_params'] / 1e6:.0f}M reward model and critic" if j["method"] == "ppo"
              else f"GRPO: {j['group']} answers per query, a verifier for reward")
    lines = [f"RLHF pipeline for {r['target']} ({r['actor_params'] / 1e9:.2f}B actor, {models}) on {r['num_gpus']:,} x {r['gpu']}",
             f"  step 3 ({j['method'].upper()}): {j['queries']:,} queries x ({j['prompt_tokens']} prompt + {j['answer_tokens']} answer tokens), "
             f"{j['gen_batch_per_gpu']} prompts/GPU/round, generation tp {j['gen_tp']}, actor "
             f"{'LoRA' if j['actor_lora'] else 'full'}{', recompute' if j['actor_recompute'] else ''}",
             "  FLOPs (exact, executed): " + ", ".join(f"{k} {fmt_flops(v)}" for k, v in r["flops"].items()),
             f"  predicted (assumed mfu {r['efficiencies']['mfu'][1]:.2f}, HBM {r['efficiencies']['hbm_bandwidth_utilisation'][1]:.2f}): "
             f"SFT {a['sft_s'] / 3600:.2f} h, reward model {a['rm_s'] / 3600:.2f} h, RLHF {a['total_s'] / 3600:.2f} h "
             f"(generation {a['generation_s'] / 3600:.2f} h{', weights gathered over the links each step' if a['weights_gathered_per_step'] else ''}); total {a['pipeline_s'] / 3600:.2f} h = "
             f"{a['gpu_hours']:,.0f} GPU-hours = {fmt_usd(a['usd'])} at ${r['usd_per_gpu_hour']:g}/GPU-hour (assumed)",
             f"  band: {lo['pipeline_s'] / 3600:.2f} - {hi['pipeline_s'] / 3600:.2f} h, {fmt_usd(lo['usd'])} - {fmt_usd(hi['usd'])} "
             f"(efficiencies {r['efficiencies']['mfu'][2]:.2f}/{r['efficiencies']['hbm_bandwidth_utilisation'][2]:.2f} to "
             f"{r['efficiencies']['mfu'][0]:.2f}/{r['efficiencies']['hbm_bandwidth_utilisation'][0]:.2f})",
             "", "DeepSpeed-Chat's published step-3 times (Yao et al. 2023, blog Tables 1-2) beside this model, each row at "
             "its released script's settings:", f"  {'run':30s} {'published h':>11s} {'predicted h':>11s} {'pred/pub':>8s}  band h"]
    for b in r["backtest"]:
        lines.append(f"  {b['name']:30s} {b['published_hours']:11.2f} {b['predicted_hours']:11.2f} {b['ratio']:8.2f}  "
                     f"{b['band_hours'][0]:.2f}-{b['band_hours'][1]:.2f}{'' if b['inside_band'] else ' (outside)'}")
    s = r["backtest_summary"]
    lines.append(f"  median |predicted / published - 1| {s['median_abs_error']:.0%}, range {s['min_ratio']:.2f}-{s['max_ratio']:.2f}; "
                 f"{s['inside_band']} of {s['rows']} inside the band (PPO rows; the published settings beyond each script's are "
                 f"not stated)")
    return lines
