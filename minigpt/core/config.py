"""Run configuration: TOML presets (shipped inside the package, `minigpt/configs/`) loaded into typed
dataclasses, strictly; preset lookup, and what a resumed run continues with.

Torch-free on purpose: the analytic code (formulas, extrapolation) reads model shapes from here.

A config file has up to five tables, `[model]`, `[data]`, `[train]`, `[sample]` and `[target]`. Every key is
checked: an unknown key, a wrong type or an impossible shape raises `UserError` naming the key,
the valid choices and the fix. Overrides come as `section.key=value` strings (the CLI's `--set`),
with the value parsed as TOML (`train.lr=3e-4`, `model.bias=false`, `data.source="a dir"`), or as
a bare string when it is not valid TOML (`data.source=/tmp/corpus`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

from minigpt.core.errors import UserError
from minigpt.core.files import read_regular


@dataclass
class ModelConfig:
    """Shape of a decoder-only GPT. Names follow GPT-2/nanoGPT so users recognise them."""

    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # None: n_head (plain multi-head attention); fewer: GQA
    n_embd: int = 128
    block_size: int = 128  # maximum context length in tokens
    vocab_size: int = 2048
    ffn_hidden: int | None = None  # None: 4*n_embd for gelu and relu2, ~8/3*n_embd (multiple of 64) for swiglu
    mlp: str = "gelu"  # "gelu" | "swiglu" | "relu2" (relu(x)^2, So et al. 2021: Primer)
    qk_norm: bool = False  # RMSNorm over head_dim on queries and keys before attention (Henry et al. 2020; Dehghani et al. 2023)
    norm: str = "layernorm"  # "layernorm" | "rmsnorm"
    pos_emb: str = "learned"  # "learned" | "rope"
    tie_embeddings: bool = True
    bias: bool = False  # every linear and LayerNorm bias, unless one of the three below says otherwise
    dropout: float = 0.0
    n_expert: int = 0  # 0 or 1: dense MLP; > 1: mixture of n_expert MLPs per block
    n_expert_active: int = 0  # top-k experts per token; 0: 2 (or 1 with n_expert = 1)
    # a mixture's expert capacity: each expert takes at most ceil(factor x tokens x k / n_expert) of a micro-batch's
    # routed slots, in token order, the rest dropped (their slot adds nothing; Fedus et al. 2021); 0: dropless
    moe_capacity_factor: float = 0.0
    # auxiliary-loss-free balancing (DeepSeek-V3, Liu et al. 2024, Sec. 2.1.2): a per-expert bias added to the router's
    # scores to choose the top k (not to weight them), moved by this rate after each step toward an even load
    # (down for an expert above the mean, up below); 0: off (no bias). DeepSeek-V3 uses 0.001
    moe_bias_update_rate: float = 0.0
    # true: the experts as two grouped matrix multiplies over all their tokens (torch.nn.functional.grouped_mm), where
    # torch has it (on a GPU in bf16); false, or where it cannot (adapted or sharded experts): a loop over the experts,
    # the same results. Off by default: on the CPU torch's grouped_mm measured slower than the loop
    # (benchmarks/bench_moe_cpu.jsonl); a GPU's grouped GEMM is not measured here yet
    moe_grouped_mm: bool = False
    head_dim: int | None = None  # None: n_embd / n_head; set it for PaLM/Gemma-style shapes
    rope_theta: float = 10000.0  # RoPE base frequency (RoFormer 10,000; Llama 3 500,000)
    norm_eps: float = 1e-5
    attention_bias: bool | None = None  # biases of the Q/K/V and output projections (None: model.bias)
    qkv_bias: bool | None = None  # biases of Q/K/V alone (None: attention_bias); Qwen2 has them, no output bias
    mlp_bias: bool | None = None  # biases of the MLP linears (None: model.bias)
    pad_vocab_multiple: int = 64  # embedding/LM-head rows rounded up to this (faster matmuls); 1: exact
    quantization: str = ""  # "": weights as trained; "int8" | "int4": a weight-only quantized run (minigpt convert --quantize)

    CHOICES: typing.ClassVar[dict[str, tuple[str, ...]]] = {
        "mlp": ("gelu", "swiglu", "relu2"),
        "norm": ("layernorm", "rmsnorm"),
        "pos_emb": ("learned", "rope"),
        "quantization": ("", "int8", "int4"),
    }

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.ffn_hidden is None:
            if self.mlp == "swiglu":
                # SwiGLU has three matrices instead of two: 2/3 of 4h keeps the parameter count of a
                # 4h GELU MLP (Shazeer 2020; LLaMA rounds up to a multiple, we use 64).
                self.ffn_hidden = _round_up(int(8 * self.n_embd / 3), 64)
            else:
                self.ffn_hidden = 4 * self.n_embd
        if self.n_expert_active == 0:
            self.n_expert_active = min(2, max(self.n_expert, 1))
        if self.head_dim is None and self.n_head > 0 and self.n_embd % self.n_head == 0:
            self.head_dim = self.n_embd // self.n_head
        if self.attention_bias is None:
            self.attention_bias = self.bias
        if self.qkv_bias is None:
            self.qkv_bias = self.attention_bias
        if self.mlp_bias is None:
            self.mlp_bias = self.bias

    @property
    def is_moe(self) -> bool:
        return self.n_expert > 1

    def validate(self) -> None:
        _check_choices("model", self, self.CHOICES)
        counts = ("n_layer", "n_head", "n_kv_head", "n_embd", "block_size", "vocab_size", "ffn_hidden", "n_expert",
                  "n_expert_active", "head_dim", "pad_vocab_multiple")
        for key in counts:  # a config from JSON (a run's, an HF config.json) can carry any type
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise UserError(f"model.{key} = {value!r:.40} must be a whole number")
        for key in ("n_layer", "n_head", "n_kv_head", "n_embd", "block_size", "vocab_size", "ffn_hidden"):
            if getattr(self, key) <= 0:
                raise UserError(f"model.{key} = {getattr(self, key)} must be a positive integer")
        if self.vocab_size >= 2**32:
            raise UserError(f"model.vocab_size = {self.vocab_size:,} does not fit the uint32 token files; "
                            f"use fewer than {2**32:,} tokens")
        if self.head_dim is None:
            raise UserError(
                f"model.n_embd = {self.n_embd} is not divisible by model.n_head = {self.n_head}: "
                f"each head gets n_embd/n_head channels; pick n_head from {divisors(self.n_embd)} (or set "
                f"model.head_dim)"
            )
        if self.head_dim <= 0:
            raise UserError(f"model.head_dim = {self.head_dim} must be a positive integer")
        if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise UserError(f"model.rope_theta = {self.rope_theta} must be a positive number (10000 in RoFormer)")
        if not 0 < self.norm_eps < 1:
            raise UserError(f"model.norm_eps = {self.norm_eps} must be in (0, 1), e.g. 1e-5")
        if not 1 <= self.pad_vocab_multiple <= 4096:
            raise UserError(f"model.pad_vocab_multiple = {self.pad_vocab_multiple} must be in [1, 4096] (1: no padding)")
        if self.n_head % self.n_kv_head:
            raise UserError(
                f"model.n_head = {self.n_head} is not divisible by model.n_kv_head = {self.n_kv_head}: "
                f"grouped-query attention shares each K/V head among n_head/n_kv_head query heads; "
                f"pick n_kv_head from {divisors(self.n_head)}"
            )
        if self.pos_emb == "rope" and self.head_dim % 2:
            raise UserError(
                f"model.pos_emb = 'rope' needs an even model.head_dim, got {self.head_dim}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model.dropout = {self.dropout} must be in [0, 1)")
        if self.n_expert < 0 or self.n_expert_active < 0:
            raise UserError(f"model.n_expert = {self.n_expert} and model.n_expert_active = {self.n_expert_active} must be "
                            f">= 0 (n_expert 0 or 1 is a dense MLP; n_expert_active 0 picks 2)")
        if not (self.moe_capacity_factor == 0 or 0.25 <= self.moe_capacity_factor <= 64):
            raise UserError(f"model.moe_capacity_factor = {self.moe_capacity_factor} must be 0 (dropless) or between 0.25 "
                            f"and 64 (Switch Transformer uses 1.0-2.0)")
        if not 0 <= self.moe_bias_update_rate <= 1:
            raise UserError(f"model.moe_bias_update_rate = {self.moe_bias_update_rate} must be in [0, 1] (0: off; "
                            f"DeepSeek-V3 uses 0.001)")
        if self.is_moe and not 1 <= self.n_expert_active <= self.n_expert:
            raise UserError(
                f"model.n_expert_active = {self.n_expert_active} must be between 1 and model.n_expert = {self.n_expert}"
            )

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding / LM head: vocab_size rounded up to a multiple of pad_vocab_multiple (64).

        The extra rows are never targets and are masked out of sampling; the real `vocab_size`
        governs the loss and generation.
        """
        return _round_up(self.vocab_size, self.pad_vocab_multiple)


