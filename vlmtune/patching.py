"""The one way vlmtune swaps a module's forward: on the instance, undoable, deepcopy- and pickle-safe.

    undo = swap_forward(module, "_vlmtune_no_grad", no_grad_forward)   # no_grad_forward(module, *args, **kwargs)
    ...                                                                # module(x) runs no_grad_forward
    undo()                                                             # module.forward is again what it was

Every part of vlmtune that changes what a module computes (the kernels, a frozen tower's ``no_grad``, the
CPU-resident embedding, the vision micro-batches, activation offload, MiniCPM-V 4.6's per-sample DeltaNet) goes
through :func:`swap_forward`. The class and every other instance are untouched, nothing is patched in source
text, and no module global is ever replaced (:func:`with_global` gives a function its own copy instead).

What a swap stores lives in the module's ``__dict__``: a :class:`Swap` under the swap's key (the forward the
module had, and the new forward's data) and a :class:`SwappedForward` as ``forward``. Both refer to the module
only as an attribute, never through a closure, so ``copy.deepcopy`` of a model gives a copy whose swaps run the
copy's weights, and ``pickle`` / ``torch.save`` carry them (the new forward must then be a module-level
function). Swaps stack: the newest wraps the one before and must be undone first.
"""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Swap:
    """What one swap keeps on the module, under its key.

    Attributes:
        inner: the forward the module had (call it for the original behaviour).
        data: whatever the new forward needs (kernel functions, settings).
        saved: the instance ``forward`` attribute before the swap, or ``None`` when the class forward ran (a
            marker object would not survive a copy).
        installed: the :class:`SwappedForward` this swap put in place.
    """

    inner: Callable
    data: Any
    saved: Any
    installed: SwappedForward


class SwappedForward(functools.partial):
    """A module's instance ``forward``: ``function(module, *args, **kwargs)``, built as
    ``SwappedForward(function, module, key=...)``.

    It advertises the replaced forward's signature, so code that inspects ``model.forward`` (``Trainer`` looking
    for ``num_items_in_batch``, ``generate`` for ``logits_to_keep``) sees what it saw before the swap.

    A ``functools.partial`` rather than an object with a ``__call__``: dynamo guards on the identity of a callable
    object it meets, so every swapped layer would be a graph of its own under ``torch.compile`` (34 compiles for 34
    decoder layers); a partial is guarded on its function and arguments, the same for every layer of a tower. The
    partial's own pickling and copying carry the module and the key.
    """

    def __new__(cls, function: Callable, module: torch.nn.Module, *, key: str):
        self = super().__new__(cls, function, module)
        self.key = key
        return self

    def __reduce__(self):
        # partial's reduce rebuilds with type(self)(function) and sets the rest as state; __new__ needs the key.
        return _rebuild_swapped, (self.func, self.module, self.key)

    @property
    def module(self) -> torch.nn.Module:
        return self.args[0]

    @property
    def function(self) -> Callable:
        return self.func

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(self.module.__dict__[self.key].inner)

    def __repr__(self) -> str:
        return f"<forward {self.function.__qualname__} swapped in as {self.key!r} on {type(self.module).__name__}>"


def _rebuild_swapped(function: Callable, module: torch.nn.Module, key: str) -> SwappedForward:
    return SwappedForward(function, module, key=key)


def swap_forward(module: torch.nn.Module, key: str, forward: Callable, data: Any = None) -> Callable[[], None]:
    """Make ``forward(module, *args, **kwargs)`` the forward of ``module`` until undone.

    Args:
        module: the instance to change.
        key: the swap's name, an attribute of the module while it lasts (``"_vlmtune_<what>"``); the new forward
            reads its :class:`Swap` with :func:`swap_of` (``.inner`` is the previous forward, ``.data`` its data).
        forward: a function taking the module first; module-level, so that a swapped model pickles.
        data: stored on the swap for ``forward``.

    Returns:
        A function undoing this swap (see :func:`restore`).

    Raises:
        ValueError: when ``module`` already carries a swap named ``key``.
    """
    if key in module.__dict__:
        raise ValueError(f"{type(module).__name__} already has a forward swapped in as {key!r}; undo it first")
    installed = SwappedForward(forward, module, key=key)
    module.__dict__[key] = Swap(module.forward, data, module.__dict__.get("forward"), installed)
    module.__dict__["forward"] = installed
    return functools.partial(restore, module, key)


