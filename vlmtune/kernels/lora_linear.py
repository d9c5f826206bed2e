"""LoRA linear over a frozen base weight, dense or bitsandbytes NF4 (QLoRA), with a Triton NF4 dequantiser.

``y = x @ W^T + bias + (x @ A^T) @ B^T * scale`` with PEFT's layout (A: ``(r, in)``, B: ``(out, r)``).

NF4 layout (bitsandbytes ``quantize_4bit``): the weight is flattened row-major, two 4-bit codes per byte (the
high nibble first), one absmax per ``blocksize`` (64) consecutive values of the flat weight. With double
quantisation (``compress_statistics=True``) the absmax values are themselves stored as uint8 codes into
``state2.code``, scaled by ``state2.absmax`` per 256 absmax values, plus a scalar ``offset``. A value is
``NF4[code] * absmax``, computed in fp32 and rounded once to ``quant_state.dtype``: what bitsandbytes' CUDA
kernel does, so the result is bit-identical. (bitsandbytes 0.50's native CPU kernel instead counts blocks
per row when the row length is not a multiple of 64, disagreeing with its own quantiser; the Python
fallback and the CUDA kernel use the flat layout this kernel uses. Real projections have rows that are
multiples of 64, where the three agree.)

Memory: the dequantised weight goes into one cached buffer per ``(shape, dtype, device)`` instead of a
fresh allocation per layer. That is safe because the buffer is written and read on the same CUDA stream
within a single call (dequantise, then the base GEMM that consumes it), it is never saved for backward
(backward dequantises again into the same buffer), and no reference to it escapes ``lora_linear``; the next
layer's dequantisation is queued behind the GEMM that reads it. It would not be safe to hand the buffer to
another stream, which nothing here does; :func:`dequantize_nf4` returns a fresh tensor.

The LoRA path runs in the activation dtype (A and B are cast to it, as Unsloth does; PEFT may keep them in
fp32) and is accumulated into the base output with ``addmm_``. Backward computes dX, dA, dB (and dbias
when a bias asks for it), never a gradient for the base weight. dA and dB of fp32 factors come out of their
GEMM in fp32 on CUDA (:func:`lora_factor_grad`): PEFT's autocast path rounds them to the activation dtype
first, so these are at least as accurate as the reference's.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from vlmtune.kernels.launch import fast_launch
from vlmtune.kernels.ops import kernel_op, leading_rows

# The 16 NF4 levels (QLoRA, Dettmers et al. 2023, appendix E), as bitsandbytes stores them in fp32.
NF4_LEVELS = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
# Bytes of packed codes per program: a tile of ``_TILE_BYTES // (blocksize // 2)`` absmax blocks.
_TILE_BYTES = 2048
_DEQUANT_WARPS = 4
_LEVELS: dict[torch.device, torch.Tensor] = {}
_FP32_OUT: dict[torch.device, bool] = {}
_HALF = (torch.bfloat16, torch.float16)
_BUFFERS: dict[tuple[torch.Size, torch.dtype, torch.device], torch.Tensor] = {}
# The dtypes an NF4 weight dequantises to, by the code the custom ops carry them as (a schema has no dtype list).
_NF4_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_NF4_DTYPE_CODES = {dtype: code for code, dtype in enumerate(_NF4_DTYPES)}


class Nf4(NamedTuple):
    """What the dequantiser reads of a bitsandbytes NF4 ``QuantState``: tensors and ints a custom op can take.

    Attributes:
        absmax: one scale per ``blocksize`` values: fp32, or uint8 codes into ``code2`` when double-quantised.
        absmax2: the fp32 scale per ``blocksize2`` absmax codes (double quantisation), else None.
        code2: the 256 fp32 levels of the absmax codes, else None.
        offset: the scalar added to the decoded absmax, else None.
        blocksize: values per absmax (64).
        blocksize2: absmax codes per ``absmax2`` value (256), 0 when not double-quantised.
        shape: the dequantised weight's ``(out_features, in_features)``.
        dtype: the dequantised weight's dtype.
    """

    absmax: torch.Tensor
    absmax2: torch.Tensor | None
    code2: torch.Tensor | None
    offset: torch.Tensor | None
    blocksize: int
    blocksize2: int
    shape: torch.Size
    dtype: torch.dtype


def nf4_of(quant_state) -> Nf4:
    """The :class:`Nf4` of a bitsandbytes ``QuantState`` (an :class:`Nf4` is returned as it is).

    Raises:
        ValueError: for another 4-bit type, or a weight bitsandbytes repacked for its CPU kernel.
    """
    if isinstance(quant_state, Nf4):
        return quant_state
    if quant_state.quant_type != "nf4":
        raise ValueError(f"only nf4 is supported, got quant_type={quant_state.quant_type!r}")
    if getattr(quant_state, "packing_format_for_cpu", False):
        # bitsandbytes repacks weights for its own CPU GEMM on first use; that layout is not the NF4 one.
        raise ValueError("this NF4 weight was repacked for bitsandbytes' CPU kernel; quantize it afresh")
    if not quant_state.nested:
        return Nf4(quant_state.absmax, None, None, None, quant_state.blocksize, 0, quant_state.shape, quant_state.dtype)
    state2 = quant_state.state2
    return Nf4(
        quant_state.absmax,
        state2.absmax,
        state2.code,
        quant_state.offset,
        quant_state.blocksize,
        state2.blocksize,
        quant_state.shape,
        quant_state.dtype,
    )


def nf4_args(quant_states) -> tuple[list[torch.Tensor | None], list[int]]:
    """Quant states (None for a dense weight) as a custom op's ``Tensor?[]`` and ``int[]`` arguments."""
    tensors: list[torch.Tensor | None] = []
    ints: list[int] = []
    for quant_state in quant_states:
        if quant_state is None:
            tensors += [None] * 4
            ints += [-1] * 5
            continue
        nf4 = nf4_of(quant_state)
        tensors += [nf4.absmax, nf4.absmax2, nf4.code2, nf4.offset]
        ints += [nf4.blocksize, nf4.blocksize2, nf4.shape[0], nf4.shape[1], _NF4_DTYPE_CODES[nf4.dtype]]
    return tensors, ints


