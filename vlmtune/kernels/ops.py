"""Declare a kernel once as a pair of PyTorch custom ops, so ``torch.compile`` traces it as one node per direction.

Dynamo cannot trace a Triton launch through :mod:`vlmtune.kernels.launch` (nor should it: the launcher's host-time
savings are what eager mode needs). A kernel module therefore declares its op with :func:`kernel_op`, from plain
functions it already has:

    def _norm_forward(x: Tensor, weight: Tensor, eps: float) -> list[Tensor]:
        ...  # the launch; returns [y, rstd]: the outputs, then what backward needs
    def _norm_backward(grads: list[Tensor], saved: list[Optional[Tensor]], needs: list[bool], eps: float)
        -> list[Tensor]:
        ...  # one gradient per True in needs, in `differentiable` order
    NORM = kernel_op(
        "rms_norm", forward=_norm_forward, backward=_norm_backward, forward_fake=..., backward_fake=...,
        outputs=1, save_inputs=("x", "weight"), backward_params=("eps",), differentiable=("x", "weight"),
    )
    y = NORM(x, weight, eps)[0]

That registers ``vlmtune::rms_norm`` (the forward) and ``vlmtune::rms_norm_backward`` with their fake (shape)
functions, and the forward's autograd formula, which calls the backward op. ``NORM(...)`` runs the custom op while
``torch.compile`` traces (``torch.compiler.is_compiling()``) and, in eager mode, an ``autograd.Function`` over the
same two functions: a custom op's dispatch costs tens of microseconds of Python per call, which a host-bound
step cannot afford. Modules with a hand-written ``autograd.Function`` keep it for eager mode and call
:meth:`KernelOp.compiled` under compile; both run the same launches.

The schema is inferred from the two functions' annotations: tensors, optional tensors, lists of either, ints,
floats, bools, strings and dtypes. Anything else (a bitsandbytes ``QuantState``, a tuple of LoRA projections) is
taken apart into those by the caller, as :func:`vlmtune.kernels.lora_linear.nf4_args` does.

Rules the functions follow (``torch.library.opcheck`` checks them): outputs are fresh tensors, never an input or a
view of one (save inputs with ``save_inputs`` instead); the fakes give the real functions' shapes, dtypes and
strides; the forward never depends on ``requires_grad`` (pass such a flag as a parameter).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

NAMESPACE = "vlmtune"


def leading_rows(x: torch.Tensor) -> int:
    """The number of rows of ``x`` seen as ``(rows, x.shape[-1])``, for fake functions.

    ``torch.Size.numel()`` turns symbolic sizes into constants (dynamo then guards on every length it saw, and a
    new sequence length recompiles the layer); a product of the sizes stays symbolic.
    """
    return math.prod(x.shape[:-1])


@dataclass
class KernelOp:
    """A kernel's forward and backward custom ops, with eager and compiled entry points.

    Attributes:
        name: the forward op is ``torch.ops.vlmtune.<name>``, the backward ``torch.ops.vlmtune.<name>_backward``.
        forward_op: the forward custom op: ``(*inputs) -> [*outputs, *residuals]``.
        backward_op: the backward custom op: ``(grads, saved, needs, *backward_params) -> [grad per needed input]``.
        forward_impl / backward_impl: the functions the two ops run (the eager path calls them directly).
        outputs: how many of the forward's results are outputs (the rest are residuals for backward).
        save_inputs / backward_params / differentiable: indices into the forward's inputs (see :func:`kernel_op`).
        non_differentiable: indices of outputs that carry no gradient.
    """

    name: str
    forward_op: Any
    backward_op: Any
    forward_impl: Callable[..., list[torch.Tensor]]
    backward_impl: Callable[..., list[torch.Tensor]]
    outputs: int
    save_inputs: tuple[int, ...]
    backward_params: tuple[int, ...]
    differentiable: tuple[int, ...]
    non_differentiable: tuple[int, ...]
    n_inputs: int
    _eager: type = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._eager = _eager_function(self)

    def __call__(self, *args: Any) -> list[torch.Tensor]:
        """The op's outputs: the custom op under ``torch.compile``, the eager ``autograd.Function`` otherwise."""
        if torch.compiler.is_compiling():
            return self.compiled(*args)
        return list(self._eager.apply(*args))

    def compiled(self, *args: Any) -> list[torch.Tensor]:
        """The op's outputs through the custom op (what a compiled graph records), residuals left out."""
        return self.forward_op(*args)[: self.outputs]

    def _saved(self, inputs: Sequence[Any], results: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
        return [inputs[i] for i in self.save_inputs] + list(results[self.outputs :])

    def _needs(self, needs_input_grad: Sequence[bool]) -> list[bool]:
        return [bool(needs_input_grad[i]) for i in self.differentiable]

    @staticmethod
    def _grad_template(inputs: Sequence[Any]) -> list[Any]:
        """The structure a custom op's backward returns its gradients in: a list of Nones for an input that is a list
        of tensors, None for any other input (``torch._library.autograd`` flattens them that way)."""
        return [
            [None] * len(a) if isinstance(a, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in a) else None
            for a in inputs
        ]

    def _input_grads(self, template: list[Any], needs: list[bool], grads: Sequence[torch.Tensor]) -> tuple[Any, ...]:
        """The backward op's gradients (one per needed input) spread over every input, None elsewhere."""
        full = list(template)
        it = iter(grads)
        for index, needed in zip(self.differentiable, needs, strict=True):
            if needed:
                full[index] = next(it)
        return tuple(full)


def _eager_function(op: KernelOp) -> type:
    """An ``autograd.Function`` running the op's two implementations directly (no dispatcher)."""
    forward_impl, backward_impl = op.forward_impl, op.backward_impl

    class _Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            results = forward_impl(*inputs)
            ctx.save_for_backward(*op._saved(inputs, results))
            ctx.params = [inputs[i] for i in op.backward_params]
            ctx.template = [None] * len(inputs)  # a Function's non-tensor inputs (lists too) take None
            outputs = results[: op.outputs]
            ctx.mark_non_differentiable(*[outputs[i] for i in op.non_differentiable])
            return tuple(outputs)

        @staticmethod
        def backward(ctx, *grads):
            needs = op._needs(ctx.needs_input_grad)
            if not any(needs):
                return tuple(ctx.template)
            return op._input_grads(
                ctx.template, needs, backward_impl(list(grads), list(ctx.saved_tensors), needs, *ctx.params)
            )

    _Eager.__name__ = _Eager.__qualname__ = f"{op.name}_function"
    return _Eager


def _setup_context(op: KernelOp):
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*op._saved(inputs, output))
        ctx.params = [inputs[i] for i in op.backward_params]
        ctx.template = op._grad_template(inputs)
        ctx.mark_non_differentiable(*[output[i] for i in range(op.outputs, len(output))])
        ctx.mark_non_differentiable(*[output[i] for i in op.non_differentiable])

    return setup_context


