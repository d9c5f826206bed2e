"""Rotary position embedding (RoPE and Qwen-VL's multimodal M-RoPE) in one Triton pass over Q and K.

Hugging Face's convention: ``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = cat(-x2, x1)`` and
cos/sin whose two halves repeat the same frequencies. Gemma-3's local (sliding-window) and global layers use
the same formula with cos/sin built from different bases, so they need nothing special here.

M-RoPE (Qwen2-VL / Qwen2.5-VL) gives each frequency one of three position axes (time, height, width):
``mrope_section`` (e.g. ``[16, 24, 24]``, summing to ``head_dim // 2``) says how many frequencies each axis
owns. Up to transformers 4.x, ``apply_multimodal_rotary_pos_emb`` received cos/sin of shape ``(3, B, T, D)``
and picked the sections itself. In transformers 5.x (read in 5.17 and 5.23) the rotary module merges the
sections before returning (``Qwen2_5_VLRotaryEmbedding.recomposition_frequencies``), so attention sees
ordinary ``(B, T, D)`` cos/sin and :func:`apply_rope` is the kernel to use; :func:`apply_mrope` takes the
unmerged ``(3, B, T, D)`` form and picks the axis per frequency inside the kernel, without materialising the
merged cos/sin.

Numerics: the forward and backward round each product to the output dtype before adding, exactly as the
eager ``q * cos + rotate_half(q) * sin`` and its autograd do, and the launch turns FMA contraction off: with
it on, the compiler folds a product and its rounding into the following add (seen on H100, Triton 3.6). So
results agree with Hugging Face bit for bit on CUDA in fp32, bf16 and fp16. The backward is the rotation by
``-sin``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from vlmtune.kernels.launch import fast_launch
from vlmtune.kernels.ops import kernel_op


@triton.jit
def _rotate_tile(
    x_ptr,
    out_ptr,
    stride_xh,
    stride_oh,
    n_heads,
    c1,
    c2,
    s1,
    s2,
    d,
    half,
    BLOCK_H: tl.constexpr,
):
    """Rotate every head of one token: ``y1 = x1*c1 - x2*s1``, ``y2 = x2*c2 + x1*s2``."""
    h = tl.arange(0, BLOCK_H)
    d = d[None, :]
    mask = (h[:, None] < n_heads) & (d < half)
    x_offs = h[:, None] * stride_xh + d
    o_offs = h[:, None] * stride_oh + d
    x1 = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + x_offs + half, mask=mask, other=0.0).to(tl.float32)
    dt = out_ptr.dtype.element_ty
    # Each product is rounded to the output dtype before the sum, as the eager torch expression does.
    y1 = (x1 * c1).to(dt).to(tl.float32) - (x2 * s1).to(dt).to(tl.float32)
    y2 = (x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)
    tl.store(out_ptr + o_offs, y1.to(dt), mask=mask)
    tl.store(out_ptr + o_offs + half, y2.to(dt), mask=mask)


@fast_launch
@triton.jit
def _rope_kernel(
    q_ptr,
    k_ptr,
    qo_ptr,
    ko_ptr,
    cos_ptr,
    sin_ptr,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_qob,
    stride_qoh,
    stride_qot,
    stride_kob,
    stride_koh,
    stride_kot,
    stride_ca,
    stride_cb,
    stride_ct,
    seq_len,
    n_q_heads,
    n_k_heads,
    half,
    section_1,
    section_2,
    MROPE: tl.constexpr,
    BACKWARD: tl.constexpr,
    BLOCK_QH: tl.constexpr,
    BLOCK_KH: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // seq_len
    t = pid % seq_len
    d = tl.arange(0, BLOCK_D)
    d_mask = d < half
    c_offs = b * stride_cb + t * stride_ct + d
    if MROPE:
        # Frequencies [0, section_1) follow the time axis, [section_1, section_2) height, the rest width.
        axis = tl.where(d < section_1, 0, tl.where(d < section_2, 1, 2))
        c_offs += axis.to(tl.int64) * stride_ca
    c1 = tl.load(cos_ptr + c_offs, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + c_offs + half, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + c_offs, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + c_offs + half, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    if BACKWARD:
        # The transpose of the rotation: dx1 = dy1*c1 + dy2*s2, dx2 = dy2*c2 - dy1*s1.
        s1, s2 = -s2, -s1
    _rotate_tile(
        q_ptr + b * stride_qb + t * stride_qt,
        qo_ptr + b * stride_qob + t * stride_qot,
        stride_qh,
        stride_qoh,
        n_q_heads,
        c1,
        c2,
        s1,
        s2,
        d,
        half,
        BLOCK_QH,
    )
    _rotate_tile(
        k_ptr + b * stride_kb + t * stride_kt,
        ko_ptr + b * stride_kob + t * stride_kot,
        stride_kh,
        stride_koh,
        n_k_heads,
        c1,
        c2,
        s1,
        s2,
        d,
        half,
        BLOCK_KH,
    )


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _launch(q, k, q_out, k_out, cos, sin, sections, backward):
    """cos/sin: ``(A, B, T, D)`` with A = 1 (RoPE, stride 0) or 3 (M-RoPE)."""
    batch, n_q_heads, seq_len, head_dim = q.shape
    n_k_heads = k.shape[1]
    half = head_dim // 2
    if batch * seq_len == 0:
        return
    block_d = triton.next_power_of_2(half)
    block_qh = triton.next_power_of_2(n_q_heads)
    _rope_kernel[(batch * seq_len,)](
        q,
        k,
        q_out,
        k_out,
        cos,
        sin,
        *(q.stride(i) for i in range(3)),
        *(k.stride(i) for i in range(3)),
        *(q_out.stride(i) for i in range(3)),
        *(k_out.stride(i) for i in range(3)),
        cos.stride(0),
        cos.stride(1),
        cos.stride(2),
        seq_len,
        n_q_heads,
        n_k_heads,
        half,
        sections[0],
        sections[0] + sections[1],
        MROPE=cos.shape[0] == 3,
        BACKWARD=backward,
        BLOCK_QH=block_qh,
        BLOCK_KH=triton.next_power_of_2(n_k_heads),
        BLOCK_D=block_d,
        num_warps=4 if block_qh * block_d <= 4096 else 8,
        enable_fp_fusion=False,
    )


def _rotate(q, k, cos, sin, sections, backward, q_dtype=None, k_dtype=None):
    """Rotated ``(q, k)`` in new tensors with their strides (by ``-sin`` for ``backward``), in ``q_dtype`` /
    ``k_dtype`` or the promotion with ``cos``'s dtype."""
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    # empty_like keeps q's strides, so the (B, T, H, D) -> (B, H, T, D) transposed views that attention
    # makes stay views on the way out.
    q_out = torch.empty_like(q, dtype=torch.promote_types(q.dtype, cos.dtype) if q_dtype is None else q_dtype)
    k_out = torch.empty_like(k, dtype=torch.promote_types(k.dtype, cos.dtype) if k_dtype is None else k_dtype)
    _launch(q, k, q_out, k_out, cos, sin, sections, backward=backward)
    return q_out, k_out