@dataclass
class DataConfig:
    """Where the text comes from and how it becomes tokens."""

    # "stdlib": the running Python's standard-library sources (embedded default, no download);
    # a file, directory or glob of local text; a `datasets` folder saved with save_to_disk;
    # a local .json/.jsonl/.parquet/.csv file; or "hf:NAME" for a Hub dataset (needs network).
    source: str = "stdlib"
    text_column: str = "text"  # for `datasets` sources
    hf_config: str = ""  # dataset configuration name for "hf:" sources
    hf_split: str = "train"
    tokenizer: str = "bpe"  # "bpe": train byte-level BPE of model.vocab_size; or a tokenizer.json path
    val_fraction: float = 0.05  # share of documents held out for validation (by a hash of their name)
    max_chars: int = 0  # 0: whole corpus; else stop reading documents after this many characters
    cache_dir: str = ""  # "": $MINIGPT_CACHE or ~/.cache/minigpt
    align: str = "none"  # training windows start anywhere ("none") or only where a document starts ("document")

    def validate(self) -> None:
        if self.align not in ("none", "document"):
            raise UserError(f'data.align = "{self.align}": choose "none" (windows start anywhere) or "document"')
        if not self.source.strip():
            raise UserError("data.source is empty: give 'stdlib', a path, a glob or 'hf:NAME'")
        if not 0.0 < self.val_fraction < 1.0:
            raise UserError(f"data.val_fraction = {self.val_fraction} must be in (0, 1), e.g. 0.05")
        if self.max_chars < 0:
            raise UserError(f"data.max_chars = {self.max_chars} must be >= 0 (0 means the whole corpus)")


