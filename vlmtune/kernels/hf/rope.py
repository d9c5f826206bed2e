"""``rope``: the language tower's attention modules rotate q / k with :func:`vlmtune.kernels.rope.apply_rope`.

An attention forward calls its modeling module's global ``apply_rotary_pos_emb``. Replacing that global, for good
or for the length of a call, would change (or race with) every other model of the family in the process; so each
patched attention runs its class's forward copied with its own globals, where ``apply_rotary_pos_emb`` is the
kernel (:func:`vlmtune.patching.with_global`). The copy is taken once per patch; gradient checkpointing's
recomputation re-enters the same patched module, so it runs the same function. The copy also sees the packed-row
attention functions of :mod:`vlmtune.kernels.hf.varlen` as its ``ALL_ATTENTION_FUNCTIONS``.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable

from vlmtune.kernels.hf import varlen
from vlmtune.kernels.hf.common import KERNEL, find_kernel, style, swap
from vlmtune.patching import swap_of, with_global

# rope_kind -> kernel name in vlmtune.kernels.rope. Qwen-VL's M-RoPE needs no kernel of its own in
# transformers 5.x (read in 5.17 and 5.23): its rotary module merges the mrope sections before returning, so
# attention gets plain (B, T, D) cos/sin and calls the same apply_rotary_pos_emb as Gemma-3.
_ROPE_STYLES = {"standard": "apply_rope", "mrope": "apply_rope"}
_ROPE_FUNCTION = "apply_rotary_pos_emb"


@dataclasses.dataclass
class _RopeData:
    """The attention class and the kernel; the class forward that sees the kernel is built on first use.

    Only the recipe is copied or pickled with a patched model (the built function is a per-process object that
    pickle cannot name), and a deep copy builds its own.
    """

    attention_class: type
    kernel: Callable
    _forward: Callable | None = None
    per_sample: bool = False
    """Whether the built forward sees the packed-row attention functions (set when it is built)."""

    def forward(self) -> Callable:
        if self._forward is None:
            original = getattr(sys.modules[self.attention_class.__module__], _ROPE_FUNCTION)
            rotate = functools.partial(_rope_or_fallback, kernel=self.kernel, fallback=original)
            forward = with_global(self.attention_class.forward, _ROPE_FUNCTION, rotate)
            functions = getattr(sys.modules[self.attention_class.__module__], varlen.GLOBAL, None)
            if functions is not None and varlen.GLOBAL in _read_globals(self.attention_class.forward):
                # Packed rows attend per sample through the varlen kernel (vlmtune.kernels.hf.varlen).
                forward = with_global(forward, varlen.GLOBAL, varlen.AttentionFunctions(functions))
                self.per_sample = True
            self._forward = forward
        return self._forward

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_forward": None}


def apply(base, language, family, patch) -> None:
    kernel = find_kernel("rope", style(_ROPE_STYLES, family.rope_kind, "rope_kind", family))
    for name, module in language:
        modeling = sys.modules.get(type(module).__module__)
        if not type(module).__name__.endswith("Attention") or getattr(modeling, _ROPE_FUNCTION, None) is None:
            continue
        if "forward" in module.__dict__:
            patch.skipped[name] = "rope: the attention already has an instance forward"
            continue
        data = _RopeData(type(module), kernel)
        try:
            data.forward()
        except ValueError as error:  # a forward that does not call the global, or a decorator it cannot copy
            patch.skipped[name] = f"rope: {error}"
            continue
        swap(module, _rope_attention_forward, patch, data)
        patch.patched["rope"].append(name)


def _read_globals(function: Callable) -> set[str]:
    """The global names ``function`` reads, through ``functools.wraps`` decorators."""
    names: set[str] = set()
    while function is not None:
        names.update(function.__code__.co_names)
        function = getattr(function, "__wrapped__", None)
    return names


def _rope_attention_forward(self, *args, **kwargs):
    return swap_of(self, KERNEL).data.forward()(self, *args, **kwargs)


def _rope_or_fallback(q, k, cos, sin, *args, kernel, fallback, **kwargs):
    """The kernel for the ``(B, H, T, D)`` q/k and ``(B|1, T, D)`` cos/sin it supports, else the original."""
    supported = (
        not args
        and set(kwargs) <= {"unsqueeze_dim"}
        and kwargs.get("unsqueeze_dim", 1) == 1
        and q.dim() == 4
        and k.dim() == 4
        and cos.dim() == 3
        and cos.shape == sin.shape
        and cos.shape[0] in (1, q.shape[0])
        and cos.shape[1:] == q.shape[2:]  # rotates the whole head (no partial rotary)
    )
    if not supported:
        return fallback(q, k, cos, sin, *args, **kwargs)
    return kernel(q, k, cos, sin)


def packed_attention(model, family, compiled: bool = False) -> str:
    """The attention that ``model``'s packed rows are built for (:class:`vlmtune.data.packing.PackedCollator`):
    ``"varlen"`` where every attention module of the language tower runs the rope op's forward, whose packed-row
    functions attend per sample from the row's boundaries (:mod:`vlmtune.kernels.hf.varlen`), so a family that
    builds dense masks on the host (Gemma-3) leaves them out; else the model's own implementation.

    ``compiled``: the language tower's layers are compiled, which keeps the mask path (so the masks are needed).
    """
    from vlmtune.kernels.patch import _base_model

    attn = getattr(model.config, "_attn_implementation", None) or "sdpa"
    if compiled or attn != "sdpa":
        return attn
    base = _base_model(model)
    attentions = [
        module
        for name, module in base.named_modules()
        if family.tower_of(name) == "language" and varlen.GLOBAL in _read_globals(type(module).forward)
    ]
    return "varlen" if attentions and all(_attends_per_sample(m) for m in attentions) else attn


def _attends_per_sample(module) -> bool:
    data = getattr(swap_of(module, KERNEL), "data", None)
    if not isinstance(data, _RopeData):
        return False
    data.forward()  # built on first use, which is when per_sample is decided
    return data.per_sample
