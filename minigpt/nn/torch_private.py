"""The one module that touches private PyTorch APIs, so a torch upgrade breaks one file.

- `torch.distributed._tools.mem_tracker.MemTracker`: per-category tensor memory (parameters,
  gradients, optimizer state, activations, temporaries). Works on CPU, CUDA and under fake tensors.
- `torch._subclasses.fake_tensor.FakeTensorMode`: tensors with shapes and no storage, to run a
  model far too big for the machine.
- `torch.utils.flop_counter`'s SDPA formulas, to give the CPU flash-attention kernel (which has
  none, so it would count as zero) the formula of the CUDA kernels; a formula for `aten._grouped_mm` too.
- `torch._dynamo.mark_static_address`: a KV cache that CUDA graphs may replay over in place.
- `torch._dynamo.config.capture_dynamic_output_shape_ops`: the MoE dispatch compiles as one graph.
- `torch.testing._internal.distributed.fake_pg.FakeStore`: a fake process group of N ranks, with
  `FSDPMemTracker` (torch.distributed._tools) and a `TorchDispatchMode` that sees every collective:
  `minigpt simulate`; another that counts the bytes each op moves (the eager byte count's test).
- `distributed_c10d._get_default_store`: torchrun's store, for heartbeats and naming a silent rank.
- `rendezvous._create_c10d_store`: torch's env:// store, scoped per torchrun restart (`attempt_store`).
- `torch.optim._muon`'s Newton-Schulz iteration and learning-rate adjustment: Muon on sharded (DTensor)
  matrices (nn/optim.ShardedMuon) computes exactly what torch.optim.Muon computes on whole ones.
- `DistributedDataParallel._set_params_and_buffers_to_ignore_for_model`: DDP leaves expert parallelism's experts
  (different on each rank) to the expert backend's own reduction (`ddp_ignore`).
- `torch.ops.mkldnn._reorder_linear_weight` / `_linear_pointwise`: a Linear whose weight oneDNN has packed once for
  inference on a CPU, dense tensors in and out (`prepack_linears`; serving: a decode step's matmuls run ~2x faster).
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten

# MemTracker's reference types, by the names minigpt reports
MEM_CATEGORIES = {
    "PARAM": "parameters",
    "GRAD": "gradients",
    "OPT": "optimizer_state",
    "ACT": "activations",
    "TEMP": "temporaries",
    "BUFFER": "buffers",
    "OTH": "other",
}


def _cpu_flash_forward(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _grouped_mm(a_shape, b_shape, *args, **kwargs) -> int:
    """aten._grouped_mm: 2 x (rows, inner, cols) summed over the groups. (M, K) x (E, K, N), rows jagged: 2 M K N;
    (K, M) x (M, N), the inner dimension jagged (a weight's gradient): 2 K M N; (E, M, K) x (E, K, N): 2 E M K N."""
    if len(a_shape) == 3 and len(b_shape) == 3:
        return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]
    return 2 * a_shape[0] * a_shape[1] * b_shape[-1]


def flop_counter() -> FlopCounterMode:
    """FlopCounterMode that also counts the CPU flash-attention kernels and the experts' grouped matrix multiplies:
    torch 2.13 has no FLOP formula for aten._scaled_dot_product_flash_attention_for_cpu (and its backward) or for
    aten._grouped_mm, which would count as zero."""
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_flash_forward
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_flash_backward
    if hasattr(aten, "_grouped_mm"):
        mapping[aten._grouped_mm] = _grouped_mm
    return FlopCounterMode(display=False, custom_mapping=mapping)


def math_attention():
    """Route SDPA through its reference (math) implementation: plain matmuls, no recompute."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def mark_static_address(t: torch.Tensor) -> None:
    """Tell torch.compile a tensor keeps its address (a KV cache written in place), so CUDA graphs
    can replay over it instead of copying it in (gpt-fast keeps its caches as buffers for this)."""
    import torch._dynamo

    torch._dynamo.mark_static_address(t)


def capture_data_dependent_shapes() -> None:
    """Let torch.compile trace operators whose output shape depends on data (`nonzero` in the MoE
    dispatch) into the graph, with unbacked symbolic sizes, instead of breaking the graph there.
    Process-wide (torch._dynamo.config.capture_dynamic_output_shape_ops)."""
    import torch._dynamo

    torch._dynamo.config.capture_dynamic_output_shape_ops = True


def default_store():
    """The key-value store of the default process group (torchrun's rendezvous TCPStore)."""
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()


def attempt_store(rank: int, world_size: int, timeout) -> object | None:
    """Under a torchrun restart (--max-restarts), the rendezvous store torchrun shares with its
    workers keeps the keys of the failed attempt, so a restarted rank can read a dead peer's
    address and fail to connect (pytorch/pytorch#135712). This is torch's own env:// store,
    scoped to the attempt with a PrefixStore. None outside torchrun."""
    if "TORCHELASTIC_RESTART_COUNT" not in os.environ or "MASTER_ADDR" not in os.environ:
        return None
    import torch.distributed as dist
    from torch.distributed.rendezvous import _create_c10d_store

    store = _create_c10d_store(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), rank, world_size, timeout)
    return dist.PrefixStore(f"minigpt/attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}/", store)


