"""LayerNorm (weight and optional bias): a Triton forward and backward, and the torch reference beside them.

``y = (x - mean) * rstd * w + b`` over the last dim, with mean, variance and the affine product in fp32 and one
rounding to the input dtype at the end: what ``torch.nn.functional.layer_norm`` does for 16-bit inputs (its CUDA
kernel accumulates in fp32), so outputs agree to an ulp. The backward works in fp32 and rounds once when it
stores; the weight and bias gradients are accumulated in fp32 per program (each program owns a band of rows),
the partials summed by torch afterwards: no atomics, deterministic. A frozen weight (LoRA on a SigLIP tower)
skips them entirely.

The output is always in the input's dtype. Under ``torch.autocast`` (the Trainer's bf16 mode) ``F.layer_norm`` is
an fp32 op: it upcasts a bf16 input, returns fp32, and every projection reading the output casts it back to bf16
(the vision tower's q / k / v and ``fc1`` each keep and convert their own copy, and backward converts each
gradient again). The consumers of a SigLIP norm are projections, which round to bf16 anyway, so returning bf16
from the kernel drops those round-trips without changing what the projections compute.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vlmtune.kernels.launch import fast_launch, row_num_warps, row_programs
from vlmtune.kernels.ops import kernel_op, leading_rows


def _rows_per_tile(block: int) -> int:
    """Rows each program handles at a time: one for real widths (SigLIP's 1152 pads to 2048); several for narrow
    rows, so that a program still moves a few thousand elements (and the CPU interpreter runs few programs)."""
    return max(1, min(64, 2048 // block))


@fast_launch
@triton.jit
def _layer_norm_fwd_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    mean_ptr,
    rstd_ptr,
    stride_x,
    stride_y,
    n_rows,
    n_cols,
    eps,
    HAS_BIAS: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    col_mask = cols < n_cols
    mask = (rows < n_rows)[:, None] & col_mask[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / n_cols
    # Centred before squaring: no cancellation for rows with a large mean.
    centred = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(centred * centred, axis=1) / n_cols + eps)
    tl.store(mean_ptr + rows, mean, mask=rows < n_rows)
    tl.store(rstd_ptr + rows, rstd, mask=rows < n_rows)
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    y = centred * rstd[:, None] * w[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@fast_launch
@triton.jit
def _layer_norm_bwd_kernel(
    dy_ptr,
    x_ptr,
    w_ptr,
    mean_ptr,
    rstd_ptr,
    dx_ptr,
    dw_partial_ptr,
    db_partial_ptr,
    stride_dy,
    stride_x,
    stride_dx,
    n_rows,
    n_cols,
    rows_per_program,
    COMPUTE_DW: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Each program owns a band of rows_per_program rows (a multiple of ROWS), ROWS at a time.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    col_mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK,), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK,), dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program
    for i in range(0, rows_per_program, ROWS):
        rows = row_start + i + tl.arange(0, ROWS)
        # Rows past the end (the last band may be short) load zeros and store nothing.
        in_range = rows < n_rows
        mask = in_range[:, None] & col_mask[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=in_range, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=in_range, other=0.0)
        x_hat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        g = dy * w[None, :]
        # d/dx of (x - mean) * rstd: remove the gradient's mean and its projection on x_hat.
        c1 = tl.sum(g * x_hat, axis=1) / n_cols
        c2 = tl.sum(g, axis=1) / n_cols
        dx = rstd[:, None] * (g - c2[:, None] - x_hat * c1[:, None])
        tl.store(dx_ptr + rows[:, None] * stride_dx + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            dw_acc += tl.sum(dy * x_hat, axis=0)
        if COMPUTE_DB:
            db_acc += tl.sum(dy, axis=0)
    if COMPUTE_DW:
        tl.store(dw_partial_ptr + pid * n_cols + cols, dw_acc, mask=col_mask)
    if COMPUTE_DB:
        tl.store(db_partial_ptr + pid * n_cols + cols, db_acc, mask=col_mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    t2d = t.reshape(-1, t.shape[-1])
    return t2d if t2d.stride(-1) == 1 else t2d.contiguous()


def _forward_rows(x2d, weight, bias, eps):
    """``(y, mean, rstd)`` of ``(N, H)`` rows with a unit last stride."""
    n_rows, n_cols = x2d.shape
    y = torch.empty((n_rows, n_cols), dtype=x2d.dtype, device=x2d.device)
    mean = torch.empty(n_rows, dtype=torch.float32, device=x2d.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x2d.device)
    block = triton.next_power_of_2(n_cols)
    tile = _rows_per_tile(block)
    if n_rows > 0:
        _layer_norm_fwd_kernel[(triton.cdiv(n_rows, tile),)](
            x2d,
            weight,
            weight if bias is None else bias,  # an unused pointer without bias
            y,
            mean,
            rstd,
            x2d.stride(0),
            y.stride(0),
            n_rows,
            n_cols,
            eps,
            HAS_BIAS=bias is not None,
            ROWS=tile,
            BLOCK=block,
            num_warps=row_num_warps(block),
        )
    return y, mean, rstd


def _backward_rows(dy, x2d, weight, mean, rstd, compute_dw, bias_dtype):
    """``(dx, dw, db)`` for ``(N, H)`` rows: ``dw`` None unless ``compute_dw``, ``db`` None unless ``bias_dtype``
    (the bias's dtype, when the bias wants a gradient)."""
    n_rows, n_cols = x2d.shape
    dy2d = _rows(dy)
    compute_db = bias_dtype is not None
    dx = torch.empty_like(x2d)
    n_programs = row_programs(n_rows, x2d.device)
    # Unused (1, 1) stand-ins for the partials nobody asked for.
    dw_partial = torch.empty((n_programs, n_cols) if compute_dw else (1, 1), dtype=torch.float32, device=x2d.device)
    db_partial = torch.empty((n_programs, n_cols) if compute_db else (1, 1), dtype=torch.float32, device=x2d.device)
    block = triton.next_power_of_2(n_cols)
    tile = _rows_per_tile(block)
    if n_rows > 0:
        _layer_norm_bwd_kernel[(n_programs,)](
            dy2d,
            x2d,
            weight,
            mean,
            rstd,
            dx,
            dw_partial,
            db_partial,
            dy2d.stride(0),
            x2d.stride(0),
            dx.stride(0),
            n_rows,
            n_cols,
            triton.cdiv(triton.cdiv(n_rows, n_programs), tile) * tile,
            COMPUTE_DW=compute_dw,
            COMPUTE_DB=compute_db,
            ROWS=tile,
            BLOCK=block,
            num_warps=row_num_warps(block),
        )
    dw = db = None
    if compute_dw:
        dw = dw_partial.sum(0).to(weight.dtype) if n_rows > 0 else torch.zeros_like(weight)
    if compute_db:
        db = db_partial.sum(0) if n_rows > 0 else torch.zeros(n_cols, device=x2d.device)
        db = db.to(bias_dtype)
    return dx, dw, db


class _LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        x2d = _rows(x)
        y, mean, rstd = _forward_rows(x2d, weight, bias, eps)
        ctx.save_for_backward(x2d, weight, mean, rstd)
        ctx.x_shape = x.shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.reshape(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, mean, rstd = ctx.saved_tensors
        bias_dtype = ctx.bias_dtype if ctx.needs_input_grad[2] else None
        dx, dw, db = _backward_rows(dy, x2d, weight, mean, rstd, ctx.needs_input_grad[1], bias_dtype)
        return dx.reshape(ctx.x_shape), dw, db, None


# The same launches as custom ops, for torch.compile (vlmtune.kernels.ops).
def _op_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> list[torch.Tensor]:
    y, mean, rstd = _forward_rows(_rows(x), weight, bias, eps)
    return [y.reshape(x.shape), mean, rstd]


def _op_forward_fake(x, weight, bias, eps):
    rows = leading_rows(x)
    stats = [x.new_empty(rows, dtype=torch.float32), x.new_empty(rows, dtype=torch.float32)]
    return [x.new_empty(x.shape), *stats]


def _op_backward(grads: list[torch.Tensor], saved: list[torch.Tensor | None], needs: list[bool]) -> list[torch.Tensor]:
    x, weight, bias, mean, rstd = saved
    bias_dtype = bias.dtype if needs[2] else None
    dx, dw, db = _backward_rows(grads[0], _rows(x), weight, mean, rstd, needs[1], bias_dtype)
    # dx is computed either way (the kernel writes it); it is returned only when asked for.
    return [g for g, needed in zip((dx.reshape(x.shape), dw, db), needs, strict=True) if needed]


def _op_backward_fake(grads, saved, needs):
    x, weight, bias, _, _ = saved
    like = (x.new_empty(x.shape), torch.empty_like(weight), None if bias is None else torch.empty_like(bias))
    return [g for g, needed in zip(like, needs, strict=True) if needed]


LAYER_NORM = kernel_op(
    "layer_norm",
    forward=_op_forward,
    backward=_op_backward,
    forward_fake=_op_forward_fake,
    backward_fake=_op_backward_fake,
    outputs=1,
    save_inputs=("x", "weight", "bias"),
    differentiable=("x", "weight", "bias"),
)


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dim() != 1 or t.shape[0] != x.shape[-1]):
            raise ValueError(f"{name} of shape {tuple(t.shape)} does not match the last dim of x {tuple(x.shape)}")


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim of ``x`` with a Triton kernel (``nn.LayerNorm`` with ``elementwise_affine``).

    Args:
        x: ``(..., H)`` activations, any leading shape.
        weight: ``(H,)`` scale.
        bias: ``(H,)`` shift, or None.
        eps: added to the variance before the reciprocal square root.

    Returns:
        ``(..., H)`` in ``x.dtype``. Gradients flow to ``x``, and to ``weight`` / ``bias`` where they require one.
    """
    _check(x, weight, bias)
    if torch.compiler.is_compiling():
        return LAYER_NORM.compiled(x, weight, bias, float(eps))[0]
    return _LayerNormFunction.apply(x, weight, bias, float(eps))


def layer_norm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``torch.nn.functional.layer_norm``, what ``nn.LayerNorm.forward`` calls."""
    _check(x, weight, bias)
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, eps)