# the Linears LoRA may wrap, by their own name: attention's QKV and output, the MLP's (every expert's) two;
# never the router (its choices are discrete) or the LM head. core/blocks.py marks its parts by it.
LORA_TARGETS = ("c_attn", "c_proj", "c_fc")
LOG_SINKS = ("jsonl", "tensorboard", "csv", "wandb")  # metrics.jsonl is always written


@dataclass
class TrainConfig:
    """Optimisation, precision, logging and checkpoint cadence."""

    out_dir: str = "runs/default"
    device: str = "auto"  # "auto" (CUDA when present, else CPU), "cpu", "cuda", "cuda:1", ...
    # "auto": bf16 on a CUDA device that supports it, else fp32 | "fp32" | "bf16" (autocast) |
    # "fp16" (autocast + gradient scaler, CUDA only)
    precision: str = "auto"
    compile: bool | None = None  # torch.compile the model; unset: on for CUDA and CPU (faster: README)
    # "ddp" (torch DistributedDataParallel) | "fsdp" (FSDP2 fully_shard: ZeRO-3 in PyTorch) | "deepspeed" (ZeRO)
    backend: str = "ddp"
    # "adamw" | "muon": torch.optim.Muon (Jordan et al. 2024) on the blocks' matrices, its update scaled to
    # AdamW's RMS (Liu et al. 2025) so one lr and schedule serve both; AdamW on embeddings, head, norms, biases
    optimizer: str = "adamw"
    schedule: str = "cosine"  # "cosine" (to min_lr at max_steps) | "wsd" (warmup, stable, linear decay at the end)
    decay_fraction: float = 0.2  # wsd: the share of max_steps spent decaying to min_lr
    tensor_parallel: int = 1  # ranks per tensor-parallel group (DTensor; heads and ffn_hidden divide by it)
    expert_parallel: int = 1  # ranks a mixture's experts are split over (of the data-parallel ranks; --plan ep=E)
    pipeline_parallel: int = 1  # ranks per pipeline (stages of layers; torch.distributed.pipelining)
    # the pipeline schedule: "gpipe" | "1f1b" | "interleaved-1f1b" (virtual stages) | "zbv" (zero bubble, V-shaped)
    pipeline_schedule: str = "1f1b"
    pipeline_stages_per_rank: int = 0  # model chunks per pipeline rank; 0: 1 (gpipe, 1f1b) or 2 (interleaved, zbv)
    sequence_parallel: bool = False  # tensor parallel: norms and residuals sharded along the sequence (Korthikanti)
    zero_stage: int = 0  # deepspeed: 0 none, 1 optimizer state, 2 + gradients, 3 + parameters partitioned
    offload_optimizer: bool = False  # deepspeed, stages 1-3: optimizer state in CPU memory
    offload_params: bool = False  # deepspeed stage 3, or fsdp on CUDA: parameters in CPU memory
    # where deepspeed puts what is offloaded: "cpu" memory, or "nvme": files in nvme_path on a fast local disk
    # (ZeRO-Infinity, Rajbhandari et al. 2021; stage 3; DeepSpeed's async I/O op, which needs libaio-dev)
    offload_device: str = "cpu"
    nvme_path: str = ""  # the swap folder for offload_device = "nvme"; "": <out_dir>/nvme-swap
    # start a new run from these weights (and their tokenizer), with a fresh optimizer: a minigpt run
    # directory or a Hugging Face folder; [model] comes from the weights
    init_from: str = ""
    # LoRA (Hu et al. 2021) on top of init_from: rank 0 is off; only the adapters train and are saved
    lora_rank: int = 0
    lora_alpha: float = 16.0  # the update is scaled by lora_alpha / lora_rank
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))  # the blocks' Linears
    # distillation (Hinton et al. 2015): a trained run (or HF folder) whose soft targets the student learns,
    # mixed with the data loss: (1 - distill_alpha) CE + distill_alpha T^2 KL(teacher_T || student_T)
    distill_from: str = ""
    distill_alpha: float = 0.5
    distill_temperature: float = 2.0
    # post-training (train/post.py): "lm" pre-trains on the corpus; "sft" | "rm" | "dpo" | "grpo" fine-tune
    # train.init_from on the chat data of train.post_data (a folder `minigpt task` writes, or JSONL in its layout)
    objective: str = "lm"
    post_data: str = ""
    dpo_beta: float = 0.1  # DPO's beta (Rafailov et al. 2023; TRL's default)
    dpo_loss: str = "sigmoid"  # "sigmoid" (DPO) | "ipo" (Azar et al. 2023) | "hinge" (SLiC, Zhao et al. 2023)
    dpo_nll_coef: float = 0.0  # + this x the chosen answers' NLL (RPO, Pang et al. 2024); 0: plain DPO
    grpo_group: int = 8  # answers sampled per prompt (G)
    grpo_clip: float = 0.2  # the ratio's clip range (PPO's epsilon)
    kl_coef: float = 0.04  # GRPO's KL penalty to the reference (DeepSeekMath's 0.04); 0: no reference held
    # a reward model's run (train.objective = "rm"): GRPO's reward is its score of each answer (DeepSpeed-Chat's
    # step 3 reads step 2's model) instead of the exact-answer check; "": the check
    reward_from: str = ""
    rollout_temperature: float = 1.0  # sampling temperature of GRPO's answers
    rollout_max_tokens: int = 16  # the longest answer sampled (and generated in held-out evaluation)
    task_eval_examples: int = 200  # held-out examples in each post-training evaluation (accuracy)
    deepspeed_config: str = ""  # a DeepSpeed JSON whose keys override the generated config
    seed: int = 1337
    max_steps: int = 200  # optimizer steps; also the length of the cosine schedule
    micro_batch_size: int = 16  # sequences per forward pass on one process
    batch_size_tokens: int = 0  # tokens per optimizer step over all ranks; 0: one micro-batch per rank
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 20
    weight_decay: float = 0.1  # applied to matrices only (not biases, norms)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    eval_every: int = 50  # steps between validation losses (and at the end); 0: only at the end
    eval_iters: int = 10  # micro-batches per validation loss
    sample_every: int = 0  # steps between text samples; 0: only at the end
    checkpoint_every: int = 100  # steps between checkpoints (and at the end); 0: only at the end
    log_every: int = 1  # steps between log lines
    activation_checkpointing: bool = False  # recompute each block in backward (saves memory)
    threads: int = 0  # torch intra-op threads on CPU; 0: OMP_NUM_THREADS, else the idle cores (load average)
    peak_tflops: float = 0.0  # peak for MFU; 0: the datasheet peak of a known GPU, else unknown
    peak_from: str = ""  # a `minigpt bench hardware --out FILE` result to use as the peak instead
    report: bool = True  # write report.json/.md (FLOPs counted vs formulas, MFU, memory) at the end
    report_full: bool = False  # also print the whole report at the end (by default: four lines and its path)
    moe_aux_loss_coef: float = 0.01  # weight of the mixture-of-experts load-balancing loss
    keep_checkpoints: int = 1  # complete checkpoints kept (the newest K)
    max_minutes: float = 0.0  # wall-clock budget: stop and checkpoint after this many minutes; 0: none
    auto_resume: bool = False  # resume from train.out_dir's checkpoint when there is one (elastic restarts)
    dist_timeout_s: float = 600.0  # a collective waiting longer than this is an error naming the silent rank
    allow_new_data: bool = False  # resume on a corpus that changed since the run started (its tokenizer kept)
    log_to: list[str] = field(default_factory=lambda: ["jsonl"])  # + "tensorboard", "csv", "wandb"

    CHOICES: typing.ClassVar[dict[str, tuple[str, ...]]] = {
        "precision": ("auto", "fp32", "bf16", "fp16"),
        "backend": ("ddp", "fsdp", "deepspeed"),
        "offload_device": ("cpu", "nvme"),
        "pipeline_schedule": ("gpipe", "1f1b", "interleaved-1f1b", "zbv"),
        "optimizer": ("adamw", "muon"),
        "schedule": ("cosine", "wsd"),
        "objective": ("lm", "sft", "rm", "dpo", "grpo"),
        "dpo_loss": ("sigmoid", "ipo", "hinge"),
    }

    def _validate_techniques(self) -> None:
        """LoRA and distillation keys, alone and together."""
        if self.lora_rank < 0 or self.lora_rank > 4096 or self.lora_alpha <= 0:
            raise UserError(f"train.lora_rank = {self.lora_rank} must be in [0, 4096] and train.lora_alpha = "
                            f"{self.lora_alpha} positive")
        if self.lora_rank and not self.init_from:
            raise UserError("train.lora_rank > 0 adapts a trained model: set train.init_from = RUN (a minigpt run; "
                            "an HF folder: minigpt convert --from-hf DIR --out RUN first)")
        bad = sorted(set(self.lora_targets) - set(LORA_TARGETS))
        if bad or not self.lora_targets:
            raise UserError(f"train.lora_targets = {self.lora_targets!r}: choose from {', '.join(LORA_TARGETS)}")
        if not 0 <= self.distill_alpha <= 1 or self.distill_temperature <= 0:
            raise UserError(f"train.distill_alpha = {self.distill_alpha} must be in [0, 1] and train.distill_temperature "
                            f"= {self.distill_temperature} positive")
        if self.distill_from and self.lora_rank:
            raise UserError("train.distill_from trains a whole student (fresh, or from train.init_from: a pruned run "
                            "recovering); it does not combine with train.lora_rank here: drop one")
        self._validate_post()

    def _validate_post(self) -> None:
        """The post-training keys (train.objective and its settings), each range named, then what they need."""
        ranges = {"dpo_beta": (0, 1e3, False), "dpo_nll_coef": (0, 1e3, True), "grpo_group": (2, 4096, True),
                  "grpo_clip": (0, 1, False), "kl_coef": (0, 1e3, True), "rollout_temperature": (0, 10, False),
                  "rollout_max_tokens": (1, 4096, True), "task_eval_examples": (1, 100_000, True),
                  "expert_parallel": (1, 1 << 20, True)}
        for key, (lo, hi, closed) in ranges.items():
            value = getattr(self, key)
            if not (lo <= value <= hi if closed else lo < value <= hi):
                raise UserError(f"train.{key} = {value} must be in {'[' if closed else '('}{lo:g}, {hi:g}]")
        if self.objective == "lm":
            if self.reward_from:
                raise UserError("train.reward_from scores GRPO's answers: set train.objective = 'grpo' or drop it")
            return
        if not self.init_from or not self.post_data:
            raise UserError(f"train.objective = '{self.objective}' fine-tunes a trained model on chat data: set "
                            f"train.init_from = RUN and train.post_data = DIR (minigpt task --out DIR writes one)")
        if self.distill_from:
            raise UserError(f"train.objective = '{self.objective}' does not combine with train.distill_from: drop one")
        if self.reward_from and self.objective != "grpo":
            raise UserError(f"train.reward_from scores GRPO's answers; train.objective is '{self.objective}': drop it")

    def validate(self) -> None:
        _check_choices("train", self, self.CHOICES)
        for key in ("max_steps", "micro_batch_size", "eval_iters", "log_every", "keep_checkpoints"):
            if getattr(self, key) <= 0:
                raise UserError(f"train.{key} = {getattr(self, key)} must be a positive integer")
        for key in ("batch_size_tokens", "pipeline_stages_per_rank", "warmup_steps", "eval_every", "sample_every", "checkpoint_every", "threads",
                    "peak_tflops", "seed", "max_minutes", "moe_aux_loss_coef"):
            if getattr(self, key) < 0:
                raise UserError(f"train.{key} = {getattr(self, key)} must be >= 0")
        cores = os.cpu_count() or 1
        if self.threads > 4 * cores:
            raise UserError(f"train.threads = {self.threads} is more than 4 x the {cores} CPU cores here; use at most "
                            f"{4 * cores} (0: torch's default)")
        if not 0 < self.lr <= 10 or self.min_lr < 0 or self.min_lr > self.lr:
            raise UserError(f"train.lr = {self.lr}, train.min_lr = {self.min_lr}: need 0 < lr <= 10 and 0 <= min_lr <= lr")
        if self.grad_clip < 0 or not 0 <= self.weight_decay <= 10:
            raise UserError(f"train.grad_clip = {self.grad_clip} must be >= 0 and train.weight_decay = "
                            f"{self.weight_decay} in [0, 10]")
        unknown = sorted(set(self.log_to) - set(LOG_SINKS))
        if unknown:
            raise UserError(f"train.log_to has {unknown[0]!r}; choose from {', '.join(LOG_SINKS)}")
        self._validate_techniques()
        if self.zero_stage not in (0, 1, 2, 3):
            raise UserError(f"train.zero_stage = {self.zero_stage} must be 0, 1, 2 or 3")
        for key in ("tensor_parallel", "pipeline_parallel"):
            if getattr(self, key) < 1:
                raise UserError(f"train.{key} = {getattr(self, key)} must be a positive integer (1: none)")
        if not 0 < self.decay_fraction <= 1:
            raise UserError(f"train.decay_fraction = {self.decay_fraction} must be in (0, 1], e.g. 0.2")
        if self.dist_timeout_s <= 0:
            raise UserError(f"train.dist_timeout_s = {self.dist_timeout_s} must be positive, e.g. 600")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise UserError(f"train.beta1 = {self.beta1}, train.beta2 = {self.beta2} must be in [0, 1)")
        if not self.out_dir.strip():
            raise UserError("train.out_dir is empty: give a directory for the run, e.g. runs/tiny")


