"""Counted FLOPs and measured memory of real training steps, beside the analytic formulas.

FLOPs: PyTorch's FlopCounterMode over one forward and one backward pass of the real model. The
counter counts matmuls only (not softmax, norms, element-wise ops or the embedding lookup) and
attention over the full T x T square, causal or not. Attention runs through SDPA's math backend
while counting, so QK^T and AV are plain matmuls the counter sees on every device (on CPU the
fused kernel has no FLOP formula in torch's counter and would count as zero) and the
backward is 2x the forward with no recompute, the model-FLOPs convention. On the meta device
nothing is allocated, so a GPT-3 175B step is counted in seconds on a laptop.

Memory: PyTorch's MemTracker (through minigpt.torch_private) over real steps, by category;
with fake tensors, the same for models far larger than the machine.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field

import torch

from minigpt.analytic import flops as F, memory as M
from minigpt.core.blocks import Inventory, inventory
from minigpt.core.config import ModelConfig, TrainConfig
from minigpt.core.device import check_fits
from minigpt.core.errors import UserError
from minigpt.core.hardware import Peak, choose_peak
from minigpt.measure.bench import bench_hardware
from minigpt.nn.model import GPT
from minigpt.nn.optim import autocast_context, make_optimizer
from minigpt.nn.torch_private import MemoryTracker, fake_mode, flop_counter, math_attention
from minigpt.parallel.parallelize import apply_activation_checkpointing

COUNTER_CONVENTION = (
    "PyTorch FlopCounterMode: matmul FLOPs only (2 per multiply-add); attention QK^T and AV over "
    "the full TxT square via SDPA's math backend; softmax, norms, element-wise ops and the "
    "embedding lookup not counted; backward = 2x forward (no recompute)"
)
COMPONENTS = ("qkv_proj", "attn_scores", "attn_values", "attn_out_proj", "mlp", "router", "lm_head")


@dataclass
class FlopCount:
    batch_size: int
    seq_len: int
    device: str
    forward: int
    backward: int
    components: dict[str, int] = field(default_factory=dict)  # forward FLOPs by component
    components_train: dict[str, int] = field(default_factory=dict)  # forward + backward by component

    @property
    def total(self) -> int:
        return self.forward + self.backward

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def per_token(self) -> float:
        return self.total / self.tokens


def _check_shape(c: ModelConfig, batch_size: int, seq_len: int) -> None:
    if seq_len > c.block_size:
        raise UserError(f"sequence length {seq_len} exceeds model.block_size = {c.block_size}; use --seq-len <= {c.block_size}")
    if batch_size <= 0 or seq_len <= 0:
        raise UserError(f"batch size {batch_size} and sequence length {seq_len} must be positive")


WRAPPERS = ("_checkpoint_wrapped_module", "_orig_mod")  # what activation checkpointing and compile insert


def _classify(inv: Inventory, module_path: str) -> str | None:
    """The component a counted module's FLOPs are booked under: its inventory part's (core/blocks.py), for
    the parts that own a matmul; None for every other module. The counter's paths start at the model's
    class name (`GPT.blocks.0.attn.c_attn`)."""
    bits = [b for b in module_path.split(".")[1:] if b not in WRAPPERS]
    part = inv.find(".".join(bits)) if bits else None
    return part.component if part is not None and part.is_matmul else None


def _components(inv: Inventory, counts: dict[str, dict]) -> dict[str, int]:
    """FLOPs by component from FlopCounterMode's per-module counts.

    Only the modules _classify books and the attention modules are read: in backward the
    counter also books FLOPs under the dropout modules (a quirk of its module tracker, whose
    backward scopes open there), but the counts of the matmul-owning modules and their parents are
    exact, forward and backward (without activation checkpointing); a test checks they add up to
    the total.
    """
    components = dict.fromkeys(COMPONENTS, 0)
    projections = [p.leaf for p in inv.layer if p.is_matmul and p.name.startswith("attn.")]
    for path, ops in counts.items():
        kind = _classify(inv, path)
        if kind:
            components[kind] += sum(ops.values())
        elif path.endswith(".attn"):
            # what the attention module does beyond its projections (the `attn.core` part): QK^T and AV,
            # equal halves
            inner = sum(ops.values()) - sum(
                sum(counts.get(f"{path}.{child}", {}).values()) for child in projections
            )
            components["attn_scores"] += inner // 2
            components["attn_values"] += inner - inner // 2
    return components


def count_train_flops(c: ModelConfig, batch_size: int, seq_len: int, device: str = "meta",
                      recompute: bool = False) -> FlopCount:
    """Count one forward + backward of the real model (weights and inputs on `device`).

    The loss is computed from the full logits outside the model (the textbook path), so the
    forward/backward split and the LM head's share are those of the formulas; training's fused
    LM-head cross-entropy executes the same three matmuls, the head's backward ones during its
    forward. One counter spans both passes (its module tracker needs the forward to attribute the backward);
    the forward figures are read before backward starts.
    """
    _check_shape(c, batch_size, seq_len)
    dev = torch.device(device)
    need = M.training_bytes_estimate(c, batch_size, seq_len, "fp32") + 8 * batch_size * seq_len * c.padded_vocab_size
    check_fits(need, dev, f"counting on {dev} (batch {batch_size} x {seq_len} tokens, full logits)",
               "use --device meta (nothing allocated), or a smaller --batch-size/--seq-len")
    with dev:
        model = GPT(c)
    if recompute:
        apply_activation_checkpointing(model)
    model.train()
    inv = inventory(c)
    x = torch.randint(0, c.vocab_size, (batch_size, seq_len), device=dev) if dev.type != "meta" else \
        torch.zeros(batch_size, seq_len, dtype=torch.long, device=dev)
    with math_attention():
        counter = flop_counter()
        with counter:
            # the textbook loss path (full logits, then cross-entropy), so that the LM head's
            # backward is counted in the backward pass; training's fused head runs the same matmuls
            logits = model(x).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), x.reshape(-1))
            forward = counter.get_total_flops()
            components = _components(inv, counter.get_flop_counts())
            loss.backward()
    total = counter.get_total_flops()
    train = _components(inv, counter.get_flop_counts())
    if sum(train.values()) != total:
        # with activation checkpointing the tracker books part of the recomputed forward twice;
        # a breakdown that does not add up is not reported
        train = {}
    return FlopCount(batch_size, seq_len, str(dev), forward, total - forward, components, train)


def flops_report(c: ModelConfig, batch_size: int, seq_len: int, device: str = "meta") -> dict:
    """Counted training FLOPs per token beside every analytic convention, with ratios."""
    counted = count_train_flops(c, batch_size, seq_len, device)
    p = F.param_counts(c)
    formulas = F.all_train_flops_per_token(c, seq_len)
    return {
        "params_total": p.total,
        "params_non_embedding": p.non_embedding,
        "params_matmul": p.matmul,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "tokens_per_step": counted.tokens,
        "device": counted.device,
        "counted_train_flops_per_step": counted.total,
        "counted_train_flops_per_token": counted.per_token,
        "counted_forward_flops_per_token": counted.forward / counted.tokens,
        "backward_to_forward": counted.backward / counted.forward,
        "components_forward_flops_per_token": {k: v / counted.tokens for k, v in counted.components.items()},
        "components_train_flops_per_token": {k: v / counted.tokens for k, v in counted.components_train.items()},
        "counter_convention": COUNTER_CONVENTION,
        "formulas": {k: formulas[k] for k in F.CONVENTIONS},
        "ratios_to_counted": {k: formulas[k] / counted.per_token for k in F.CONVENTIONS},
        "exact": {k: formulas[k] for k in F.EXACT_CONVENTIONS + ("megatron_72_causal",)},
        "exact_ratio_to_counted": formulas["exact"] / counted.per_token,
    }


# ----------------------------------------------------------------------------------------------
# memory


def measure_training_memory(c: ModelConfig, batch_size: int, seq_len: int, precision: str = "fp32",
                            device: str = "cpu", fake: bool = False, recompute: bool = False,
                            train_cfg: TrainConfig | None = None) -> dict:
    """Bytes by category over two real training steps (the second, with optimizer state, counts).

    Snapshots: after the forward pass (activations: what backward will need), after backward
    (gradients), after the optimizer step (optimizer state); plus the peak of the whole step.
    With fake=True tensors have shapes and no storage: nothing is computed or allocated.
    """
    _check_shape(c, batch_size, seq_len)
    dev = torch.device(device)
    if not fake:
        check_fits(M.training_bytes_estimate(c, batch_size, seq_len, precision), dev,
                   f"measuring a training step on {dev} (batch {batch_size} x {seq_len} tokens)",
                   "use --fake (fake tensors: any size, nothing allocated), or a smaller --batch-size")
    ctx = fake_mode() if fake else contextlib.nullcontext()
    with ctx:
        with dev:
            model = GPT(c)
        if recompute:
            apply_activation_checkpointing(model)
        optimizer = make_optimizer(model, train_cfg or TrainConfig())
        x = torch.randint(0, c.vocab_size, (batch_size, seq_len), device=dev)
        tracker = MemoryTracker(model, optimizer, x)
        snaps = {}
        for it in range(2):
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            with tracker.track():
                with autocast_context(dev, precision):
                    loss = model(x, x).loss
                snaps["forward"] = tracker.current()
                loss.backward()
                del loss
                snaps["backward"] = tracker.current()
                optimizer.step()
                snaps["step"] = tracker.current()
                optimizer.zero_grad(set_to_none=True)
            if it == 0:
                tracker.reset()
    measured = {
        "parameters": snaps["step"].get("parameters", 0),
        "gradients": snaps["backward"].get("gradients", 0),
        "optimizer_state": snaps["step"].get("optimizer_state", 0),
        "activations": snaps["forward"].get("activations", 0),
        "peak_total": tracker.peak().get("total", 0),
        "peak_temporaries": tracker.peak().get("temporaries", 0),
    }
    if dev.type == "cuda" and not fake:
        measured["cuda_peak_allocated"] = torch.cuda.max_memory_allocated(dev)
        measured["cuda_peak_reserved"] = torch.cuda.max_memory_reserved(dev)
    return {"measured": measured, "param_tensors": sum(1 for _ in model.parameters())}


def memory_report(c: ModelConfig, batch_size: int, seq_len: int, precision: str = "fp32", device: str = "cpu",
                  fake: bool = False, dp: int = 1, recompute: bool = False) -> dict:
    """Measured memory by category beside the prediction, the ZeRO table, and the KV cache."""
    scaled_from = None
    if fake and c.n_layer > 4:
        # Deep models under fake tensors: every layer holds the same bytes, so measure 1 and 2
        # layers and extend linearly (minutes saved for GPT-3 175B; exact for identical layers)
        one = measure_training_memory(dataclasses.replace(c, n_layer=1), batch_size, seq_len, precision, device,
                                      fake, recompute)
        two = measure_training_memory(dataclasses.replace(c, n_layer=2), batch_size, seq_len, precision, device,
                                      fake, recompute)
        measured = {k: one["measured"][k] + (c.n_layer - 1) * (two["measured"][k] - one["measured"][k])
                    for k in one["measured"]}
        tensors = one["param_tensors"] + (c.n_layer - 1) * (two["param_tensors"] - one["param_tensors"])
        result = {"measured": measured, "param_tensors": tensors}
        scaled_from = "measured with 1 and 2 layers under fake tensors, extended linearly to n_layer"
    else:
        result = measure_training_memory(c, batch_size, seq_len, precision, device, fake, recompute)
    measured = result["measured"]
    predicted = M.predicted_training_memory(c, batch_size, seq_len, precision, recompute)
    # AdamW keeps a 4-byte step counter per parameter tensor beside m and v
    predicted["optimizer_state"] += 4 * result["param_tensors"]
    psi = F.param_counts(c).total
    return {
        "params_total": psi,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "precision": precision,
        "device": device,
        "fake_tensors": fake,
        "scaled_from": scaled_from,
        "layout": "torch autocast (fp32 params, grads, Adam m and v; 16-bit copies are activations)"
        if precision != "fp32" else "fp32 (params, grads, Adam m and v)",
        "predicted": predicted,
        "measured": measured,
        "ratios": {k: (measured[k] / predicted[k] if predicted[k] else None) for k in predicted},
        "activations_weight_copies": M.weight_copy_bytes(c, precision),
        "korthikanti_activations_16bit": M.korthikanti_activation_bytes_per_layer(c, batch_size, seq_len, flash=True) * c.n_layer,
        "dp": dp,
        "zero_precision": precision,
        "zero": M.zero_table(psi, precision, dp),
        "kv_cache_bytes_per_token": M.kv_cache_bytes_per_token(c, 2 if precision != "fp32" else 4),
    }


# ----------------------------------------------------------------------------------------------
# timed layers at full width (the efficiency input of extrapolation)


def time_layers(c: ModelConfig, num_layers: int, micro_batch: int, seq_len: int, precision: str = "bf16",
                device: str = "auto", steps: int = 3) -> dict:
    """Time forward + backward of `num_layers` transformer blocks at the model's real width.

    No embeddings, LM head or optimizer: the blocks are where the FLOPs of a large model are.
    FLOPs are counted (meta device, same blocks); achieved FLOP/s = counted FLOPs / median time.
    Communication between GPUs is not in this figure.
    """
    from minigpt.core.device import resolve_device
    from minigpt.nn.model import Block

    if num_layers < 1:
        raise UserError(f"--measure-layers {num_layers} must be at least 1")
    _check_shape(c, micro_batch, seq_len)
    dev = resolve_device(device)

    def build(d):
        with torch.device(d):
            return torch.nn.ModuleList(Block(c, i) for i in range(num_layers))

    def run(blocks, x):
        for b in blocks:
            x, _ = b(x)
        x.float().pow(2).mean().backward()

    meta_blocks = build("meta")
    counter = flop_counter()
    with math_attention(), counter:
        run(meta_blocks, torch.zeros(micro_batch, seq_len, c.n_embd, device="meta", requires_grad=True))
    flops_step = counter.get_total_flops()

    blocks = build(dev)
    x = torch.randn(micro_batch, seq_len, c.n_embd, device=dev, requires_grad=True)
    step_s = _median_step_s(lambda: run(blocks, x), blocks, dev, precision, steps)
    return {
        "num_layers": num_layers,
        "micro_batch": micro_batch,
        "seq_len": seq_len,
        "precision": precision,
        "device": str(dev),
        "params_per_layer": sum(p.numel() for p in blocks[0].parameters()),
        "flops_per_step": flops_step,
        "step_s": step_s,
        "achieved_tflops": flops_step / step_s / 1e12,
        "convention": "counted matmul FLOPs of forward + backward of the blocks (full attention square); "
                      "median of timed steps after one warm-up; no communication",
    }


def _median_step_s(step, blocks, dev: torch.device, precision: str, steps: int) -> float:
    """Median seconds of `step` under autocast over `steps` runs after one warm-up, synchronised on CUDA."""
    import statistics
    import time

    times = []
    for i in range(steps + 1):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        with autocast_context(dev, precision):
            step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if i:
            times.append(time.perf_counter() - t0)
        for b in blocks:
            b.zero_grad(set_to_none=True)
    return statistics.median(times)


def measured_mfu(c: ModelConfig, num_layers: int, micro_batch: int, precision: str, device: str) -> tuple[float, str, dict]:
    """The MFU of `num_layers` full-width blocks timed here (time_layers) against this device's
    datasheet peak, or its measured matmul peak when it has no datasheet: (mfu, source, timing)."""
    t = time_layers(c, num_layers, micro_batch, c.block_size, precision, device)
    hw = bench_hardware(t["device"], dtypes=[precision])
    peak = choose_peak(hw["device_name"], precision)
    if not peak.known:  # no datasheet for this device: its measured matmul peak
        peak = Peak(hw["matmul_tflops"][precision], f"measured {precision} matmul peak of {hw['device_name']}")
    source = (f"measured: {num_layers} layer(s) at full width ({t['params_per_layer']:,} params each), "
              f"seq {t['seq_len']}, micro-batch {t['micro_batch']}, {precision} on {hw['device_name']}: "
              f"{t['achieved_tflops']:.4g} TFLOP/s / {peak.tflops:.4g} ({peak.source}); no communication")
    return min(t["achieved_tflops"] / peak.tflops, 1.0), source, t