def nf4_states(tensors: list[torch.Tensor | None], ints: list[int]) -> list[Nf4 | None]:
    """The inverse of :func:`nf4_args`."""
    states: list[Nf4 | None] = []
    for i in range(len(ints) // 5):
        absmax, absmax2, code2, offset = tensors[4 * i : 4 * i + 4]
        blocksize, blocksize2, rows, cols, dtype = ints[5 * i : 5 * i + 5]
        if absmax is None:
            states.append(None)
            continue
        shape = torch.Size((rows, cols))
        states.append(Nf4(absmax, absmax2, code2, offset, blocksize, blocksize2, shape, _NF4_DTYPES[dtype]))
    return states


def nf4_bases(weights: list[torch.Tensor], tensors: list[torch.Tensor | None], ints: list[int]) -> tuple:
    """``(weight, quant state or None)`` per base weight, from a custom op's arguments (see :func:`nf4_args`)."""
    return tuple(zip(weights, nf4_states(tensors, ints), strict=True))


@fast_launch
@triton.jit
def _dequantize_nf4_kernel(
    packed_ptr,
    absmax_ptr,
    absmax2_ptr,
    code2_ptr,
    offset_ptr,
    levels_ptr,
    out_ptr,
    n_bytes,
    n_out,
    blocksize2,
    NESTED: tl.constexpr,
    HALF: tl.constexpr,
    ROWS: tl.constexpr,
    WORDS: tl.constexpr,
    OUT_BF16: tl.constexpr,
):
    # A tile of ROWS absmax blocks x HALF bytes (blocksize // 2: two codes per byte). The scale is computed
    # once per block, not per value.
    block = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    block_mask = block * HALF < n_bytes
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=block_mask, other=0).to(tl.int32)
        scale2 = tl.load(absmax2_ptr + block // blocksize2, mask=block_mask, other=0.0)
        # Rounded after the product and again after the offset, as bitsandbytes does in two torch ops;
        # the launch disables FMA contraction so the compiler cannot merge them.
        absmax = tl.load(code2_ptr + q, mask=block_mask, other=0.0) * scale2 + tl.load(offset_ptr)
    else:
        absmax = tl.load(absmax_ptr + block, mask=block_mask, other=0.0)
    byte = block[:, None] * HALF + tl.arange(0, HALF)[None, :]
    byte_mask = byte < n_bytes
    packed = tl.load(packed_ptr + byte, mask=byte_mask, other=0).to(tl.int32)
    high = tl.load(levels_ptr + (packed >> 4)) * absmax[:, None]
    low = tl.load(levels_ptr + (packed & 15)) * absmax[:, None]
    if WORDS:
        # A 2-byte output and an even count: each byte's two values as one 32-bit word (little-endian, the
        # high nibble's value first), stored to ``out`` viewed as int32.
        out_type = tl.bfloat16 if OUT_BF16 else tl.float16
        first = high.to(out_type).to(tl.uint16, bitcast=True).to(tl.uint32)
        second = low.to(out_type).to(tl.uint16, bitcast=True).to(tl.uint32)
        tl.store(out_ptr + byte, (first | (second << 16)).to(tl.int32, bitcast=True), mask=byte_mask)
    else:
        out = tl.interleave(high, low).to(out_ptr.dtype.element_ty)
        idx = block[:, None] * (2 * HALF) + tl.arange(0, 2 * HALF)[None, :]
        tl.store(out_ptr + idx, out, mask=idx < n_out)


def _levels(device: torch.device) -> torch.Tensor:
    if device not in _LEVELS:
        _LEVELS[device] = torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)
    return _LEVELS[device]


