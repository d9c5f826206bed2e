"""A non-gated MLP ``fc2(act(fc1(x)))`` (SigLIP, Qwen2-VL / Qwen3-VL's ViT) with LoRA on either linear, in one
autograd Function, and the Triton bias + activation epilogue it runs between the two GEMMs.

Each linear is ``x @ W^T + (x @ A^T) @ B^T * scale + bias`` over a frozen dense or NF4 base
(:mod:`vlmtune.kernels.lora_linear`), or ``x @ W^T + bias`` alone without LoRA; ``act`` is tanh-GELU (SigLIP's
``gelu_pytorch_tanh``, Qwen3-VL), QuickGELU (``x * sigmoid(1.702 x)``, Qwen2-VL) or SiLU. Against the three
autograd nodes of the plain path (two LoRA linears and the activation) the single Function saves:

- memory: only ``x``, the pre-activation ``fc1(x)`` and the two rank-r products ``x @ A^T`` are kept for backward.
  ``act(fc1(x))`` (tokens x intermediate, the input of ``fc2``) is not: the epilogue's backward recomputes it
  for ``fc2``'s LoRA gradient on the same pass that turns ``d act`` into ``d fc1`` in place;
- passes over ``(tokens, intermediate)`` tensors: fc1's bias add, the activation and (backward) the activation's
  derivative are one elementwise kernel each way, reading the GEMM's output once;
- host time: two Python nodes fewer per MLP.

Roundings follow the plain path's: the pre-activation is rounded to the activation dtype before the activation
reads it (what ``act(fc1(x))`` sees in bf16), the activation's output is rounded once, and its derivative is
taken at the rounded pre-activation (what autograd saved). The bias goes in after the base GEMM and the LoRA
term (one more rounding than PEFT's bias in the GEMM epilogue, within the bf16 tolerance). Backward computes dX,
the LoRA gradients and bias gradients autograd asks for, never a base-weight gradient.

The Function's arguments are tensors, floats and a string (plus bitsandbytes' ``QuantState`` for NF4, as
:func:`vlmtune.kernels.lora_linear.lora_linear` takes it), so that registering it as a custom op is a
mechanical change.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from vlmtune.kernels.gated_mlp import _activation, _sigmoid
from vlmtune.kernels.launch import fast_launch
from vlmtune.kernels.lora_linear import frozen_weight, lora_factor_grad, lora_linear_reference
from vlmtune.kernels.lora_mlp import LoraProjection, check_projection

_BLOCK = 1024
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_KAPPA = 0.044715
_QUICK_GELU = 1.702
# name -> the ACTIVATION constexpr: 0 and 1 are vlmtune.kernels.gated_mlp's SiLU and tanh-GELU.
_ACTIVATIONS = {"silu": 0, "gelu_tanh": 1, "quick_gelu": 2}
REFERENCE_ACTIVATIONS = {
    "silu": torch.nn.functional.silu,
    "gelu_tanh": lambda h: torch.nn.functional.gelu(h, approximate="tanh"),
    "quick_gelu": lambda h: h * torch.sigmoid(_QUICK_GELU * h),  # transformers' QuickGELUActivation
}


@triton.jit
def _act(h, ACTIVATION: tl.constexpr, SQRT_2_OVER_PI: tl.constexpr, KAPPA: tl.constexpr, QUICK: tl.constexpr):
    """Return ``(act(h), act'(h))`` in fp32."""
    if ACTIVATION == 2:
        s = _sigmoid(QUICK * h)
        return h * s, s + QUICK * h * s * (1.0 - s)
    else:
        return _activation(h, ACTIVATION, SQRT_2_OVER_PI, KAPPA)


@fast_launch
@triton.jit
def _bias_act_fwd_kernel(
    pre_ptr,
    bias_ptr,
    out_ptr,
    n,
    n_cols,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    SQRT_2_OVER_PI: tl.constexpr,
    KAPPA: tl.constexpr,
    QUICK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # pre_ptr holds fc1's GEMM output; with a bias it is rewritten in place as the biased pre-activation.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    h = tl.load(pre_ptr + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs % n_cols, mask=mask, other=0.0).to(tl.float32)
        h = (h.to(tl.float32) + bias).to(pre_ptr.dtype.element_ty)
        tl.store(pre_ptr + offs, h, mask=mask)
    act, _ = _act(h.to(tl.float32), ACTIVATION, SQRT_2_OVER_PI, KAPPA, QUICK)
    tl.store(out_ptr + offs, act.to(out_ptr.dtype.element_ty), mask=mask)


@fast_launch
@triton.jit
def _bias_act_bwd_kernel(
    dout_ptr,
    pre_ptr,
    dpre_ptr,
    out_ptr,
    n,
    STORE_OUT: tl.constexpr,
    ACTIVATION: tl.constexpr,
    SQRT_2_OVER_PI: tl.constexpr,
    KAPPA: tl.constexpr,
    QUICK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # dpre_ptr may be dout_ptr: each element is read before it is written, by the same program.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dout = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    h = tl.load(pre_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    act, d_act = _act(h, ACTIVATION, SQRT_2_OVER_PI, KAPPA, QUICK)
    tl.store(dpre_ptr + offs, (dout * d_act).to(dpre_ptr.dtype.element_ty), mask=mask)
    if STORE_OUT:
        # The forward's activation again, for fc2's LoRA gradient: the forward did not keep it.
        tl.store(out_ptr + offs, act.to(out_ptr.dtype.element_ty), mask=mask)


def _meta(activation: str) -> dict:
    return {
        "ACTIVATION": _ACTIVATIONS[activation],
        "SQRT_2_OVER_PI": _SQRT_2_OVER_PI,
        "KAPPA": _KAPPA,
        "QUICK": _QUICK_GELU,
        "BLOCK": _BLOCK,
        "num_warps": 4,
    }


def bias_act_forward(pre: torch.Tensor, bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    """``act(pre + bias)`` of a contiguous ``(rows, cols)`` ``pre``, which becomes ``pre + bias`` in place (rounded
    to its dtype); no autograd."""
    out = torch.empty_like(pre)
    n = pre.numel()
    if n:
        grid = (triton.cdiv(n, _BLOCK),)
        _bias_act_fwd_kernel[grid](
            pre, pre if bias is None else bias, out, n, pre.shape[-1], HAS_BIAS=bias is not None, **_meta(activation)
        )
    return out


def bias_act_backward(
    dout: torch.Tensor, pre: torch.Tensor, activation: str, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``dout * act'(pre)``, written over ``dout`` (contiguous, like ``pre``); ``out``, when given, receives
    ``act(pre)`` recomputed on the way. No autograd."""
    n = pre.numel()
    if n:
        grid = (triton.cdiv(n, _BLOCK),)
        _bias_act_bwd_kernel[grid](
            dout, pre, dout, dout if out is None else out, n, STORE_OUT=out is not None, **_meta(activation)
        )
    return dout


def _project(x2d, weight, quant_state, a, b, scale):
    """``(x @ W^T + (x @ A^T) @ B^T * scale, x @ A^T)``; without LoRA ``(x @ W^T, None)``. No bias."""
    y = x2d @ frozen_weight(weight, quant_state, x2d.dtype).t()
    if a is None:
        return y, None
    xa = x2d @ a.t()
    return y.addmm_(xa, b.t(), alpha=scale), xa


class _FcMlpFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, a1, b1, a2, b2, bias1, bias2, w1, q1, w2, q2, s1, s2, activation):
        x2d = x.reshape(-1, x.shape[-1])
        if x2d.stride(-1) != 1:
            x2d = x2d.contiguous()
        loras = [None if t is None else t.to(x.dtype) for t in (a1, b1, a2, b2)]
        pre, xa1 = _project(x2d, w1, q1, loras[0], loras[1], s1)
        h = bias_act_forward(pre, bias1, activation)
        out, xa2 = _project(h, w2, q2, loras[2], loras[3], s2)
        del h
        if bias2 is not None:
            out += bias2.to(out.dtype)
        ctx.save_for_backward(x2d, pre, xa1, xa2, *loras)
        ctx.bases = ((w1, q1), (w2, q2))
        ctx.scales, ctx.activation = (s1, s2), activation
        ctx.dtypes = [None if t is None else t.dtype for t in (a1, b1, a2, b2, bias1, bias2)]
        ctx.x_shape = x.shape
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, dout):
        x2d, pre, xa1, xa2, a1, b1, a2, b2 = ctx.saved_tensors
        (w1, q1), (w2, q2) = ctx.bases
        s1, s2 = ctx.scales
        needs = ctx.needs_input_grad[1:7]  # A and B of fc1, fc2; the two biases
        dout = dout.reshape(-1, dout.shape[-1])
        if dout.stride(-1) != 1:
            dout = dout.contiguous()
        dtype = dout.dtype

        def factor_grad(i, like, left, right, scale):
            # needs[i] implies that LoRA matrix (and its partner) exists: None inputs never ask for a gradient.
            return lora_factor_grad(like, left, right, scale, ctx.dtypes[i]) if needs[i] else None

        def bias_grad(i, d):
            return d.sum(0, dtype=torch.float32).to(ctx.dtypes[i]) if needs[i] else None

        # fc2: dh = dout @ W2 + s2 (dout @ B2) @ A2. A2's gradient needs h = act(pre), which the epilogue's
        # backward recomputes below instead of the forward keeping it.
        dh = dout @ frozen_weight(w2, q2, dtype)
        dyb2 = None if b2 is None else dout @ b2
        if a2 is not None:
            dh.addmm_(dyb2, a2, alpha=s2)
        h = torch.empty_like(pre) if needs[2] else None
        dpre = bias_act_backward(dh, pre, ctx.activation, out=h)
        grads = [
            None,
            None,
            factor_grad(2, a2, dyb2.t() if needs[2] else None, h, s2),
            factor_grad(3, b2, dout.t(), xa2, s2),
            None,
            bias_grad(5, dout),
        ]
        del h
        dyb1 = None if b1 is None else dpre @ b1
        grads[0] = factor_grad(0, a1, dyb1.t() if needs[0] else None, x2d, s1)
        grads[1] = factor_grad(1, b1, dpre.t(), xa1, s1)
        grads[4] = bias_grad(4, dpre)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = dpre @ frozen_weight(w1, q1, dtype)
            if a1 is not None:
                dx.addmm_(dyb1, a1, alpha=s1)
            dx = dx.reshape(ctx.x_shape)
        return dx, *grads, None, None, None, None, None, None, None


def _check(x, fc1, bias1, fc2, bias2, activation) -> None:
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation {activation!r}; supported: {sorted(_ACTIVATIONS)}")
    shapes = []
    for name, p, bias in (("fc1", fc1, bias1), ("fc2", fc2, bias2)):
        out_f, in_f = check_projection(name, p)
        if bias is not None and bias.shape != (out_f,):
            raise ValueError(f"{name}: bias of shape {tuple(bias.shape)} for {out_f} outputs")
        shapes.append((out_f, in_f))
    (inter_1, hidden_1), (hidden_2, inter_2) = shapes
    if not (x.shape[-1] == hidden_1 and inter_1 == inter_2):
        raise ValueError(
            f"x {tuple(x.shape)} with fc1 {shapes[0]}, fc2 {shapes[1]} (out, in) weights is not an MLP: fc1 maps "
            "hidden -> intermediate, fc2 intermediate -> any width"
        )


def fc_mlp(
    x: torch.Tensor,
    fc1: LoraProjection,
    bias1: torch.Tensor | None,
    fc2: LoraProjection,
    bias2: torch.Tensor | None,
    activation: str,
) -> torch.Tensor:
    """``fc2(act(fc1(x)))`` with LoRA on either linear, in one autograd node.

    Args:
        x: ``(..., hidden)`` activations, in the dtype the linears compute in.
        fc1: ``hidden -> intermediate``; ``bias1`` its ``(intermediate,)`` bias or None.
        fc2: ``intermediate -> out``; ``bias2`` its ``(out,)`` bias or None.
        activation: ``"gelu_tanh"``, ``"quick_gelu"`` or ``"silu"``.

    Returns:
        ``(..., out)`` in ``x.dtype``. Gradients flow to ``x``, the LoRA matrices and biases that require one.
    """
    _check(x, fc1, bias1, fc2, bias2, activation)
    return _FcMlpFunction.apply(
        x,
        fc1.lora_A,
        fc1.lora_B,
        fc2.lora_A,
        fc2.lora_B,
        bias1,
        bias2,
        fc1.weight,
        fc1.quant_state,
        fc2.weight,
        fc2.quant_state,
        float(fc1.scale),
        float(fc2.scale),
        activation,
    )


def fc_mlp_reference(
    x: torch.Tensor,
    fc1: LoraProjection,
    bias1: torch.Tensor | None,
    fc2: LoraProjection,
    bias2: torch.Tensor | None,
    activation: str,
) -> torch.Tensor:
    """The same with bitsandbytes' dequantisation, plain matmuls and torch's activation (PEFT's arithmetic)."""
    _check(x, fc1, bias1, fc2, bias2, activation)
    # Imported here: only the reference needs it, and importing bitsandbytes is slow.
    import bitsandbytes.functional as bnbf

    def project(inputs: torch.Tensor, p: LoraProjection, bias: torch.Tensor | None) -> torch.Tensor:
        bias = None if bias is None else bias.to(inputs.dtype)
        if p.lora_A is None:
            w = p.weight if p.quant_state is None else bnbf.dequantize_4bit(p.weight, p.quant_state)
            return torch.nn.functional.linear(inputs, w.detach().to(inputs.dtype), bias)
        return lora_linear_reference(inputs, p.weight, p.quant_state, bias, p.lora_A, p.lora_B, p.scale)

    return project(REFERENCE_ACTIVATIONS[activation](project(x, fc1, bias1)), fc2, bias2)
