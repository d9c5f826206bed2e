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

Eager mode runs the hand-written ``autograd.Function`` (bitsandbytes' ``QuantState`` passed as it is);
``torch.compile`` traces the same two halves as the custom ops ``vlmtune::fc_mlp`` / ``fc_mlp_backward``
(:mod:`vlmtune.kernels.ops`).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from vlmtune.kernels.gated_mlp import _activation, _sigmoid
from vlmtune.kernels.launch import fast_launch
from vlmtune.kernels.lora_linear import frozen_weight, lora_factor_grad, lora_linear_reference, nf4_args, nf4_bases
from vlmtune.kernels.lora_mlp import LoraProjection, check_projection
from vlmtune.kernels.ops import kernel_op, leading_rows

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


def _forward_rows(x2d, loras, bases, biases, scales, activation):
    """``(out, pre, xa1, xa2)`` of ``(N, hidden)`` rows with a unit last stride; ``loras`` already in ``x2d``'s
    dtype."""
    (w1, q1), (w2, q2) = bases
    pre, xa1 = _project(x2d, w1, q1, loras[0], loras[1], scales[0])
    h = bias_act_forward(pre, biases[0], activation)
    out, xa2 = _project(h, w2, q2, loras[2], loras[3], scales[1])
    del h
    if biases[1] is not None:
        out += biases[1].to(out.dtype)
    return out, pre, xa1, xa2


def _backward_rows(dout, x2d, pre, xa1, xa2, loras, bases, scales, activation, needs, dtypes):
    """``[dx, dA1, dB1, dA2, dB2, dbias1, dbias2]`` of ``(N, hidden)`` rows, None where ``needs`` (one flag per
    entry) is False; ``dtypes`` are those of the six parameters (None for an absent one)."""
    a1, b1, a2, b2 = loras
    (w1, q1), (w2, q2) = bases
    s1, s2 = scales
    dout = dout.reshape(-1, dout.shape[-1])
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    dtype = dout.dtype

    def factor_grad(i, like, left, right, scale):
        # needs[i] implies that LoRA matrix (and its partner) exists: None inputs never ask for a gradient.
        return lora_factor_grad(like, left, right, scale, dtypes[i - 1]) if needs[i] else None

    def bias_grad(i, d):
        return d.sum(0, dtype=torch.float32).to(dtypes[i - 1]) if needs[i] else None

    # fc2: dh = dout @ W2 + s2 (dout @ B2) @ A2. A2's gradient needs h = act(pre), which the epilogue's
    # backward recomputes below instead of the forward keeping it.
    dh = dout @ frozen_weight(w2, q2, dtype)
    dyb2 = None if b2 is None else dout @ b2
    if a2 is not None:
        dh.addmm_(dyb2, a2, alpha=s2)
    h = torch.empty_like(pre) if needs[3] else None
    dpre = bias_act_backward(dh, pre, activation, out=h)
    grads = [None] * 7
    grads[3] = factor_grad(3, a2, dyb2.t() if needs[3] else None, h, s2)
    grads[4] = factor_grad(4, b2, dout.t(), xa2, s2)
    grads[6] = bias_grad(6, dout)
    del h
    dyb1 = None if b1 is None else dpre @ b1
    grads[1] = factor_grad(1, a1, dyb1.t() if needs[1] else None, x2d, s1)
    grads[2] = factor_grad(2, b1, dpre.t(), xa1, s1)
    grads[5] = bias_grad(5, dpre)
    if needs[0]:
        grads[0] = dpre @ frozen_weight(w1, q1, dtype)
        if a1 is not None:
            grads[0].addmm_(dyb1, a1, alpha=s1)
    return grads


class _FcMlpFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, a1, b1, a2, b2, bias1, bias2, w1, q1, w2, q2, s1, s2, activation):
        x2d = x.reshape(-1, x.shape[-1])
        if x2d.stride(-1) != 1:
            x2d = x2d.contiguous()
        loras = [None if t is None else t.to(x.dtype) for t in (a1, b1, a2, b2)]
        bases = ((w1, q1), (w2, q2))
        out, pre, xa1, xa2 = _forward_rows(x2d, loras, bases, (bias1, bias2), (s1, s2), activation)
        ctx.save_for_backward(x2d, pre, xa1, xa2, *loras)
        ctx.bases = bases
        ctx.scales, ctx.activation = (s1, s2), activation
        ctx.dtypes = [None if t is None else t.dtype for t in (a1, b1, a2, b2, bias1, bias2)]
        ctx.x_shape = x.shape
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, dout):
        x2d, pre, xa1, xa2, *loras = ctx.saved_tensors
        grads = _backward_rows(
            dout, x2d, pre, xa1, xa2, loras, ctx.bases, ctx.scales, ctx.activation, ctx.needs_input_grad[:7], ctx.dtypes
        )
        dx = None if grads[0] is None else grads[0].reshape(ctx.x_shape)
        return dx, *grads[1:], None, None, None, None, None, None, None


