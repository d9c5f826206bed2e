"""RMSNorm: a Triton forward and backward, and the Hugging Face reference beside them.

Two castings, because the two families disagree about where the cast to the input dtype happens
(transformers PR 29402):

- ``"llama"`` (Qwen2RMSNorm, LlamaRMSNorm): normalise in fp32, cast to the input dtype, *then* multiply by
  the weight, so the product is rounded once more in the output dtype.
- ``"gemma"`` (Gemma3RMSNorm): normalise and multiply by ``(1 + w)`` in fp32, cast once at the end.

``offset=1.0`` gives Gemma's ``(1 + w)`` weight. The forward reproduces Hugging Face's roundings step for
step; the backward works in fp32 throughout and rounds once when it stores. The weight gradient is
accumulated in fp32 per program (each program owns a band of rows) and the per-program partials are summed
by torch afterwards, which avoids atomics and keeps the result deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vlmtune.kernels.launch import fast_launch, row_num_warps, row_programs
from vlmtune.kernels.ops import kernel_op, leading_rows

_CASTINGS = ("llama", "gemma")


@fast_launch
@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    rstd_ptr,
    stride_x,
    stride_y,
    n_cols,
    eps,
    offset,
    GEMMA_CASTING: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    tl.store(rstd_ptr + row, rstd)
    x_hat = x * rstd
    if GEMMA_CASTING:
        y = x_hat * (offset + w)
    else:
        # Llama rounds the normalised activations to the input dtype before the weight multiply.
        y = x_hat.to(x_ptr.dtype.element_ty).to(tl.float32) * (offset + w)
    tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@fast_launch
@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr,
    x_ptr,
    w_ptr,
    rstd_ptr,
    dx_ptr,
    dw_partial_ptr,
    stride_dy,
    stride_x,
    stride_dx,
    n_rows,
    n_cols,
    rows_per_program,
    offset,
    GEMMA_CASTING: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) + offset
    dw_acc = tl.zeros((BLOCK,), dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program
    for i in range(0, rows_per_program):
        row = row_start + i
        # Rows past the end (the last band may be short) load zeros and store nothing.
        row_mask = mask & (row < n_rows)
        x = tl.load(x_ptr + row * stride_x + cols, mask=row_mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * stride_dy + cols, mask=row_mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row, mask=row < n_rows, other=0.0)
        x_hat = x * rstd
        g = dy * w
        dx = rstd * (g - x_hat * (tl.sum(g * x_hat, axis=0) / n_cols))
        tl.store(dx_ptr + row * stride_dx + cols, dx.to(dx_ptr.dtype.element_ty), mask=row_mask)
        if COMPUTE_DW:
            if GEMMA_CASTING:
                dw_acc += dy * x_hat
            else:
                dw_acc += dy * x_hat.to(x_ptr.dtype.element_ty).to(tl.float32)
    if COMPUTE_DW:
        tl.store(dw_partial_ptr + pid * n_cols + cols, dw_acc, mask=mask)


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    x2d = x.reshape(-1, x.shape[-1])
    return x2d if x2d.stride(-1) == 1 else x2d.contiguous()


def _forward_rows(x2d, weight, eps, offset, gemma):
    """``(y, rstd)`` of ``(N, H)`` rows with a unit last stride."""
    n_rows, n_cols = x2d.shape
    out_dtype = x2d.dtype if gemma else torch.promote_types(x2d.dtype, weight.dtype)
    y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x2d.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x2d.device)
    block = triton.next_power_of_2(n_cols)
    if n_rows > 0:
        _rms_norm_fwd_kernel[(n_rows,)](
            x2d,
            weight,
            y,
            rstd,
            x2d.stride(0),
            y.stride(0),
            n_cols,
            eps,
            offset,
            GEMMA_CASTING=gemma,
            BLOCK=block,
            num_warps=row_num_warps(block),
        )
    return y, rstd


def _backward_rows(dy, x2d, weight, rstd, offset, gemma, compute_dw):
    """``(dx, dw)`` (``dw`` None unless ``compute_dw``) for ``(N, H)`` rows."""
    n_rows, n_cols = x2d.shape
    dy2d = _as_rows(dy)
    dx = torch.empty_like(x2d)
    n_programs = row_programs(n_rows, x2d.device)
    dw_partial = torch.empty((n_programs if compute_dw else 1, n_cols), dtype=torch.float32, device=x2d.device)
    block = triton.next_power_of_2(n_cols)
    if n_rows > 0:
        _rms_norm_bwd_kernel[(n_programs,)](
            dy2d,
            x2d,
            weight,
            rstd,
            dx,
            dw_partial,
            dy2d.stride(0),
            x2d.stride(0),
            dx.stride(0),
            n_rows,
            n_cols,
            triton.cdiv(n_rows, n_programs),
            offset,
            GEMMA_CASTING=gemma,
            COMPUTE_DW=compute_dw,
            BLOCK=block,
            num_warps=row_num_warps(block),
        )
    dw = None
    if compute_dw:
        dw = dw_partial.sum(0).to(weight.dtype) if n_rows > 0 else torch.zeros_like(weight)
    return dx, dw


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, offset, gemma):
        x2d = _as_rows(x)
        y, rstd = _forward_rows(x2d, weight, eps, offset, gemma)
        ctx.save_for_backward(x2d, weight, rstd)
        ctx.offset, ctx.gemma, ctx.shape = offset, gemma, x.shape
        return y.reshape(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, rstd = ctx.saved_tensors
        dx, dw = _backward_rows(dy, x2d, weight, rstd, ctx.offset, ctx.gemma, ctx.needs_input_grad[1])
        return dx.reshape(ctx.shape), dw, None, None, None


# The same launches as custom ops, for torch.compile (vlmtune.kernels.ops).
def _op_forward(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float, gemma: bool) -> list[torch.Tensor]:
    y, rstd = _forward_rows(_as_rows(x), weight, eps, offset, gemma)
    return [y.reshape(x.shape), rstd]


def _op_forward_fake(x, weight, eps, offset, gemma):
    dtype = x.dtype if gemma else torch.promote_types(x.dtype, weight.dtype)
    return [x.new_empty(x.shape, dtype=dtype), x.new_empty(leading_rows(x), dtype=torch.float32)]


def _op_backward(
    grads: list[torch.Tensor], saved: list[torch.Tensor | None], needs: list[bool], offset: float, gemma: bool
) -> list[torch.Tensor]:
    x, weight, rstd = saved
    dx, dw = _backward_rows(grads[0], _as_rows(x), weight, rstd, offset, gemma, needs[1])
    # dx is computed either way (the kernel writes it); it is returned only when asked for.
    return [g for g, needed in ((dx.reshape(x.shape), needs[0]), (dw, needs[1])) if needed]


def _op_backward_fake(grads, saved, needs, offset, gemma):
    x, weight, _ = saved
    return [g for g, needed in ((x.new_empty(x.shape), needs[0]), (torch.empty_like(weight), needs[1])) if needed]


RMS_NORM = kernel_op(
    "rms_norm",
    forward=_op_forward,
    backward=_op_backward,
    forward_fake=_op_forward_fake,
    backward_fake=_op_backward_fake,
    outputs=1,
    save_inputs=("x", "weight"),
    backward_params=("offset", "gemma"),
    differentiable=("x", "weight"),
)


def _check(x: torch.Tensor, weight: torch.Tensor, casting: str) -> None:
    if casting not in _CASTINGS:
        raise ValueError(f"casting must be one of {_CASTINGS}, got {casting!r}")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight of shape {tuple(weight.shape)} does not match the last dim of x {tuple(x.shape)}")


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    offset: float = 0.0,
    casting: str = "llama",
) -> torch.Tensor:
    """RMS-normalise the last dim of ``x`` with a Triton kernel.

    Args:
        x: ``(..., H)`` activations, any leading shape.
        weight: ``(H,)`` scale; the effective scale is ``offset + weight``.
        eps: added to the mean square before the reciprocal square root.
        offset: ``1.0`` for Gemma's ``(1 + w)`` weight, ``0.0`` otherwise.
        casting: ``"llama"`` (Qwen2/Llama) or ``"gemma"`` (Gemma-3); see the module docstring.

    Returns:
        ``(..., H)``: in ``x.dtype`` for ``"gemma"``, in ``promote_types(x.dtype, weight.dtype)`` for
        ``"llama"`` (what ``weight * x_hat.to(x.dtype)`` gives in Hugging Face).
    """
    _check(x, weight, casting)
    if torch.compiler.is_compiling():
        return RMS_NORM.compiled(x, weight, float(eps), float(offset), casting == "gemma")[0]
    return _RMSNormFunction.apply(x, weight, float(eps), float(offset), casting == "gemma")


def rms_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    offset: float = 0.0,
    casting: str = "llama",
) -> torch.Tensor:
    """Pure-torch RMSNorm, op for op as Qwen2RMSNorm (``"llama"``) and Gemma3RMSNorm (``"gemma"``)."""
    _check(x, weight, casting)
    x32 = x.to(torch.float32)
    x_hat = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if casting == "gemma":
        return (x_hat * (offset + weight.float())).type_as(x)
    scale = weight if offset == 0.0 else offset + weight
    return scale * x_hat.to(x.dtype)