def swap_of(module: torch.nn.Module, key: str) -> Swap | None:
    """The swap named ``key`` on ``module``, or ``None``."""
    return module.__dict__.get(key)


def restore(module: torch.nn.Module, key: str) -> None:
    """Undo the swap ``key`` of ``module``: its forward is again the very object it was. A no-op when not swapped.

    Raises:
        RuntimeError: when a newer swap sits on top of this one (undo that one first).
    """
    swap = module.__dict__.get(key)
    if swap is None:
        return
    if module.__dict__.get("forward") is not swap.installed:
        current = module.__dict__.get("forward")
        raise RuntimeError(f"{key!r} of {type(module).__name__} is under another forward ({current!r}); undo it first")
    del module.__dict__[key]
    if swap.saved is None:
        del module.__dict__["forward"]
    else:
        module.__dict__["forward"] = swap.saved


def swapped_modules(model: torch.nn.Module, key: str) -> list[str]:
    """Names of the modules of ``model`` that carry the swap ``key`` (``""`` is ``model`` itself)."""
    return [name for name, module in model.named_modules() if key in module.__dict__]


def with_global(function: Callable, name: str, value: Any) -> Callable:
    """A copy of ``function`` that sees ``value`` as its global ``name``; the function and its module are untouched.

    ``function`` may be wrapped by decorators built with ``functools.wraps`` (transformers' ``deprecate_kwarg``
    on attention forwards): each wrapper is copied too, with its closure pointing at the copy inside it. The
    copy's globals are a snapshot of the module's, taken now.

    Raises:
        ValueError: when ``function`` does not read the global ``name``, or a wrapper does not hold the function
            it wraps in its closure (the caller should then leave the module alone).
    """
    inner = getattr(function, "__wrapped__", None)
    if inner is None:
        if name not in function.__code__.co_names:
            raise ValueError(f"{function.__qualname__} does not read the global {name!r}")
        namespace = dict(function.__globals__)
        namespace[name] = value
        # Without its module's name, the snapshot is its own namespace to torch.compile: dynamo (torch 2.11) reads
        # a globals dict that carries ``__name__`` as that module, and guards on the module's ``name``, which
        # this copy does not read ("'function' object has no attribute 'args'" when compiling a patched layer).
        # The copy keeps its ``__module__`` (set below) for pickling and repr.
        namespace.pop("__name__", None)
        return _copy_function(function, namespace, function.__closure__)
    cells = function.__closure__ or ()
    if not any(_holds(cell, inner) for cell in cells):
        raise ValueError(f"the wrapper {function.__qualname__} does not hold {inner.__qualname__} in its closure")
    new_inner = with_global(inner, name, value)
    closure = tuple(types.CellType(new_inner) if _holds(cell, inner) else cell for cell in cells)
    copy = _copy_function(function, function.__globals__, closure)
    copy.__wrapped__ = new_inner
    return copy


def _holds(cell: types.CellType, value: Any) -> bool:
    try:
        return cell.cell_contents is value
    except ValueError:  # an empty cell
        return False


def _copy_function(function: types.FunctionType, namespace: dict, closure: tuple | None) -> types.FunctionType:
    copy = types.FunctionType(function.__code__, namespace, function.__name__, function.__defaults__, closure)
    copy.__kwdefaults__ = function.__kwdefaults__
    copy.__dict__.update(function.__dict__)
    copy.__qualname__, copy.__module__, copy.__doc__ = function.__qualname__, function.__module__, function.__doc__
    copy.__annotations__ = function.__annotations__
    return copy