# The same arithmetic as custom ops, for torch.compile (vlmtune.kernels.ops): the projections come apart into the
# LoRA factors and biases (the differentiable inputs), the two base weights, their quant states as tensors and
# ints (vlmtune.kernels.lora_linear.nf4_args) and the scales; the factors are cast again in backward.
def _op_forward(
    x: torch.Tensor,
    a1: torch.Tensor | None,
    b1: torch.Tensor | None,
    a2: torch.Tensor | None,
    b2: torch.Tensor | None,
    bias1: torch.Tensor | None,
    bias2: torch.Tensor | None,
    weights: list[torch.Tensor],
    nf4_tensors: list[torch.Tensor | None],
    nf4_ints: list[int],
    scales: list[float],
    activation: str,
) -> list[torch.Tensor]:
    x2d = x.reshape(-1, x.shape[-1]).contiguous()
    loras = [None if t is None else t.to(x.dtype) for t in (a1, b1, a2, b2)]
    bases = nf4_bases(weights, nf4_tensors, nf4_ints)
    out, pre, xa1, xa2 = _forward_rows(x2d, loras, bases, (bias1, bias2), scales, activation)
    # Residuals: the pre-activation, then x @ A^T of each linear that has LoRA.
    return [out.reshape(*x.shape[:-1], out.shape[-1]), pre, *(t for t in (xa1, xa2) if t is not None)]


def _op_forward_fake(x, a1, b1, a2, b2, bias1, bias2, weights, nf4_tensors, nf4_ints, scales, activation):
    out_features = [w.shape[0] if nf4_tensors[4 * i] is None else nf4_ints[5 * i + 2] for i, w in enumerate(weights)]
    rows = leading_rows(x)
    out = x.new_empty((*x.shape[:-1], out_features[1]))
    return [
        out,
        x.new_empty((rows, out_features[0])),
        *(x.new_empty((rows, a.shape[0])) for a in (a1, a2) if a is not None),
    ]


def _op_backward(
    grads: list[torch.Tensor],
    saved: list[torch.Tensor | None],
    needs: list[bool],
    weights: list[torch.Tensor],
    nf4_tensors: list[torch.Tensor | None],
    nf4_ints: list[int],
    scales: list[float],
    activation: str,
) -> list[torch.Tensor]:
    x, *params = saved[:7]
    pre, *xas = saved[7:]
    xas = iter(xas)
    xa1, xa2 = (None if a is None else next(xas) for a in (params[0], params[2]))
    loras = [None if t is None else t.to(x.dtype) for t in params[:4]]
    result = _backward_rows(
        grads[0],
        x.reshape(-1, x.shape[-1]).contiguous(),
        pre,
        xa1,
        xa2,
        loras,
        nf4_bases(weights, nf4_tensors, nf4_ints),
        scales,
        activation,
        needs,
        [None if t is None else t.dtype for t in params],
    )
    if result[0] is not None:
        result[0] = result[0].reshape(x.shape)
    return [g for g, needed in zip(result, needs, strict=True) if needed]


def _op_backward_fake(grads, saved, needs, weights, nf4_tensors, nf4_ints, scales, activation):
    like = [None if t is None else t.new_empty(t.shape) for t in saved[:7]]
    return [g for g, needed in zip(like, needs, strict=True) if needed]


FC_MLP = kernel_op(
    "fc_mlp",
    forward=_op_forward,
    backward=_op_backward,
    forward_fake=_op_forward_fake,
    backward_fake=_op_backward_fake,
    outputs=1,
    save_inputs=("x", "a1", "b1", "a2", "b2", "bias1", "bias2"),
    backward_params=("weights", "nf4_tensors", "nf4_ints", "scales", "activation"),
    differentiable=("x", "a1", "b1", "a2", "b2", "bias1", "bias2"),
)


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
    if torch.compiler.is_compiling():
        loras = (fc1.lora_A, fc1.lora_B, fc2.lora_A, fc2.lora_B)
        nf4_tensors, nf4_ints = nf4_args([fc1.quant_state, fc2.quant_state])
        scales = [float(fc1.scale), float(fc2.scale)]
        weights = [fc1.weight, fc2.weight]
        return FC_MLP.compiled(x, *loras, bias1, bias2, weights, nf4_tensors, nf4_ints, scales, activation)[0]
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