def flatten_mesh(mesh, dims: tuple[str, ...], name: str):
    """One mesh dimension made of several of `mesh`'s (DeviceMesh._flatten), the flattened mesh itself kept (not
    sliced from the root again): a group that spans them, on the same root as the others (FSDP2 with tensor
    parallelism needs one root)."""
    return mesh[dims]._flatten(name)


def fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode()


class MemoryTracker:
    """Per-category memory of whatever runs inside `track()`, through PyTorch's MemTracker."""

    def __init__(self, *externals) -> None:
        from torch.distributed._tools.mem_tracker import MemTracker

        self._mt = MemTracker()
        self._mt.track_external(*externals)

    @contextlib.contextmanager
    def track(self):
        with self._mt:
            yield self

    def current(self) -> dict[str, int]:
        return self._snapshot("current")

    def peak(self) -> dict[str, int]:
        return self._snapshot("peak")

    def reset(self) -> None:
        self._mt.reset_mod_stats()

    def _snapshot(self, kind: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for _device, snap in self._mt.get_tracker_snapshot(kind).items():
            for key, value in snap.items():
                name = MEM_CATEGORIES.get(getattr(key, "name", str(key)), "total")
                out[name] = out.get(name, 0) + int(value)
        return out


# ----------------------------------------------------------------------------------------------
# simulated ranks: a fake process group, and the collectives a step issues


@contextlib.contextmanager
def fake_process_group(world_size: int):
    """A process group of `world_size` ranks that moves no data (torch's testing FakeStore and
    backend "fake"): the real FSDP2/DTensor code runs on this one process as rank 0 of N."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a process group is already initialised; simulate in a process of its own")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def fsdp_memory_tracker(model, optimizer):
    """torch's FSDPMemTracker: memory by category (sharded/unsharded params and grads, all-gather
    and reduce-scatter buffers, activations, optimizer state) of an FSDP2 model."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    return FSDPMemTracker(model, optimizer)


COLLECTIVE_KINDS = (("all_gather", "all_gather"), ("allgather", "all_gather"), ("reduce_scatter", "reduce_scatter"),
                    ("all_reduce", "all_reduce"), ("allreduce", "all_reduce"), ("broadcast", "broadcast"),
                    ("all_to_all", "all_to_all"), ("alltoall", "all_to_all"))


def _group_of(args, kwargs):
    """The process group a c10d op runs on (a boxed ProcessGroup, or a functional op's group name)."""
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _resolve_process_group

    for a in list(args) + list((kwargs or {}).values()):
        if isinstance(a, torch.ScriptObject):
            return dist.ProcessGroup.unbox(a)
        if isinstance(a, str) and a not in ("sum", "avg", "max", "min", "product", "premul_sum"):
            return _resolve_process_group(a)  # a functional collective's group name (after its reduce op)
    return None


def _tensors(x) -> list:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _tensors(item)]
    return []


