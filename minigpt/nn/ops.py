"""Kernels the model calls: the fused, chunked LM-head cross-entropy."""

from __future__ import annotations

from contextlib import nullcontext

import torch


def activation_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls produce from x: the autocast dtype under mixed precision, else x's own."""
    device = x.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def _chunk_rows(vocab: int, device: torch.device) -> int:
    """Rows per chunk: about 8 MiB of fp32 logits on a CPU, 1 GiB on a GPU.

    On the 2-core reference CPU (vocab 2,048) 1,024-row chunks ran the head ~8% faster than 512 or
    2,048: narrower chunks run the K = n_embd matmuls less efficiently, wider ones leave the cache.
    """
    budget = (1 << 30) if device.type == "cuda" else (8 << 20)
    return max(64, budget // (4 * vocab) // 64 * 64)


def _log_sum_exp(logits: torch.Tensor, target: torch.Tensor, softmax: bool):
    """(log-sum-exp (c,), the targets' logits (c,), softmax in place of `logits` or None).

    Eager computes each exp once (max, exp in place, sum); under torch.compile, torch.logsumexp
    and a second exp fuse into fewer, faster kernels than that form does.
    """
    target_logit = logits.gather(1, target.unsqueeze(1)).squeeze(1)
    if torch.compiler.is_compiling():
        lse = torch.logsumexp(logits, dim=-1)
        return lse, target_logit, logits.sub_(lse.unsqueeze(1)).exp_() if softmax else None
    top = logits.amax(dim=-1, keepdim=True)
    e = logits.sub_(top).exp_()
    total = e.sum(dim=-1, keepdim=True)
    return (top + total.log()).squeeze(1), target_logit, e.div_(total) if softmax else None


class _LinearCrossEntropy(torch.autograd.Function):
    """mean CE(h @ W^T, y) computed chunk by chunk of rows, with its gradients computed in forward.

    Per chunk: logits (fp32), log-sum-exp, the loss, then softmax - onehot -> d_h = g W and
    d_W += g^T h. Backward only scales the stored d_h and d_W by the incoming gradient. This is
    the fused linear cross-entropy of Liger Kernel (Hsu et al. 2024): the full logits tensor is
    never held, the matmuls are the usual three. Padded vocabulary columns are masked out of the
    softmax; targets < 0 are ignored. Under autocast the matmuls run in the autocast dtype, the
    softmax in fp32.
    """

    @staticmethod
    def forward(ctx, h, W, y, vocab: int):
        device = h.device.type
        dtype = activation_dtype(W)  # the autocast dtype under mixed precision, else the weights' own
        grads = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        valid = (y >= 0).to(torch.float32)
        target = y.clamp(min=0)
        chunk = _chunk_rows(W.size(0), h.device)
        dh = torch.empty_like(h) if grads else None
        dW = torch.zeros(W.shape, device=W.device, dtype=torch.float32) if grads else None
        loss = torch.zeros((), device=h.device, dtype=torch.float32)
        with torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else nullcontext():
            Wc = W.to(dtype)
            buf = torch.empty(min(chunk, h.size(0)), W.size(0), device=h.device, dtype=dtype)  # reused by every chunk
            for s in range(0, h.size(0), chunk):
                hc, yc, vc = h[s:s + chunk].to(dtype), target[s:s + chunk], valid[s:s + chunk]
                logits = torch.mm(hc, Wc.t(), out=buf[:hc.size(0)]).float()  # (c, Vp)
                if vocab < logits.size(1):
                    logits[:, vocab:] = float("-inf")
                lse, target_logit, probs = _log_sum_exp(logits, yc, grads)
                loss += ((lse - target_logit) * vc).sum()
                if grads:
                    probs[torch.arange(probs.size(0), device=probs.device), yc] -= 1.0
                    g = probs.mul_(vc.unsqueeze(1)).to(dtype)
                    if dh.dtype == dtype:
                        torch.mm(g, Wc, out=dh[s:s + chunk])
                    else:
                        dh[s:s + chunk] = g @ Wc
                    if dtype == torch.float32:
                        dW.addmm_(g.t(), hc)
                    else:
                        dW += (g.t() @ hc).float()
        count = valid.sum().clamp(min=1.0)
        if grads:
            ctx.save_for_backward(dh, dW, count)
            ctx.w_dtype = W.dtype
        return loss / count

    @staticmethod
    def backward(ctx, grad_out):
        dh, dW, count = ctx.saved_tensors
        scale = grad_out / count
        return dh * scale.to(dh.dtype), (dW * scale).to(ctx.w_dtype), None, None


def linear_cross_entropy(h: torch.Tensor, W: torch.Tensor, targets: torch.Tensor, vocab: int) -> torch.Tensor:
    """Mean cross-entropy of the logits h @ W^T (first `vocab` columns) against targets (-1 ignored)."""
    if h.device.type == "cpu" and _EAGER_HEAD is not None:
        return _EAGER_HEAD(h, W, targets, vocab)
    return _LinearCrossEntropy.apply(h, W, targets, vocab)


def _head(h, W, targets, vocab: int) -> torch.Tensor:
    return _LinearCrossEntropy.apply(h, W, targets, vocab)


_EAGER_HEAD = None  # _head under torch.compiler.disable, once compile_ready() has run


def compile_ready() -> None:
    """Call before torch.compile traces a model: on a CPU the head then runs eagerly inside the compiled
    model (one graph break at the head): on the 2-core reference CPU the tiny model's head took 42 ms
    eager against 48-52 ms compiled (forward + backward, 4,096 tokens, vocab 2,048; inductor's softmax
    kernels were slower here than ATen's in-place exp). On a GPU it compiles with the rest. Not done at
    import: torch.compiler.disable imports torch._dynamo, about 1 s of every process's start-up."""
    global _EAGER_HEAD
    if _EAGER_HEAD is None:
        _EAGER_HEAD = torch.compiler.disable(_head)