@dataclass
class SampleConfig:
    """Defaults for text generation (samples during training and `minigpt generate`)."""

    prompt: str = "def"
    max_new_tokens: int = 200
    temperature: float = 0.8  # 0: greedy
    top_k: int = 50  # 0: off
    top_p: float = 1.0  # 1.0: off
    seed: int = 0
    stop_token: str = "<|endoftext|>"  # generation of a sequence ends at this token (an imported model's EOS)

    def validate(self) -> None:
        if self.max_new_tokens <= 0:
            raise UserError(f"sample.max_new_tokens = {self.max_new_tokens} must be positive")
        if self.temperature < 0:
            raise UserError(f"sample.temperature = {self.temperature} must be >= 0 (0 is greedy)")
        if self.top_k < 0:
            raise UserError(f"sample.top_k = {self.top_k} must be >= 0 (0 disables it)")
        if self.seed < 0:
            raise UserError(f"sample.seed = {self.seed} must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"sample.top_p = {self.top_p} must be in (0, 1] (1 disables it)")


@dataclass
class TargetConfig:
    """What a model costs at full scale: its training tokens and how its figures are labelled."""

    train_tokens: float = 0.0  # tokens of the full training run (0: not a target until --tokens is given)
    global_batch_tokens: float = 0.0  # tokens per optimizer step at scale (0: 4M, an assumption)
    label: str = ""  # printed wherever the target's figures appear, e.g. "estimate, not official"
    published_plan: str = ""  # the layout it was (reportedly) trained with, in --plan spelling, e.g. "tp=8,pp=35"
    published_plan_source: str = ""  # where that layout comes from

    def validate(self) -> None:
        if self.train_tokens < 0 or self.global_batch_tokens < 0:
            raise UserError("target.train_tokens and target.global_batch_tokens must be >= 0")
        if self.published_plan and not self.published_plan_source:
            raise UserError("target.published_plan needs target.published_plan_source (who published it)")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    target: TargetConfig = field(default_factory=TargetConfig)

    SECTIONS: typing.ClassVar[tuple[str, ...]] = ("model", "data", "train", "sample", "target")

    def validate(self) -> "Config":
        for name in self.SECTIONS:
            getattr(self, name).validate()
        return self

    def to_dict(self) -> dict:
        return {name: dataclasses.asdict(getattr(self, name)) for name in self.SECTIONS}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)


