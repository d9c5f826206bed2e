"""Linear + cross-entropy without materialising the ``(N, V)`` logits (Liger-Kernel's fused linear CE).

The rows whose label is ``ignore_index`` are dropped first, so prompt and image tokens cost nothing. The
supervised rows are then processed in chunks: one GEMM gives the chunk's logits in the activation dtype (as
``lm_head`` does in Hugging Face), and a Triton kernel reads them in fp32, applies Gemma's final-logit
soft-capping ``softcap * tanh(z / softcap)`` when asked, computes logsumexp and the loss, and overwrites the
logits in place with the gradient ``(softmax - onehot) * dcap/dz / n``. Two more GEMMs turn that into the
chunk's hidden-state gradient and add its weight gradient (only when the weight requires grad). All of this
happens in the forward; backward only scales the stored gradients by ``grad_output``. Peak extra memory is
one chunk of logits, plus the weight-sized gradient when ``lm_head`` is trained.

Numerics against Hugging Face: logits are rounded to the activation dtype by the GEMM exactly as
``lm_head(hidden)`` is and the loss is computed in fp32, as ``ForCausalLMLoss`` does after its upcast. The
soft-capping runs in fp32 here, whereas the text-only ``Gemma3ForCausalLM`` / ``Gemma2ForCausalLM`` apply it to
bf16 logits before the upcast, so with a softcap the loss differs from Hugging Face's by that rounding (more
accurate here); ``Gemma3ForConditionalGeneration`` applies no soft-capping at all (transformers 5.17 and 5.23),
so ``patch.py`` passes none for it. The
weight gradient is accumulated across chunks in the weight's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vlmtune.kernels.launch import fast_launch
from vlmtune.kernels.ops import kernel_op

_MAX_BLOCK_V = 16384
# Logits elements per chunk when chunk_size is not given: 2^27 is 256 MiB in bf16.
_CHUNK_ELEMENTS = 2**27
_REDUCTIONS = ("mean", "sum")


@triton.jit
def _tanh(x):
    # tanh from exp of a non-positive argument: no overflow, and no libdevice (the CPU interpreter lacks it).
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


@fast_launch
@triton.jit
def _ce_chunk_kernel(
    logits_ptr,
    labels_ptr,
    loss_ptr,
    logits_out_ptr,
    stride_logits,
    stride_out,
    n_vocab,
    ignore_index,
    softcap,
    grad_scale,
    HAS_SOFTCAP: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    STORE_LOGITS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_logits
    label = tl.load(labels_ptr + row).to(tl.int64)
    supervised = label != ignore_index
    # Read the target logit before any program writes gradients over the row (the block reductions below
    # synchronise the warps, so every warp has read it before the second pass starts storing).
    target = tl.load(row_ptr + label, mask=supervised & (label >= 0) & (label < n_vocab), other=0.0)
    target = target.to(tl.float32)
    if HAS_SOFTCAP:
        target = softcap * _tanh(target / softcap)

    m = -float("inf")
    s = 0.0
    for start in range(0, n_vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < n_vocab
        z = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            z = softcap * _tanh(z / softcap)
        if STORE_LOGITS:
            out = logits_out_ptr + row * stride_out + cols
            tl.store(out, z.to(logits_out_ptr.dtype.element_ty), mask=mask)
        z = tl.where(mask, z, -float("inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    tl.store(loss_ptr + row, tl.where(supervised, lse - target, 0.0))

    if COMPUTE_GRAD:
        scale = tl.where(supervised, grad_scale, 0.0)
        for start in range(0, n_vocab, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < n_vocab
            x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                t = _tanh(x / softcap)
                z = softcap * t
            else:
                z = x
            g = tl.exp(z - lse) - tl.where(cols == label, 1.0, 0.0)
            if HAS_SOFTCAP:
                g = g * (1.0 - t * t)
            tl.store(row_ptr + cols, (g * scale).to(logits_ptr.dtype.element_ty), mask=mask)


def _default_chunk_size(n_vocab: int) -> int:
    rows = max(1, _CHUNK_ELEMENTS // n_vocab)
    return 1 << (rows.bit_length() - 1)  # a power of two, for GEMM tile efficiency


def _chunked_loss_and_grads(
    hidden,
    weight,
    labels,
    ignore_index,
    softcap,
    chunk_size,
    grad_scale,
    logits_out,
    compute_grad_h,
    compute_grad_w,
):
    """Loss per row (fp32), and the gradients of the grad_scale-weighted summed loss that are asked for."""
    n_rows, n_vocab = hidden.shape[0], weight.shape[0]
    grad_h = torch.empty_like(hidden) if compute_grad_h else None
    grad_w = torch.zeros_like(weight) if compute_grad_w else None
    loss_rows = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
    block_v = min(triton.next_power_of_2(n_vocab), _MAX_BLOCK_V)
    for start in range(0, n_rows, chunk_size):
        end = min(start + chunk_size, n_rows)
        h = hidden[start:end]
        logits = h @ weight.t()
        out = logits_out[start:end] if logits_out is not None else logits
        _ce_chunk_kernel[(end - start,)](
            logits,
            labels[start:end],
            loss_rows[start:end],
            out,
            logits.stride(0),
            out.stride(0),
            n_vocab,
            ignore_index,
            1.0 if softcap is None else float(softcap),
            grad_scale,
            HAS_SOFTCAP=softcap is not None,
            COMPUTE_GRAD=compute_grad_h or compute_grad_w,
            STORE_LOGITS=logits_out is not None,
            BLOCK_V=block_v,
            num_warps=16 if block_v >= 8192 else 4,
        )
        if compute_grad_h:
            torch.mm(logits, weight, out=grad_h[start:end])
        if compute_grad_w:
            grad_w.addmm_(logits.t(), h)
    return loss_rows, grad_h, grad_w


def _loss_and_grads(hidden, weight, labels, ignore_index, softcap, chunk_size, return_logits, reduction, needs):
    """``(loss, logits or None, grad_h or None, grad_w or None)``: the gradients of the loss that ``needs`` asks for
    (of ``hidden``, of ``weight``), computed on the way."""
    n_rows = hidden.shape[0]
    supervised = labels != ignore_index
    rows = None
    if return_logits:
        n_supervised = int(supervised.sum())
        h, y = hidden, labels
    else:
        rows = supervised.nonzero().squeeze(1)
        n_supervised = rows.numel()
        h, y = hidden[rows], labels[rows]
    # Zero supervised rows: loss 0 with zero gradients, where F.cross_entropy's mean would give nan.
    grad_scale = 1.0 / max(n_supervised, 1) if reduction == "mean" else 1.0
    logits_out = (
        torch.empty(n_rows, weight.shape[0], dtype=hidden.dtype, device=hidden.device) if return_logits else None
    )
    chunk = chunk_size or _default_chunk_size(weight.shape[0])
    loss_rows, grad_h, grad_w = _chunked_loss_and_grads(
        h, weight, y, ignore_index, softcap, chunk, grad_scale, logits_out, *needs
    )
    loss = loss_rows.sum() * grad_scale
    if grad_h is not None and rows is not None:
        grad_h = torch.zeros_like(hidden).index_copy_(0, rows, grad_h)
    return loss, logits_out, grad_h, grad_w


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, softcap, chunk_size, return_logits, reduction):
        loss, logits_out, grad_h, grad_w = _loss_and_grads(
            hidden,
            weight,
            labels,
            ignore_index,
            softcap,
            chunk_size,
            return_logits,
            reduction,
            ctx.needs_input_grad[:2],
        )
        ctx.save_for_backward(*(t for t in (grad_h, grad_w) if t is not None))
        ctx.has_grads = (grad_h is not None, grad_w is not None)
        if return_logits:
            ctx.mark_non_differentiable(logits_out)
            return loss, logits_out
        return loss

    @staticmethod
    def backward(ctx, grad_loss, *_):
        saved = list(ctx.saved_tensors)
        grad_h = saved.pop(0) * grad_loss if ctx.has_grads[0] else None
        grad_w = saved.pop(0) * grad_loss if ctx.has_grads[1] else None
        return grad_h, grad_w, None, None, None, None, None, None


# The same as custom ops, for torch.compile (vlmtune.kernels.ops). The forward computes the gradients, so it is told
# which ones (grad_hidden, grad_weight: whether hidden and the weight require grad); the logits output is an empty
# tensor unless return_logits; backward only scales the stored gradients.
def _op_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    softcap: float | None,
    chunk_size: int | None,
    return_logits: bool,
    reduction: str,
    grad_hidden: bool,
    grad_weight: bool,
) -> list[torch.Tensor]:
    loss, logits, grad_h, grad_w = _loss_and_grads(
        hidden, weight, labels, ignore_index, softcap, chunk_size, return_logits, reduction, (grad_hidden, grad_weight)
    )
    logits = hidden.new_empty(0) if logits is None else logits
    return [loss, logits, *(t for t in (grad_h, grad_w) if t is not None)]


def _op_forward_fake(
    hidden, weight, labels, ignore_index, softcap, chunk_size, return_logits, reduction, grad_hidden, grad_weight
):
    logits = hidden.new_empty((hidden.shape[0], weight.shape[0]) if return_logits else (0,))
    grads = [torch.empty_like(hidden)] if grad_hidden else []
    grads += [torch.empty_like(weight)] if grad_weight else []
    return [hidden.new_empty((), dtype=torch.float32), logits, *grads]


def _op_backward(grads: list[torch.Tensor], saved: list[torch.Tensor | None], needs: list[bool]) -> list[torch.Tensor]:
    # saved holds exactly the gradients the forward computed, which are those asked for now.
    return [g * grads[0] for g in saved]


def _op_backward_fake(grads, saved, needs):
    return [torch.empty_like(g) for g in saved]


FUSED_LINEAR_CE = kernel_op(
    "fused_linear_cross_entropy",
    forward=_op_forward,
    backward=_op_backward,
    forward_fake=_op_forward_fake,
    backward_fake=_op_backward_fake,
    outputs=2,
    differentiable=("hidden", "weight"),
    non_differentiable=(1,),
)


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    softcap: float | None = None,
    chunk_size: int | None = None,
    return_logits: bool = False,
    reduction: str = "mean",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of ``hidden @ lm_head_weight.T`` against ``labels``, chunked over rows.

    Args:
        hidden: ``(N, H)`` final hidden states, already shifted by the caller (row i predicts labels[i]).
        lm_head_weight: ``(V, H)``, same dtype as ``hidden``; its gradient is computed only if it requires
            grad.
        labels: ``(N,)`` int64 targets in ``[0, V)`` or ``ignore_index``.
        ignore_index: label of rows that carry no loss (prompt, image and pad tokens).
        softcap: Gemma's ``final_logit_softcapping`` (30.0), or None.
        chunk_size: rows per GEMM; by default as many as keep one chunk of logits near 2^27 elements.
        return_logits: also return the soft-capped ``(N, V)`` logits in ``hidden``'s dtype (evaluation);
            they carry no gradient and cost the full logits tensor this function otherwise avoids.
        reduction: ``"mean"`` over supervised rows (Hugging Face's default) or ``"sum"`` (divide by
            ``num_items_in_batch`` yourself, as Trainer does under gradient accumulation).

    Returns:
        The fp32 scalar loss, or ``(loss, logits)`` with ``return_logits``. With no supervised row the loss
        is 0 (``F.cross_entropy`` would return nan for ``"mean"``).
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1] or lm_head_weight.shape[1:] != hidden.shape[1:]:
        raise ValueError(
            f"expected hidden (N, H), labels (N,), weight (V, H); got hidden {tuple(hidden.shape)}, "
            f"labels {tuple(labels.shape)}, weight {tuple(lm_head_weight.shape)}"
        )
    if hidden.dtype != lm_head_weight.dtype:
        raise ValueError(f"hidden is {hidden.dtype} but lm_head_weight is {lm_head_weight.dtype}; cast one first")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size}")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap must be positive or None, got {softcap}")
    if torch.compiler.is_compiling():
        loss, logits = FUSED_LINEAR_CE.compiled(
            hidden,
            lm_head_weight,
            labels.contiguous(),
            ignore_index,
            softcap,
            chunk_size,
            return_logits,
            reduction,
            hidden.requires_grad,
            lm_head_weight.requires_grad,
        )
        return (loss, logits) if return_logits else loss
    return _FusedLinearCrossEntropy.apply(
        hidden,
        lm_head_weight,
        labels.contiguous(),
        ignore_index,
        softcap,
        chunk_size,
        return_logits,
        reduction,
    )


def fused_linear_cross_entropy_reference(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    softcap: float | None = None,
    chunk_size: int | None = None,
    return_logits: bool = False,
    reduction: str = "mean",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Plain ``hidden @ W.T`` in the activation dtype, fp32 upcast, soft-cap, ``F.cross_entropy``."""
    del chunk_size  # the reference materialises everything
    logits = (hidden @ lm_head_weight.t()).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    loss = torch.nn.functional.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction)
    if reduction == "mean" and not bool((labels != ignore_index).any()):
        loss = logits.sum() * 0.0
    if return_logits:
        return loss, logits.detach().to(hidden.dtype)
    return loss