def _dequantize_into(packed: torch.Tensor, quant_state, out: torch.Tensor) -> torch.Tensor:
    nf4 = nf4_of(quant_state)
    packed = packed.reshape(-1)
    if packed.dtype != torch.uint8:  # bitsandbytes' quant_storage may be another dtype; the bytes are the same
        packed = packed.view(torch.uint8)
    n_bytes = packed.numel()
    nested = nf4.absmax2 is not None
    absmax = nf4.absmax
    # Unused pointers when not nested: any valid float tensor will do.
    absmax2 = nf4.absmax2 if nested else absmax
    code2 = nf4.code2 if nested else absmax
    offset = nf4.offset if nested else absmax
    half = nf4.blocksize // 2
    rows = max(1, _TILE_BYTES // half)
    # The 32-bit stores need an even count and a 4-byte aligned start (the flat view of `out` as int32).
    words = (
        out.dtype in (torch.bfloat16, torch.float16) and out.numel() == 2 * n_bytes and out.storage_offset() % 2 == 0
    )
    _dequantize_nf4_kernel[(triton.cdiv(n_bytes, rows * half),)](
        packed,
        absmax,
        absmax2,
        code2,
        offset,
        _levels(packed.device),
        out.reshape(-1).view(torch.int32) if words else out,
        n_bytes,
        out.numel(),
        nf4.blocksize2 if nested else 1,
        NESTED=nested,
        HALF=half,
        ROWS=rows,
        WORDS=words,
        OUT_BF16=out.dtype == torch.bfloat16,
        num_warps=_DEQUANT_WARPS,
        enable_fp_fusion=False,
    )
    return out


def dequantize_nf4(weight: torch.Tensor, quant_state, out: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantise a bitsandbytes NF4 weight with a Triton kernel, bit-identical to ``dequantize_4bit``.

    Args:
        weight: the packed ``Params4bit`` (uint8 or another ``quant_storage``), ``(numel // 2, 1)``.
        quant_state: its ``bitsandbytes.functional.QuantState``; nested (double-quantised) or not.
        out: where to write, a contiguous tensor of ``quant_state.shape`` (any float dtype) on the weight's
            device; a new one in ``quant_state.dtype`` if None.

    Returns:
        ``quant_state.shape`` (e.g. ``(out_features, in_features)``) in ``quant_state.dtype``.
    """
    if out is None:
        out = torch.empty(quant_state.shape, dtype=quant_state.dtype, device=weight.device)
    elif out.shape != quant_state.shape or not out.is_contiguous() or out.device != weight.device:
        raise ValueError(
            f"out must be a contiguous {tuple(quant_state.shape)} tensor on {weight.device}, got "
            f"{tuple(out.shape)} (contiguous={out.is_contiguous()}) on {out.device}"
        )
    return _dequantize_into(weight, quant_state, out)


def _dequantize_to_buffer(weight: torch.Tensor, quant_state) -> torch.Tensor:
    """Dequantise into the shared buffer for this shape: see the module docstring for why that is safe."""
    key = (torch.Size(quant_state.shape), quant_state.dtype, weight.device)
    buffer = _BUFFERS.get(key)
    if buffer is None:
        buffer = _BUFFERS[key] = torch.empty(key[0], dtype=key[1], device=key[2])
    return _dequantize_into(weight, quant_state, buffer)


def frozen_weight(weight: torch.Tensor, quant_state, dtype: torch.dtype) -> torch.Tensor:
    """The frozen base weight in ``dtype`` for one GEMM: an NF4 weight is dequantised into the shared buffer of
    its shape, so the result is valid until the next dequantisation of that shape is queued (see the module
    docstring); a dense weight is returned as is, or cast."""
    w = weight if quant_state is None else _dequantize_to_buffer(weight, quant_state)
    # bitsandbytes' matmul_4bit casts the dequantised weight to the activation dtype the same way.
    return w if w.dtype == dtype else w.to(dtype)


def _fp32_out_supported(device: torch.device) -> bool:
    """Whether ``torch.addmm(..., out_dtype=torch.float32)`` runs on this device (CUDA, torch >= 2.8)."""
    if device.type != "cuda":
        return False
    supported = _FP32_OUT.get(device)
    if supported is None:
        one = torch.ones(1, 1, dtype=torch.bfloat16, device=device)
        try:
            supported = torch.addmm(one, one, one, out_dtype=torch.float32, beta=0).dtype == torch.float32
        except (RuntimeError, TypeError):
            supported = False
        _FP32_OUT[device] = supported
    return supported


def lora_factor_grad(like: torch.Tensor, left: torch.Tensor, right: torch.Tensor, scale: float, dtype: torch.dtype):
    """``scale * left @ right`` in ``dtype``: a LoRA factor's gradient (``like`` only gives its shape).

    With fp32 factors (vlmtune's default) over half-precision activations, the GEMM writes fp32 itself on CUDA
    (accumulated in fp32, never rounded to the half type), which also saves the cast's launch; elsewhere the
    product is computed in the operands' dtype and cast, as autograd does for PEFT's autocast path.
    """
    if dtype == torch.float32 and left.dtype in _HALF and _fp32_out_supported(left.device):
        return torch.addmm(like, left, right, out_dtype=torch.float32, beta=0, alpha=scale)
    return torch.addmm(like, left, right, beta=0, alpha=scale).to(dtype)


def _forward_rows(x2d, weight, quant_state, bias, a, b, scale):
    """``(y, x @ A^T)`` for ``(N, in)`` rows; ``a`` and ``b`` already in the rows' dtype."""
    w = frozen_weight(weight, quant_state, x2d.dtype)
    y = x2d @ w.t() if bias is None else torch.addmm(bias.to(x2d.dtype), x2d, w.t())
    xa = x2d @ a.t()
    y.addmm_(xa, b.t(), alpha=scale)
    return y, xa


def _backward_rows(dy2d, x2d, weight, quant_state, a, b, xa, scale, needs, dtypes):
    """``(dx, dbias, dA, dB)`` for the ``needs`` flags of ``(x, bias, A, B)``; None where not needed."""
    needs_x, needs_bias, needs_a, needs_b = needs
    a_dtype, b_dtype, bias_dtype = dtypes
    dx = da = db = dbias = None
    # The LoRA scale rides in the GEMMs' alpha (addmm with beta=0 ignores its first argument, which only
    # gives the shape): no separate pass, and no extra launch on a host-bound step.
    if needs_x or needs_a:
        dy_b = dy2d @ b  # (N, r)
        if needs_a:
            da = lora_factor_grad(a, dy_b.t(), x2d, scale, a_dtype)
        if needs_x:
            w = frozen_weight(weight, quant_state, dy2d.dtype)
            dx = (dy2d @ w).addmm_(dy_b, a, alpha=scale)
    if needs_b:
        db = lora_factor_grad(b, dy2d.t(), xa, scale, b_dtype)
    if needs_bias:
        dbias = dy2d.sum(0).to(bias_dtype)
    return dx, dbias, da, db


class _LoraLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, quant_state, bias, lora_a, lora_b, scale):
        x2d = x.reshape(-1, x.shape[-1])
        a, b = lora_a.to(x.dtype), lora_b.to(x.dtype)
        y, xa = _forward_rows(x2d, weight, quant_state, bias, a, b, scale)
        ctx.save_for_backward(x2d, weight, a, b, xa)
        ctx.quant_state, ctx.scale = quant_state, scale
        ctx.dtypes = (lora_a.dtype, lora_b.dtype, None if bias is None else bias.dtype)
        ctx.x_shape = x.shape
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, a, b, xa = ctx.saved_tensors
        needs_x, _, _, needs_bias, needs_a, needs_b, _ = ctx.needs_input_grad
        dx, dbias, da, db = _backward_rows(
            dy.reshape(-1, dy.shape[-1]),
            x2d,
            weight,
            ctx.quant_state,
            a,
            b,
            xa,
            ctx.scale,
            (needs_x, needs_bias, needs_a, needs_b),
            ctx.dtypes,
        )
        return None if dx is None else dx.reshape(ctx.x_shape), None, None, dbias, da, db, None


# The same arithmetic as custom ops, for torch.compile (vlmtune.kernels.ops): the QuantState as tensors and
# ints (nf4_args), the LoRA factors cast again in backward rather than kept twice.
def _op_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    nf4_tensors: list[torch.Tensor | None],
    nf4_ints: list[int],
) -> list[torch.Tensor]:
    x2d = x.reshape(-1, x.shape[-1])
    (quant_state,) = nf4_states(nf4_tensors, nf4_ints)
    y, xa = _forward_rows(x2d, weight, quant_state, bias, lora_a.to(x.dtype), lora_b.to(x.dtype), scale)
    return [y.reshape(*x.shape[:-1], y.shape[-1]), xa]


def _op_forward_fake(x, weight, bias, lora_a, lora_b, scale, nf4_tensors, nf4_ints):
    out_features = weight.shape[0] if nf4_tensors[0] is None else nf4_ints[2]
    rows = leading_rows(x)
    return [x.new_empty((*x.shape[:-1], out_features)), x.new_empty((rows, lora_a.shape[0]))]


def _op_backward(
    grads: list[torch.Tensor],
    saved: list[torch.Tensor | None],
    needs: list[bool],
    scale: float,
    nf4_tensors: list[torch.Tensor | None],
    nf4_ints: list[int],
) -> list[torch.Tensor]:
    x, weight, lora_a, lora_b, bias, xa = saved
    (quant_state,) = nf4_states(nf4_tensors, nf4_ints)
    dy = grads[0]
    grads = _backward_rows(
        dy.reshape(-1, dy.shape[-1]),
        x.reshape(-1, x.shape[-1]),
        weight,
        quant_state,
        lora_a.to(x.dtype),
        lora_b.to(x.dtype),
        xa,
        scale,
        needs,
        (lora_a.dtype, lora_b.dtype, None if bias is None else bias.dtype),
    )
    dx = grads[0]
    return [g for g in (None if dx is None else dx.reshape(x.shape), *grads[1:]) if g is not None]


def _op_backward_fake(grads, saved, needs, scale, nf4_tensors, nf4_ints):
    x, _, lora_a, lora_b, bias, _ = saved
    like = (x.new_empty(x.shape), None if bias is None else torch.empty_like(bias))
    like += (lora_a.new_empty(lora_a.shape), lora_b.new_empty(lora_b.shape))
    return [g for g, needed in zip(like, needs, strict=True) if needed]


LORA_LINEAR = kernel_op(
    "lora_linear",
    forward=_op_forward,
    backward=_op_backward,
    forward_fake=_op_forward_fake,
    backward_fake=_op_backward_fake,
    outputs=1,
    save_inputs=("x", "weight", "lora_a", "lora_b", "bias"),
    backward_params=("scale", "nf4_tensors", "nf4_ints"),
    differentiable=("x", "bias", "lora_a", "lora_b"),
)


def lora_linear(
    x: torch.Tensor,
    base_weight: torch.Tensor,
    quant_state,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """``x @ W^T + bias + (x @ A^T) @ B^T * scale`` over a frozen dense or NF4 base weight.

    Args:
        x: ``(..., in_features)`` activations.
        base_weight: ``(out, in)`` dense weight, or the packed NF4 ``Params4bit`` data; must not require grad.
        quant_state: the weight's bitsandbytes ``QuantState`` for NF4, None for a dense weight.
        bias: ``(out,)`` or None.
        lora_A: ``(r, in)``, PEFT's ``lora_A.weight``.
        lora_B: ``(out, r)``, PEFT's ``lora_B.weight``.
        scale: PEFT's ``scaling`` (``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA). LoRA dropout must be 0.

    Returns:
        ``(..., out_features)`` in ``x.dtype``.
    """
    if base_weight.requires_grad:
        raise ValueError("lora_linear treats the base weight as frozen; set base_weight.requires_grad_(False)")
    in_features = x.shape[-1]
    out_features = base_weight.shape[0] if quant_state is None else quant_state.shape[0]
    if lora_A.shape[1] != in_features or lora_B.shape != (out_features, lora_A.shape[0]):
        raise ValueError(
            f"LoRA shapes A {tuple(lora_A.shape)}, B {tuple(lora_B.shape)} do not fit x {tuple(x.shape)} "
            f"and a base weight with {out_features} outputs"
        )
    if torch.compiler.is_compiling():
        nf4_tensors, nf4_ints = nf4_args([quant_state])
        return LORA_LINEAR.compiled(x, base_weight, bias, lora_A, lora_B, float(scale), nf4_tensors, nf4_ints)[0]
    return _LoraLinearFunction.apply(x, base_weight, quant_state, bias, lora_A, lora_B, float(scale))


def lora_linear_reference(
    x: torch.Tensor,
    base_weight: torch.Tensor,
    quant_state,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """bitsandbytes' ``dequantize_4bit`` and plain matmuls, the LoRA path in the activation dtype."""
    # Imported here: only the reference needs it, and importing bitsandbytes is slow.
    import bitsandbytes.functional as bnbf

    if quant_state is None:
        w = base_weight
    else:
        w = bnbf.dequantize_4bit(base_weight, quant_state)
    w = w.detach().to(x.dtype)
    bias = None if bias is None else bias.to(x.dtype)
    base = torch.nn.functional.linear(x, w, bias)
    lora = torch.nn.functional.linear(torch.nn.functional.linear(x, lora_A.to(x.dtype)), lora_B.to(x.dtype))
    return base + lora * scale
