"""A gated MLP whose three projections are LoRA linears (or frozen ones), in one autograd Function.

``down(act(gate(x)) * up(x))`` where each projection is ``x @ W^T + (x @ A^T) @ B^T * scale`` over a frozen
dense or NF4 base (:mod:`vlmtune.kernels.lora_linear`), or ``x @ W^T`` alone for a projection without LoRA (LoRA
on the attention only, or a frozen language tower that passes gradients back to a tuned vision tower), and
``act`` is SiLU or tanh-GELU
(:mod:`vlmtune.kernels.gated_mlp`). The arithmetic is that of the three LoRA linears and the activation
kernel called one after another; what the single Function saves is:

- host time: one autograd node instead of four, so one Python forward and one Python backward per MLP. The
  language tower of a 4B model is host-bound at the batch sizes one GPU trains (each node costs tens of
  microseconds of Python, about what the GPU spends on the activation itself);
- memory: ``act(gate) * up`` (tokens x intermediate) is not kept for backward; the activation's backward
  kernel recomputes it for the LoRA gradient of ``down``, and ``d(act(gate) * up)`` is turned into ``dgate``
  in place;
- a pass over ``dx``: the base GEMMs of ``gate`` and ``up`` accumulate into one ``dx`` (``addmm_``), where
  autograd would add two ``(tokens, hidden)`` tensors.

Backward computes dX and the LoRA gradients autograd asks for, never a base-weight gradient. Biases are not
supported (the MLPs of the supported families have none); :mod:`vlmtune.kernels.patch` keeps those MLPs on the
unfused path.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from vlmtune.kernels.gated_mlp import gated_backward, gated_forward
from vlmtune.kernels.lora_linear import (
    frozen_weight,
    lora_factor_grad,
    lora_linear_reference,
    nf4_args,
    nf4_bases,
)
from vlmtune.kernels.ops import kernel_op, leading_rows

_REFERENCE_ACTIVATIONS = {
    "silu": torch.nn.functional.silu,
    "gelu_tanh": lambda g: torch.nn.functional.gelu(g, approximate="tanh"),
}


class LoraProjection(NamedTuple):
    """One projection of the MLP, in :func:`vlmtune.kernels.lora_linear.lora_linear`'s terms.

    Attributes:
        weight: ``(out, in)`` frozen dense weight, or the packed NF4 ``Params4bit`` data.
        quant_state: the NF4 weight's bitsandbytes ``QuantState``; None for a dense weight.
        lora_A: ``(r, in)``, PEFT's ``lora_A.weight``; None for a projection without LoRA.
        lora_B: ``(out, r)``, PEFT's ``lora_B.weight``; None exactly when ``lora_A`` is.
        scale: PEFT's ``scaling`` (unused without LoRA).
    """

    weight: torch.Tensor
    quant_state: object
    lora_A: torch.Tensor | None = None
    lora_B: torch.Tensor | None = None
    scale: float = 0.0


def _project(x2d, weight, quant_state, a, b, scale):
    """``(x @ W^T + (x @ A^T) @ B^T * scale, x @ A^T)``; without LoRA ``(x @ W^T, None)``."""
    y = x2d @ frozen_weight(weight, quant_state, x2d.dtype).t()
    if a is None:
        return y, None
    xa = x2d @ a.t()
    return y.addmm_(xa, b.t(), alpha=scale), xa


def _forward(x2d, bases, loras, scales, activation):
    (wg, qg), (wu, qu), (wd, qd) = bases
    ag, bg, au, bu, ad, bd = loras
    sg, su, sd = scales
    gate, xa_g = _project(x2d, wg, qg, ag, bg, sg)
    up, xa_u = _project(x2d, wu, qu, au, bu, su)
    h = gated_forward(gate, up, activation)
    out, xa_d = _project(h, wd, qd, ad, bd, sd)
    return out, (gate, up, xa_g, xa_u, xa_d)


def _backward_rows(dout, x2d, saved, loras, bases, scales, activation, needs, lora_dtypes):
    """``[dx, dA_gate, dB_gate, dA_up, dB_up, dA_down, dB_down]`` (None where ``needs`` is False) for ``(N, hidden)``
    rows; ``saved`` is the forward's ``(gate, up, xa_g, xa_u, xa_d)``, ``loras`` the factors in ``dout``'s dtype."""
    gate, up, xa_g, xa_u, xa_d = saved
    ag, bg, au, bu, ad, bd = loras
    (wg, qg), (wu, qu), (wd, qd) = bases
    sg, su, sd = scales
    needs_x, needs = needs[0], needs[1:7]  # x, then A and B of gate, up, down
    dtype = dout.dtype

    def lora_grad(i, like, left, right, scale):
        # The scale rides in the GEMM's alpha; `like` only gives the shape.
        return lora_factor_grad(like, left, right, scale, lora_dtypes[i]) if needs[i] else None

    # down: dh = dout @ Wd + s (dout @ Bd) @ Ad. Its A's gradient needs h = act(gate) * up, which the
    # activation's backward recomputes below instead of the forward keeping it.
    dh = dout @ frozen_weight(wd, qd, dtype)
    dyb_d = None if bd is None else dout @ bd
    if ad is not None:
        dh.addmm_(dyb_d, ad, alpha=sd)
    h = torch.empty_like(gate) if needs[4] else None
    dgate, dup = gated_backward(dh, gate, up, activation, dgate=dh, y=h)
    # needs[i] implies that LoRA matrix (and its partner) exists: None inputs never ask for a gradient.
    grads = [None] * 4 + [
        lora_grad(4, ad, dyb_d.t() if needs[4] else None, h, sd),
        lora_grad(5, bd, dout.t(), xa_d, sd),
    ]
    del h
    # gate and up: both base GEMMs and both LoRA terms accumulate into one dx.
    dyb_g = None if bg is None else dgate @ bg
    dyb_u = None if bu is None else dup @ bu
    grads[:4] = [
        lora_grad(0, ag, dyb_g.t() if needs[0] else None, x2d, sg),
        lora_grad(1, bg, dgate.t(), xa_g, sg),
        lora_grad(2, au, dyb_u.t() if needs[2] else None, x2d, su),
        lora_grad(3, bu, dup.t(), xa_u, su),
    ]
    dx = None
    if needs_x:
        dx = dgate @ frozen_weight(wg, qg, dtype)
        dx.addmm_(dup, frozen_weight(wu, qu, dtype))
        if ag is not None:
            dx.addmm_(dyb_g, ag, alpha=sg)
        if au is not None:
            dx.addmm_(dyb_u, au, alpha=su)
    return [dx, *grads]


class _LoraGatedMlpFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ag, bg, au, bu, ad, bd, bases, scales, activation):
        x2d = x.reshape(-1, x.shape[-1])
        loras = [None if t is None else t.to(x.dtype) for t in (ag, bg, au, bu, ad, bd)]
        out, saved = _forward(x2d, bases, loras, scales, activation)
        ctx.save_for_backward(x2d, *saved, *loras)
        ctx.bases, ctx.scales, ctx.activation = bases, scales, activation
        ctx.lora_dtypes = [None if t is None else t.dtype for t in (ag, bg, au, bu, ad, bd)]
        ctx.x_shape = x.shape
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, dout):
        x2d, *saved = ctx.saved_tensors
        dout = dout.reshape(-1, dout.shape[-1])
        grads = _backward_rows(
            dout,
            x2d,
            saved[:5],
            saved[5:],
            ctx.bases,
            ctx.scales,
            ctx.activation,
            ctx.needs_input_grad[:7],
            ctx.lora_dtypes,
        )
        dx = grads[0]
        return None if dx is None else dx.reshape(ctx.x_shape), *grads[1:], None, None, None


# The same arithmetic as custom ops, for torch.compile (vlmtune.kernels.ops). The projections come apart into the
# LoRA factors (the differentiable inputs), the base weights, their quant states as tensors and ints
# (vlmtune.kernels.lora_linear.nf4_args) and the scales; the factors are cast again in backward.
def _op_forward(
    x: torch.Tensor,
    ag: torch.Tensor | None,
    bg: torch.Tensor | None,
    au: torch.Tensor | None,
    bu: torch.Tensor | None,
    ad: torch.Tensor | None,
    bd: torch.Tensor | None,
    weights: list[torch.Tensor],
    nf4_tensors: list[torch.Tensor | None],
    nf4_ints: list[int],
    scales: list[float],
    activation: str,
) -> list[torch.Tensor]:
    x2d = x.reshape(-1, x.shape[-1])
    loras = [None if t is None else t.to(x.dtype) for t in (ag, bg, au, bu, ad, bd)]
    out, saved = _forward(x2d, nf4_bases(weights, nf4_tensors, nf4_ints), loras, scales, activation)
    # Residuals: gate and up, then x @ A^T of each projection that has LoRA.
    return [out.reshape(*x.shape[:-1], out.shape[-1]), *(t for t in saved if t is not None)]


def _op_forward_fake(x, ag, bg, au, bu, ad, bd, weights, nf4_tensors, nf4_ints, scales, activation):
    out_features = [w.shape[0] if nf4_tensors[4 * i] is None else nf4_ints[5 * i + 2] for i, w in enumerate(weights)]
    rows = leading_rows(x)
    out = x.new_empty((*x.shape[:-1], out_features[2]))
    inter = [x.new_empty((rows, out_features[0])), x.new_empty((rows, out_features[1]))]
    return [out, *inter, *(x.new_empty((rows, a.shape[0])) for a in (ag, au, ad) if a is not None)]


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
    x, *factors = saved[:7]
    gate, up, *xas = saved[7:]
    xas = iter(xas)
    xa = [None if a is None else next(xas) for a in factors[0::2]]
    dout = grads[0].reshape(-1, grads[0].shape[-1])
    loras = [None if t is None else t.to(x.dtype) for t in factors]
    result = _backward_rows(
        dout,
        x.reshape(-1, x.shape[-1]),
        (gate, up, *xa),
        loras,
        nf4_bases(weights, nf4_tensors, nf4_ints),
        scales,
        activation,
        needs,
        [None if t is None else t.dtype for t in factors],
    )
    dx = result[0]
    return [g for g in (None if dx is None else dx.reshape(x.shape), *result[1:]) if g is not None]


def _op_backward_fake(grads, saved, needs, weights, nf4_tensors, nf4_ints, scales, activation):
    x, *factors = saved[:7]
    like = [x.new_empty(x.shape)] + [None if t is None else t.new_empty(t.shape) for t in factors]
    return [g for g, needed in zip(like, needs, strict=True) if needed]


LORA_GATED_MLP = kernel_op(
    "lora_gated_mlp",
    forward=_op_forward,
    backward=_op_backward,
    forward_fake=_op_forward_fake,
    backward_fake=_op_backward_fake,
    outputs=1,
    save_inputs=("x", "ag", "bg", "au", "bu", "ad", "bd"),
    backward_params=("weights", "nf4_tensors", "nf4_ints", "scales", "activation"),
    differentiable=("x", "ag", "bg", "au", "bu", "ad", "bd"),
)


def check_projection(name: str, p: LoraProjection) -> tuple[int, int]:
    """``(out_features, in_features)`` of a frozen base with matching LoRA factors; ``ValueError`` naming ``name``."""
    if p.weight.requires_grad:
        raise ValueError(f"{name}: the base weight must be frozen (requires_grad=False)")
    out_f, in_f = p.weight.shape if p.quant_state is None else p.quant_state.shape
    if (p.lora_A is None) != (p.lora_B is None):
        raise ValueError(f"{name}: give both LoRA matrices or neither")
    if p.lora_A is not None:
        r = p.lora_A.shape[0]
        if p.lora_A.shape != (r, in_f) or p.lora_B.shape != (out_f, r):
            raise ValueError(
                f"{name}: LoRA shapes A {tuple(p.lora_A.shape)}, B {tuple(p.lora_B.shape)} do not fit a "
                f"({out_f}, {in_f}) base weight"
            )
    return out_f, in_f


def _check(x: torch.Tensor, gate: LoraProjection, up: LoraProjection, down: LoraProjection) -> None:
    shapes = [check_projection(name, p) for name, p in (("gate", gate), ("up", up), ("down", down))]
    (inter_g, hidden_g), (inter_u, hidden_u), (hidden_d, inter_d) = shapes
    if not (x.shape[-1] == hidden_g == hidden_u == hidden_d and inter_g == inter_u == inter_d):
        raise ValueError(
            f"x {tuple(x.shape)} with gate {shapes[0]}, up {shapes[1]}, down {shapes[2]} (out, in) weights is "
            "not a gated MLP: gate and up map hidden -> intermediate, down intermediate -> hidden"
        )


def lora_gated_mlp(
    x: torch.Tensor,
    gate: LoraProjection,
    up: LoraProjection,
    down: LoraProjection,
    activation: str,
) -> torch.Tensor:
    """``down(act(gate(x)) * up(x))`` with LoRA on any of the three projections, in one autograd node.

    Args:
        x: ``(..., hidden)`` activations, in the dtype the projections compute in.
        gate, up: ``hidden -> intermediate`` projections.
        down: ``intermediate -> hidden``.
        activation: ``"silu"`` (SwiGLU) or ``"gelu_tanh"`` (Gemma's GeGLU).

    Returns:
        ``(..., hidden)`` in ``x.dtype``. Gradients flow to ``x`` and the LoRA matrices.
    """
    if activation not in _REFERENCE_ACTIVATIONS:
        raise ValueError(f"activation {activation!r}; supported: {sorted(_REFERENCE_ACTIVATIONS)}")
    _check(x, gate, up, down)
    bases = ((gate.weight, gate.quant_state), (up.weight, up.quant_state), (down.weight, down.quant_state))
    scales = (float(gate.scale), float(up.scale), float(down.scale))
    loras = (gate.lora_A, gate.lora_B, up.lora_A, up.lora_B, down.lora_A, down.lora_B)
    if torch.compiler.is_compiling():
        nf4_tensors, nf4_ints = nf4_args([gate.quant_state, up.quant_state, down.quant_state])
        weights = [gate.weight, up.weight, down.weight]
        return LORA_GATED_MLP.compiled(x, *loras, weights, nf4_tensors, nf4_ints, list(scales), activation)[0]
    return _LoraGatedMlpFunction.apply(x, *loras, bases, scales, activation)


def lora_gated_mlp_reference(
    x: torch.Tensor,
    gate: LoraProjection,
    up: LoraProjection,
    down: LoraProjection,
    activation: str,
) -> torch.Tensor:
    """The same with bitsandbytes' dequantisation, plain matmuls and torch's activation (PEFT's arithmetic)."""
    # Imported here: only the reference needs it, and importing bitsandbytes is slow.
    import bitsandbytes.functional as bnbf

    def project(inputs: torch.Tensor, p: LoraProjection) -> torch.Tensor:
        if p.lora_A is None:
            w = p.weight if p.quant_state is None else bnbf.dequantize_4bit(p.weight, p.quant_state)
            return torch.nn.functional.linear(inputs, w.detach().to(inputs.dtype))
        return lora_linear_reference(inputs, p.weight, p.quant_state, None, p.lora_A, p.lora_B, p.scale)

    return project(_REFERENCE_ACTIVATIONS[activation](project(x, gate)) * project(x, up), down)
