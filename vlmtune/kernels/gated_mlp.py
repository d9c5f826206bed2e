"""Gated MLP activations: SwiGLU (Qwen2, Llama) and GeGLU with tanh-approximated GELU (Gemma-3).

``act(gate) * up``, fused into one elementwise pass. The forward rounds ``act(gate)`` to the input dtype
before multiplying by ``up``, as Hugging Face's ``self.act_fn(self.gate_proj(x)) * self.up_proj(x)`` does in
bf16. The backward recomputes the activation from ``gate`` (nothing is saved but the two inputs) and rounds
where autograd would: ``dy * up`` before the activation's derivative, ``dy * act(gate)`` for ``up``.

The tanh GELU is written with a sigmoid, ``0.5 * (1 + tanh(z)) = sigmoid(2z)``: exact algebra, no
cancellation near zero, and no libdevice call (which Triton's CPU interpreter lacks).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from vlmtune.kernels.launch import fast_launch
from vlmtune.kernels.ops import kernel_op

_BLOCK = 1024
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_KAPPA = 0.044715
_ACTIVATIONS = {"silu": 0, "gelu_tanh": 1}


@triton.jit
def _sigmoid(x):
    # exp of a non-positive argument only, so nothing overflows for large |x|.
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _activation(g, ACTIVATION: tl.constexpr, SQRT_2_OVER_PI: tl.constexpr, KAPPA: tl.constexpr):
    """Return ``(act(g), act'(g))`` in fp32."""
    if ACTIVATION == 0:
        sig = _sigmoid(g)
        return g * sig, sig * (1.0 + g * (1.0 - sig))
    else:
        inner = SQRT_2_OVER_PI * (g + KAPPA * g * g * g)
        s = _sigmoid(2.0 * inner)
        d_inner = SQRT_2_OVER_PI * (1.0 + 3.0 * KAPPA * g * g)
        return g * s, s + 2.0 * g * s * (1.0 - s) * d_inner


@fast_launch
@triton.jit
def _gated_fwd_kernel(
    gate_ptr,
    up_ptr,
    y_ptr,
    n,
    ACTIVATION: tl.constexpr,
    SQRT_2_OVER_PI: tl.constexpr,
    KAPPA: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    act, _ = _activation(g, ACTIVATION, SQRT_2_OVER_PI, KAPPA)
    act = act.to(gate_ptr.dtype.element_ty).to(tl.float32)
    tl.store(y_ptr + offs, (act * u).to(y_ptr.dtype.element_ty), mask=mask)


@fast_launch
@triton.jit
def _gated_bwd_kernel(
    dy_ptr,
    gate_ptr,
    up_ptr,
    dgate_ptr,
    dup_ptr,
    y_ptr,
    n,
    ACTIVATION: tl.constexpr,
    STORE_Y: tl.constexpr,
    SQRT_2_OVER_PI: tl.constexpr,
    KAPPA: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # dgate_ptr may be dy_ptr: each element is read before it is written, by the same program.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    act, d_act = _activation(g, ACTIVATION, SQRT_2_OVER_PI, KAPPA)
    act = act.to(gate_ptr.dtype.element_ty).to(tl.float32)
    d_act_out = (dy * u).to(gate_ptr.dtype.element_ty).to(tl.float32)
    tl.store(dgate_ptr + offs, (d_act_out * d_act).to(dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dup_ptr + offs, (dy * act).to(dup_ptr.dtype.element_ty), mask=mask)
    if STORE_Y:
        # The forward's output again, for a caller that did not keep it (the fused LoRA MLP's down_proj).
        tl.store(y_ptr + offs, (act * u).to(y_ptr.dtype.element_ty), mask=mask)


def gated_forward(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """Launch the forward on contiguous ``gate`` and ``up``; no autograd (see :func:`swiglu` for that)."""
    y = torch.empty_like(gate, dtype=torch.promote_types(gate.dtype, up.dtype))
    n = gate.numel()
    if n:
        _gated_fwd_kernel[(triton.cdiv(n, _BLOCK),)](
            gate,
            up,
            y,
            n,
            ACTIVATION=_ACTIVATIONS[activation],
            SQRT_2_OVER_PI=_SQRT_2_OVER_PI,
            KAPPA=_KAPPA,
            BLOCK=_BLOCK,
            num_warps=4,
        )
    return y


def gated_backward(
    dy: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    activation: str,
    dgate: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dgate, dup)`` from contiguous ``dy``, ``gate``, ``up``; no autograd.

    ``dgate`` is where to write it (``dy`` itself is allowed: the kernel reads each element before writing
    it); a new tensor when None. ``y``, when given, receives the forward's output recomputed on the way.
    """
    dgate = torch.empty_like(gate) if dgate is None else dgate
    dup = torch.empty_like(up)
    n = gate.numel()
    if n:
        _gated_bwd_kernel[(triton.cdiv(n, _BLOCK),)](
            dy,
            gate,
            up,
            dgate,
            dup,
            dy if y is None else y,
            n,
            ACTIVATION=_ACTIVATIONS[activation],
            STORE_Y=y is not None,
            SQRT_2_OVER_PI=_SQRT_2_OVER_PI,
            KAPPA=_KAPPA,
            BLOCK=_BLOCK,
            num_warps=4,
        )
    return dgate, dup


class _GatedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, activation):
        gate, up = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(gate, up)
        ctx.activation = activation
        return gated_forward(gate, up, activation)

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        dgate, dup = gated_backward(dy.contiguous(), gate, up, ctx.activation)
        return dgate, dup, None


# The same launches as custom ops, for torch.compile (vlmtune.kernels.ops).
def _op_forward(gate: torch.Tensor, up: torch.Tensor, activation: str) -> list[torch.Tensor]:
    return [gated_forward(gate.contiguous(), up.contiguous(), activation)]


def _op_forward_fake(gate, up, activation):
    return [gate.new_empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype))]


def _op_backward(
    grads: list[torch.Tensor], saved: list[torch.Tensor | None], needs: list[bool], activation: str
) -> list[torch.Tensor]:
    gate, up = saved
    dgate, dup = gated_backward(grads[0].contiguous(), gate.contiguous(), up.contiguous(), activation)
    return [g for g, needed in ((dgate, needs[0]), (dup, needs[1])) if needed]


def _op_backward_fake(grads, saved, needs, activation):
    gate, up = saved
    return [g for g, needed in ((gate.new_empty(gate.shape), needs[0]), (up.new_empty(up.shape), needs[1])) if needed]


GATED_MLP = kernel_op(
    "gated_mlp",
    forward=_op_forward,
    backward=_op_backward,
    forward_fake=_op_forward_fake,
    backward_fake=_op_backward_fake,
    outputs=1,
    save_inputs=("gate", "up"),
    backward_params=("activation",),
    differentiable=("gate", "up"),
)


def _gated(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return GATED_MLP.compiled(gate, up, activation)[0]
    return _GatedFunction.apply(gate, up, activation)


def _check(gate: torch.Tensor, up: torch.Tensor) -> None:
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (Qwen2 / Llama MLP), any shape; ``gate`` and ``up`` of equal shape."""
    _check(gate, up)
    return _gated(gate, up, "silu")


def geglu_tanh(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``gelu(gate, approximate="tanh") * up`` (Gemma-3's ``gelu_pytorch_tanh`` MLP), any shape."""
    _check(gate, up)
    return _gated(gate, up, "gelu_tanh")


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Hugging Face's eager ``act_fn(gate_proj(x)) * up_proj(x)`` with ``hidden_act="silu"``."""
    return torch.nn.functional.silu(gate) * up


def geglu_tanh_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The same with ``hidden_activation="gelu_pytorch_tanh"``."""
    return torch.nn.functional.gelu(gate, approximate="tanh") * up