# ----------------------------------------------------------------------------------------------
# loading


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a TOML preset (or the defaults when `path` is None), apply overrides, validate."""
    return config_from_dict(load_raw(path, overrides), origin=str(path) if path else "defaults")


def load_raw(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """The nested tables of a TOML file (or none) with overrides applied, before any checking."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file {path} does not exist; presets: {', '.join(preset_names())}")
        raw = parse_file(path, "config file", tomllib.loads, tomllib.TOMLDecodeError, "TOML")
    for item in overrides:
        apply_override(raw, item)
    return raw


def config_from_dict(raw: dict, origin: str = "config") -> Config:
    """Build a validated Config from nested dicts ({"model": {...}, ...}), strictly."""
    unknown = sorted(set(raw) - set(Config.SECTIONS))
    if unknown:
        raise UserError(
            f"{origin}: unknown table [{unknown[0]}]; valid tables: {', '.join(Config.SECTIONS)}"
        )
    sections = {}
    for name in Config.SECTIONS:
        cls = typing.get_type_hints(Config)[name]
        table = raw.get(name, {})
        if not isinstance(table, dict):
            raise UserError(f"{origin}: '{name}' must be a table ([{name}]), got {type(table).__name__}")
        sections[name] = build_section(cls, name, table, origin)
    return Config(**sections).validate()