class _RopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, sections):
        q_out, k_out = _rotate(q, k, cos, sin, sections, backward=False)
        ctx.save_for_backward(cos, sin)
        ctx.sections = sections
        ctx.in_dtypes = (q.dtype, k.dtype)
        ctx.out_meta = ((q_out.shape, q_out.dtype), (k_out.shape, k_out.dtype))
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq_out, dk_out):
        cos, sin = ctx.saved_tensors
        (q_shape, q_dtype), (k_shape, k_dtype) = ctx.out_meta
        # A graph that uses only one of the outputs hands back None for the other.
        if dq_out is None:
            dq_out = torch.zeros(q_shape, dtype=q_dtype, device=cos.device)
        if dk_out is None:
            dk_out = torch.zeros(k_shape, dtype=k_dtype, device=cos.device)
        dq, dk = _rotate(dq_out, dk_out, cos, sin, ctx.sections, True, *ctx.in_dtypes)
        return dq, dk, None, None, None


# The same launches as custom ops, for torch.compile (vlmtune.kernels.ops). The input dtypes come as arguments so
# that backward need not keep q and k alive to learn them.
def _op_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    section_1: int,
    section_2: int,
    q_dtype: torch.dtype,
    k_dtype: torch.dtype,
) -> list[torch.Tensor]:
    return list(_rotate(q, k, cos, sin, (section_1, section_2), backward=False))


def _op_forward_fake(q, k, cos, sin, section_1, section_2, q_dtype, k_dtype):
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    return [
        torch.empty_like(q, dtype=torch.promote_types(q.dtype, cos.dtype)),
        torch.empty_like(k, dtype=torch.promote_types(k.dtype, cos.dtype)),
    ]


def _op_backward(
    grads: list[torch.Tensor],
    saved: list[torch.Tensor | None],
    needs: list[bool],
    section_1: int,
    section_2: int,
    q_dtype: torch.dtype,
    k_dtype: torch.dtype,
) -> list[torch.Tensor]:
    cos, sin = saved
    dq, dk = _rotate(grads[0], grads[1], cos, sin, (section_1, section_2), True, q_dtype, k_dtype)
    return [g for g, needed in ((dq, needs[0]), (dk, needs[1])) if needed]


def _op_backward_fake(grads, saved, needs, section_1, section_2, q_dtype, k_dtype):
    dq = torch.empty_like(_last_dim_contiguous(grads[0]), dtype=q_dtype)
    dk = torch.empty_like(_last_dim_contiguous(grads[1]), dtype=k_dtype)
    return [g for g, needed in ((dq, needs[0]), (dk, needs[1])) if needed]