def _autograd_backward(op: KernelOp):
    def backward(ctx, grads):
        needs = op._needs(ctx.needs_input_grad)
        if not any(needs):
            return tuple(ctx.template)
        return op._input_grads(
            ctx.template, needs, op.backward_op(list(grads[: op.outputs]), list(ctx.saved_tensors), needs, *ctx.params)
        )

    return backward


def kernel_op(
    name: str,
    *,
    forward: Callable[..., list[torch.Tensor]],
    backward: Callable[..., list[torch.Tensor]],
    forward_fake: Callable[..., list[torch.Tensor]],
    backward_fake: Callable[..., list[torch.Tensor]],
    outputs: int,
    save_inputs: Sequence[str] = (),
    backward_params: Sequence[str] = (),
    differentiable: Sequence[str] = (),
    non_differentiable: Sequence[int] = (),
) -> KernelOp:
    """Register ``vlmtune::<name>`` and ``vlmtune::<name>_backward`` and the autograd formula joining them.

    Args:
        name: the op's name (the kernel module's op name, e.g. ``"rms_norm"``).
        forward: ``(*inputs) -> list[Tensor]``, annotated: the ``outputs`` outputs, then residuals for backward.
        backward: ``(grads: list[Tensor], saved: list[Optional[Tensor]], needs: list[bool], *params) ->
            list[Tensor]``: ``grads`` of the outputs (zeros where unused), ``saved`` the ``save_inputs`` then the
            residuals, ``needs`` one flag per ``differentiable`` input, ``params`` the ``backward_params``;
            returns one gradient per True in ``needs``.
        forward_fake / backward_fake: the same signatures, returning empty tensors of the real results' shapes,
            dtypes and strides (they run on fake tensors while ``torch.compile`` traces).
        outputs: how many of ``forward``'s results are outputs.
        save_inputs: names of forward inputs that backward reads (tensors or None).
        backward_params: names of forward inputs passed on to backward as they are (settings: floats, ints ...).
        differentiable: names of forward inputs that may receive a gradient, in ``backward``'s output order.
        non_differentiable: indices of outputs that carry no gradient (logits returned for evaluation ...).

    Returns:
        The :class:`KernelOp`.
    """
    forward_op = torch.library.custom_op(f"{NAMESPACE}::{name}", forward, mutates_args=())
    forward_op.register_fake(forward_fake)
    backward_op = torch.library.custom_op(f"{NAMESPACE}::{name}_backward", backward, mutates_args=())
    backward_op.register_fake(backward_fake)
    names = list(inspect.signature(forward).parameters)
    index = {n: i for i, n in enumerate(names)}

    def indices(which: Sequence[str]) -> tuple[int, ...]:
        unknown = [n for n in which if n not in index]
        if unknown:
            raise ValueError(f"{name}: {unknown} are not parameters of its forward {list(index)}")
        return tuple(index[n] for n in which)

    op = KernelOp(
        name=name,
        forward_op=forward_op,
        backward_op=backward_op,
        forward_impl=forward,
        backward_impl=backward,
        outputs=outputs,
        save_inputs=indices(save_inputs),
        backward_params=indices(backward_params),
        differentiable=indices(differentiable),
        non_differentiable=tuple(non_differentiable),
        n_inputs=len(names),
    )
    forward_op.register_autograd(_autograd_backward(op), setup_context=_setup_context(op))
    return op