def collective_counter():
    """A dispatch mode that records every collective op: (kind, group size, group name, bytes of
    the whole tensor moved: an all-gather's output, a reduce-scatter's input, an all-reduce's buffer)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CollectiveCounter(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.records: list[tuple[str, int, str, int]] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace in ("c10d", "_c10d_functional"):
                self._record(func.__name__, args, kwargs, functional=func.namespace == "_c10d_functional")
            return func(*args, **(kwargs or {}))

        def _record(self, name, args, kwargs, functional=False):
            kind = next((k for key, k in COLLECTIVE_KINDS if key in name), None)
            group = _group_of(args, kwargs)
            if kind is None or group is None:
                return  # wait_tensor, barriers
            sizes = [t.numel() * t.element_size() for t in _tensors(args)]
            # a gather's whole output (the input is one of its pieces), or all of an all-reduce's buffers
            whole = max(max(sizes), sum(sizes) - min(sizes)) if kind in ("all_gather", "reduce_scatter") else sum(sizes)
            if functional and kind == "all_gather":  # a functional all-gather names only its input: one piece
                whole = sizes[0] * group.size()
            self.records.append((kind, group.size(), getattr(group, "group_desc", ""), whole))

    return CollectiveCounter()


def op_byte_counter(skip: frozenset[str]):
    """A dispatch mode that sums, per aten op (its overload packet's name, those in `skip` left out), the bytes
    of the tensors each call reads and writes: every tensor argument and result, numel x element size."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class OpByteCounter(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.bytes: dict[str, int] = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if name not in skip:
                moved = sum(t.numel() * t.element_size() for t in tree_flatten((args, kwargs, out))[0]
                            if isinstance(t, torch.Tensor))
                self.bytes[name] = self.bytes.get(name, 0) + moved
            return out

    return OpByteCounter()


def all_to_all_autograd(x, output_split_sizes: list[int], input_split_sizes: list[int], group):
    """torch's functional all-to-all with autograd (its backward is the reverse all-to-all): the public
    torch.distributed.nn.functional.all_to_all_single is deprecated in its favour."""
    from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor

    return wait_tensor(all_to_all_single_autograd(x, output_split_sizes, input_split_sizes, group))


# weight-only quantized matmuls (ATen's CPU kernels, the ones gpt-fast and torchao call on CPU)

def int8_weight_mm(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (N, K) bf16 @ int8 weight (M, K)^T, each output channel times its scale: (N, M) bf16."""
    return torch._weight_int8pack_mm(x, weight, scales)


def int4_pack(q: torch.Tensor, inner_k_tiles: int = 2) -> torch.Tensor:
    """int4 values (M, K) held in int32 -> the CPU kernel's packed layout."""
    return aten._convert_weight_to_int4pack_for_cpu(q, inner_k_tiles)


def int4_weight_mm(x: torch.Tensor, packed: torch.Tensor, group: int, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """x (N, K) bf16 @ the packed int4 weight, per-group scale and zero: (N, M) bf16."""
    return aten._weight_int4pack_mm_for_cpu(x, packed, group, scales_and_zeros)



PACK_BATCH_HINT = 16  # the batch oneDNN lays the weight out for: any hint from 8 to 256 ran as fast at 1-256 rows
# (2-core AMD EPYC, one thread, 384 x 1536: 37 us at 1 row, 88 at 16, 1.1 ms at 256; torch's dense kernel 35, 225, 2.7 ms)


def pack_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """A (out, in) fp32 weight reordered once into oneDNN's blocked layout (what inductor's CPU freezing does)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_BATCH_HINT)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: torch.Tensor | None) -> torch.Tensor:
    """F.linear, through the weight's oneDNN-packed copy (`pack_linear_weight`; dense in, dense out, no layout
    conversion) when there is one and autograd is off. Even one row gains once the weights come from memory rather
    than cache (a serving step of the 6 x 384 model at batch 1: 3.2-3.4 ms packed, 4.2 ms dense)."""
    if packed is None or torch.is_grad_enabled() or x.numel() == 0:
        return torch.nn.functional.linear(x, weight, bias)
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.size(-1)), packed, bias, "none", [], "")
    return y.view(*x.shape[:-1], weight.size(0))


class PackedLinear(torch.nn.Linear):
    """A Linear that also holds its weight packed once by oneDNN and uses it when autograd is off. Same parameters,
    same state_dict. The packed copy is made once: weights changed afterwards are not seen by it (a server's model
    does not change)."""

    def __init__(self, dense: torch.nn.Linear) -> None:
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = dense.in_features, dense.out_features
        self.weight, self.bias = dense.weight, dense.bias
        object.__setattr__(self, "_packed", pack_linear_weight(dense.weight))  # not a parameter nor a buffer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self._packed)


def prepack_linears(model: torch.nn.Module) -> int:
    """Inference on a CPU: every plain fp32 nn.Linear inside the model's blocks becomes a PackedLinear (its weight
    also packed once into oneDNN's layout: the blocks' weights take twice the memory), and the LM head gets a packed
    copy of its (often tied) weight. Returns how many were packed; 0 where oneDNN is not built in."""
    if not torch.backends.mkldnn.is_available():
        return 0
    packed = 0
    for parent in list(model.blocks.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear and child.weight.dtype == torch.float32 and child.weight.device.type == "cpu":
                setattr(parent, name, PackedLinear(child))
                packed += 1
    head = getattr(model, "lm_head", None)  # an LMHead reads `packed`; a quantized head stays as it is
    if "packed" in vars(type(head)) and head.weight.dtype == torch.float32 and head.weight.device.type == "cpu":
        object.__setattr__(head, "packed", pack_linear_weight(head.weight))
        packed += 1
    return packed


def muon_orthogonalize(update: torch.Tensor, ns_coefficients, ns_steps: int, eps: float) -> torch.Tensor:
    """torch.optim.Muon's Newton-Schulz orthogonalisation of a whole 2-D update."""
    from torch.optim._muon import _zeropower_via_newtonschulz

    return _zeropower_via_newtonschulz(update, ns_coefficients, ns_steps, eps)


def muon_adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """torch.optim.Muon's learning rate for a matrix of this (whole) shape."""
    from torch.optim._muon import _adjust_lr

    return _adjust_lr(lr, adjust_lr_fn, shape)


def ddp_ignore(module: torch.nn.Module, names: list[str]) -> None:
    """DistributedDataParallel leaves these parameters out of its gradient all-reduce (and its check that every
    rank holds the same ones): expert parallelism's experts, different on each rank of an ep group, whose
    gradients the expert backend reduces over its own group."""
    from torch.nn.parallel import DistributedDataParallel

    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, names)
