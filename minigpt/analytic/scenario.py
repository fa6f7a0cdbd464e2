"""What an extrapolation is asked (`Scenario`): the GPU, its count or a budget in days, the efficiency
(measured, predicted or an assumed published MFU), prices, tokens, the plan; its checks, and the cited
reference MFUs and conventions (1 PF-day = 8.64e19 FLOPs, GPT-3 Table D.1; a month of serving is 720
hours). Torch-free."""

from __future__ import annotations

from dataclasses import dataclass, field

from minigpt.analytic import flops as F, steptime as T
from minigpt.core.config import ModelConfig, TargetConfig
from minigpt.core.errors import UserError
from minigpt.core.hardware import GPUSpec

PF_DAY = 1e15 * 86400


HOURS_PER_MONTH = 720


DEFAULT_GLOBAL_BATCH_TOKENS = 4 * 2**20  # assumption when the target gives none


DEFAULT_NUM_GPUS = 1024  # assumption when neither a count nor a budget in days is given


MEMORY_HEADROOM = 0.9  # share of GPU memory a layout may plan to use (temporaries, fragmentation)


CONTEXT_SPLITS = (1, 2, 4, 8, 16)  # context-parallel degrees the layout search tries (Dubey et al. 2024, Table 4: Llama 3 at 131,072 tokens on cp 16)


EXPERT_SPLITS = (1, 2, 4, 8, 16)  # expert-parallel degrees the layout search tries for a mixture (dividing n_expert and dp)


WORDS_PER_TOKEN = 0.75  # 1000 tokens ~ 750 English words (OpenAI's rule of thumb)


# How a predicted step runs, beyond the layout: each setting's default (what extrapolate assumes when the user
# does not say) and the values the band tries when it is not given (band.py). Megatron-Core's defaults at scale.
SETTINGS = {
    "recompute": ("full", "full activation recompute (what the memory search assumes)", ("selective", "full")),
    "attention": ("flash", "a flash attention kernel", ()),
    "overlap": ("full", "Megatron-Core's overlap of every transfer", ("backward", "full")),
    "reduce_dtype": ("fp32", "fp32 gradient reduction", ("bf16", "fp32")),
    "flash_kernel": ("fast", "cuDNN / FlashAttention-3-class attention", ("fast", "fa2")),
    "loss": ("megatron", "Megatron-Core's unfused cross-entropy over fp32 logits", ("fused", "megatron")),
    "latency": ("none", "bandwidth terms only (NCCL's latency model: --latency nccl)", ()),
    "first_stage_layers": (0, "an even split of the layers over the pipeline stages", ()),
    "last_stage_layers": (0, "an even split of the layers over the pipeline stages", ()),
    "internode_gbs": (None, "the GPU's DGX network: one NIC per GPU", ()),
    "capacity_factor": (0.0, "dropless routing", ()),
    "expert_imbalance": (1.0, "an even load over the expert-parallel ranks", (1.0, 1.25)),
}


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
    micro_batch_given: bool = True  # False: the default 1, and the band tries 2
    settings: dict = field(default_factory=dict)  # SETTINGS given by the user (the rest take their defaults)
    global_batch_tokens: float | None = None  # tokens per optimizer step; None: the target's (or the default)
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


# bounds on what a scenario may be given, far beyond any run so far, so that every figure stays finite and
# meaningful (GPT-4's estimated 13T tokens; a GPU-hour costs dollars, not millions; a budget of minutes to centuries)
MAX_TOKENS = 1e18
MAX_PRICE_PER_GPU_HOUR = 1e6
DAYS_RANGE = (1e-3, 1e5)


def check_scenario(s: Scenario) -> None:
    if s.mfu is not None and not 0 < s.mfu <= 1:
        raise UserError(f"MFU {s.mfu} must be in (0, 1], e.g. --mfu 0.35")
    if s.price_per_gpu_hour is not None and not 0 <= s.price_per_gpu_hour <= MAX_PRICE_PER_GPU_HOUR:
        raise UserError(f"price {s.price_per_gpu_hour:g} per GPU-hour must be between 0 and {MAX_PRICE_PER_GPU_HOUR:g}")
    if s.num_gpus is not None and s.num_gpus < 1:
        raise UserError(f"GPU count {s.num_gpus} must be a positive integer")
    if s.days is not None and not DAYS_RANGE[0] <= s.days <= DAYS_RANGE[1]:
        raise UserError(f"--days {s.days:g} must be between {DAYS_RANGE[0]:g} (about 90 s) and {DAYS_RANGE[1]:g}")
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


def setting(s: Scenario, key: str):
    """A step setting: the user's, else its default (SETTINGS)."""
    return s.settings.get(key, SETTINGS[key][0])


def check_stage_layers(c: ModelConfig, s: Scenario) -> None:
    """--stage-layers places layers on a given pipeline: it needs --plan pp, and must leave each stage a layer."""
    first, last = setting(s, "first_stage_layers"), setting(s, "last_stage_layers")
    if not (first or last):
        return
    if s.plan.get("pp", 1) < 2:
        raise UserError("--stage-layers places layers on the first and last pipeline stages: give --plan pp=N (N >= 2)")
    T.stage_layers(c.n_layer, s.plan["pp"], first, last)


def check_context(c: ModelConfig, s: Scenario) -> None:
    """A context-parallel plan splits each training sequence into 2 cp equal chunks (Megatron-Core's balance)."""
    check_stage_layers(c, s)
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
        if not 0 < value <= MAX_TOKENS:
            raise UserError(f"--tokens {tokens} must be positive and at most {MAX_TOKENS:g} (GPT-4's estimate is 1.3e13), "
                            f"or 'chinchilla'")
        return value, "given (--tokens)"
    if target.train_tokens <= 0:
        raise UserError("this target has no token count: give --tokens N (or --tokens chinchilla), or target.train_tokens")
    return target.train_tokens, "the target's config (target.train_tokens)"


def scenario_rates(s: Scenario, flash_kernel: str | None = None) -> T.Rates:
    """The GPU's cited rates, or (--hardware) what was measured on it."""
    rates = T.gpu_rates(s.gpu, s.dtype, flash_kernel or setting(s, "flash_kernel"), internode_gbs=setting(s, "internode_gbs"))
    if not s.hardware:
        return rates
    return T.measured_rates(s.hardware[0], rates, s.hardware[1], gemms_only=T.stands_for(s.hardware[0], s.gpu.name) == "gemms")