def config_from_json(path: str | Path) -> Config:
    """Load the resolved config a run saved as JSON (see Config.to_json)."""
    raw = parse_file(Path(path), "run config", json.loads, json.JSONDecodeError, "JSON")
    if not isinstance(raw, dict):
        raise UserError(f"run config {path} must hold a JSON object of tables")
    return config_from_dict(raw, origin=str(path))


MAX_CONFIG_BYTES = 16 << 20  # a config or target file larger than 16 MiB is not one


def parse_file(path: Path, what: str, parse, error: type, fmt: str):
    """A config-like file read defensively: missing, unreadable, too large, not UTF-8, not valid `fmt`, or
    nested too deeply for the parser each give one line naming the file."""
    data = read_regular(path, what, MAX_CONFIG_BYTES)  # a regular file under the limit: never a FIFO or a device
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}): save it "
                        f"as UTF-8") from None
    try:
        return parse(text)
    except error as e:
        raise UserError(f"{what} {path} is not valid {fmt}: {e}") from None
    except RecursionError:
        raise UserError(f"{what} {path} nests too deeply to be a {fmt} config: give the right file") from None


def _did_you_mean(name: str, fields: list[str], section: str) -> str:
    """'did you mean section.x?' for a near miss (a typo), else the valid keys."""
    import difflib

    close = difflib.get_close_matches(str(name), fields, n=1, cutoff=0.6)
    if close:
        return f"did you mean {section}.{close[0]}?"
    return f"valid keys in [{section}]: {', '.join(fields)}"