ROPE = kernel_op(
    "rope",
    forward=_op_forward,
    backward=_op_backward,
    forward_fake=_op_forward_fake,
    backward_fake=_op_backward_fake,
    outputs=2,
    save_inputs=("cos", "sin"),
    backward_params=("section_1", "section_2", "q_dtype", "k_dtype"),
    differentiable=("q", "k"),
)


def _rope(q, k, cos, sin, sections):
    if torch.compiler.is_compiling():
        return tuple(ROPE.compiled(q, k, cos, sin, sections[0], sections[1], q.dtype, k.dtype))
    return _RopeFunction.apply(q, k, cos, sin, sections)


def _check_qk(q: torch.Tensor, k: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be (batch, heads, seq, head_dim), got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:] or q.shape[-1] % 2:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} need equal batch, seq and even head_dim")


def _broadcast_cos(x: torch.Tensor, q: torch.Tensor, name: str) -> torch.Tensor:
    """``(b, T, D)`` with ``b`` 1 or B -> a stride-0-broadcast ``(B, T, D)`` view."""
    batch, _, seq_len, head_dim = q.shape
    if x.dim() != 3 or x.shape[-2:] != (seq_len, head_dim) or x.shape[0] not in (1, batch):
        raise ValueError(
            f"{name} must be (batch, seq, head_dim) = (1|{batch}, {seq_len}, {head_dim}), got {tuple(x.shape)}"
        )
    return _last_dim_contiguous(x).expand(batch, seq_len, head_dim)


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate queries and keys with one Triton kernel (Hugging Face's ``apply_rotary_pos_emb``).

    Args:
        q: ``(B, Hq, T, D)``, any strides with a unit last-dim stride.
        k: ``(B, Hk, T, D)``; ``Hk`` may differ from ``Hq`` (grouped-query attention).
        cos: ``(B, T, D)`` or ``(1, T, D)``, the two halves repeating the same frequencies.
        sin: same shape as ``cos``.

    Returns:
        ``(q_embed, k_embed)`` with the shapes and strides of ``q`` and ``k``.
    """
    _check_qk(q, k)
    cos = _broadcast_cos(cos, q, "cos").unsqueeze(0)
    sin = _broadcast_cos(sin, q, "sin").unsqueeze(0)
    return _rope(q, k, cos, sin, (0, 0))


def _check_sections(mrope_section: Sequence[int], head_dim: int) -> tuple[int, int]:
    if len(mrope_section) != 3 or sum(mrope_section) != head_dim // 2:
        raise ValueError(
            f"mrope_section {list(mrope_section)} must have 3 parts summing to head_dim // 2 = {head_dim // 2}"
        )
    return int(mrope_section[0]), int(mrope_section[1])


def apply_mrope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mrope_section: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multimodal RoPE from unmerged per-axis cos/sin (transformers 4.x ``apply_multimodal_rotary_pos_emb``).

    Args:
        q: ``(B, Hq, T, D)``.
        k: ``(B, Hk, T, D)``.
        cos: ``(3, B, T, D)`` (or ``(3, 1, T, D)``): cos for the time, height and width position ids.
        sin: same shape as ``cos``.
        mrope_section: frequencies per axis, summing to ``D // 2`` (``rope_parameters["mrope_section"]``).

    Returns:
        ``(q_embed, k_embed)``, equal to :func:`apply_rope` on the merged cos/sin.
    """
    _check_qk(q, k)
    sections = _check_sections(mrope_section, q.shape[-1])
    if cos.dim() != 4 or cos.shape[0] != 3 or sin.shape != cos.shape:
        raise ValueError(
            f"cos and sin must be (3, batch, seq, head_dim), got {tuple(cos.shape)} and {tuple(sin.shape)}"
        )
    batch, _, seq_len, head_dim = q.shape
    if cos.shape[1] not in (1, batch) or cos.shape[2:] != (seq_len, head_dim):
        raise ValueError(f"cos {tuple(cos.shape)} does not match q {tuple(q.shape)}")
    cos = _last_dim_contiguous(cos).expand(3, batch, seq_len, head_dim)
    sin = _last_dim_contiguous(sin).expand(3, batch, seq_len, head_dim)
    return _rope(q, k, cos, sin, sections)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hugging Face's ``apply_rotary_pos_emb`` with ``unsqueeze_dim=1``."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def merge_mrope_sections(x: torch.Tensor, mrope_section: Sequence[int]) -> torch.Tensor:
    """``(3, B, T, D)`` per-axis cos or sin -> ``(B, T, D)``: each frequency from its own axis, as 4.x did."""
    chunks = x.split(list(mrope_section) * 2, dim=-1)
    return torch.cat([chunk[i % 3] for i, chunk in enumerate(chunks)], dim=-1)


def apply_mrope_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mrope_section: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers 4.x ``apply_multimodal_rotary_pos_emb``: merge the sections, then rotate."""
    _check_sections(mrope_section, q.shape[-1])
    return apply_rope_reference(
        q, k, merge_mrope_sections(cos, mrope_section), merge_mrope_sections(sin, mrope_section)
    )