def build_section(cls: type, section: str, table: dict, origin: str):
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in table.items():
        if key not in fields:
            raise UserError(
                f"{origin}: unknown key {section}.{key}; {_did_you_mean(key, fields, section)}"
            )
        kwargs[key] = _coerce(value, hints[key], f"{section}.{key}", origin)
    return cls(**kwargs)


def _coerce(value, hint, name: str, origin: str):
    """Check a TOML value against a field's type. ints are accepted for floats, nothing else."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # `int | None`: TOML has no null
        if value is None:  # JSON has: an optional field left unset
            return None
        hint = next(t for t in typing.get_args(hint) if t is not type(None))
    expected = hint
    if typing.get_origin(hint) is list:  # list[str]: a TOML array of strings
        item = typing.get_args(hint)[0]
        if not isinstance(value, list) or not all(isinstance(v, item) for v in value):
            raise UserError(f"{origin}: {name} = {value!r} must be a list of {item.__name__}, e.g. [\"jsonl\", \"csv\"]")
        return list(value)
    if expected is bool:
        ok = isinstance(value, bool)
    elif expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif expected is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            value = float(value)
            if not math.isfinite(value):
                raise UserError(f"{origin}: {name} = {value} is not a finite number; give a number such as 0.1")
    else:
        ok = isinstance(value, expected)
    if not ok:
        raise UserError(
            f"{origin}: {name} = {value!r} has type {type(value).__name__}, expected {expected.__name__}"
        )
    return value


def apply_override(raw: dict, item: str) -> None:
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise UserError(f"--set {item!r}: expected section.key=value, e.g. --set train.max_steps=100")
    section, name = parts
    if section not in Config.SECTIONS:
        raise UserError(f"--set {item!r}: unknown table [{section}]; valid tables: {', '.join(Config.SECTIONS)}")
    fields = [f.name for f in dataclasses.fields(typing.get_type_hints(Config)[section])]
    if name not in fields:
        raise UserError(f"--set {item!r}: unknown key {section}.{name}; {_did_you_mean(name, fields, section)}")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()  # a bare string such as a path
    table = raw.setdefault(section, {})
    if not isinstance(table, dict):
        raise UserError(f"--set {item!r}: [{section}] is not a table")
    table[name] = value


def _check_choices(section: str, obj, choices: dict[str, tuple[str, ...]]) -> None:
    for key, valid in choices.items():
        if getattr(obj, key) not in valid:
            raise UserError(
                f"{section}.{key} = {getattr(obj, key)!r} is not one of: {', '.join(repr(v) for v in valid)}"
            )


def _round_up(x: int, multiple: int) -> int:
    return int(math.ceil(x / multiple) * multiple)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def configs_dir() -> Path:
    """The presets shipped inside the package (package data: present in a wheel and a source tree)."""
    return Path(__file__).resolve().parent.parent / "configs"


def preset_names() -> list[str]:
    return sorted(p.stem for p in configs_dir().glob("*.toml"))


def resolve_preset(name: str | None) -> Path:
    """A config path, or a preset name (`tiny`, `gpt3-175b`, ...) shipped with minigpt.

    A name that is neither an existing file nor a preset is an error listing the presets.
    """
    name = name or "tiny"
    path = Path(name)
    if path.is_file():
        return path
    preset = configs_dir() / f"{name}.toml"
    if path.suffix != ".toml" and preset.is_file():
        return preset
    raise UserError(f"config {name!r} is neither a file nor a preset; presets: {', '.join(preset_names())}")


# the GPT-3 family's presets (Brown et al. 2020, Table 2.1), smallest first
GPT3_PRESETS = ("gpt3-small", "gpt3-medium", "gpt3-large", "gpt3-xl", "gpt3-2.7b", "gpt3-6.7b", "gpt3-13b", "gpt3-175b")


# ----------------------------------------------------------------------------------------------
# the batch of one optimizer step


def read_json(path: Path, what: str) -> dict:
    """A JSON object from a file, read defensively (parse_file): one line naming the file otherwise."""
    raw = parse_file(Path(path), what, json.loads, json.JSONDecodeError, "JSON")
    if not isinstance(raw, dict):
        raise UserError(f"{what} {path} must hold a JSON object")
    return raw
