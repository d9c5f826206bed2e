"""Packed rows attend per sample through variable-length flash attention, not a dense block-diagonal mask.

A packed row of ``T`` tokens holds many samples. transformers turns its position restarts into a ``(1, 1, T, T)``
mask, and SDPA with a mask runs the memory-efficient kernel over all ``T x T`` scores: the attention of a step
grows with the square of the row, however short its samples. Measured on an H200 (Qwen2.5-VL-7B QLoRA, packed
LaTeX-OCR rows of ~85 tokens each): a probe step took 1.8 s at 7,520 tokens and 17 s at 30,080, and training at
28,096 ran 1,936 tokens/s. ``torch.nn.attention.varlen.varlen_attn`` computes each sample's causal attention alone
from the row's sample boundaries, so its cost is the sum of the samples' squares: 11,300 tokens/s at 30,080.

The boundaries travel as transformers' flash-attention keyword arguments (``cu_seq_lens_q`` / ``_k``,
``max_length_q`` / ``_k``). The family's ``pack`` function adds them to a packed batch on the host
(:func:`vlmtune.data.positions.packed_row_keywords`, so no layer syncs to read them), and transformers hands them
down to every attention call. The language tower's patched attention forward (:mod:`vlmtune.kernels.hf.rope`
builds it) sees :class:`AttentionFunctions` as its ``ALL_ATTENTION_FUNCTIONS``: the configured function as
before, except on a packed row the flash kernel can run (CUDA, 16-bit, no sliding window, not inside a
``torch.compile`` graph), where :func:`varlen_attention` runs instead. Without the kernels, or where it cannot
run, the mask path computes the same attention.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch
from packaging.version import Version

logger = logging.getLogger(__name__)

GLOBAL = "ALL_ATTENTION_FUNCTIONS"
"""The modeling modules' global that the patched attention forward reads."""


@functools.cache
def _release(version: str) -> tuple[int, ...]:
    """``torch.__version__``'s release numbers, parsed once (the attention path asks at every layer)."""
    return Version(version).release


def _flash_varlen() -> Callable | None:
    if _release(torch.__version__) < (2, 10):  # torch.nn.attention.varlen came in 2.10
        return None
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn


def _flash_keywords(scale: float | None, head_dim: int) -> dict[str, Any] | None:
    """How this torch's ``varlen_attn`` asks for causal attention at ``scale``; ``None`` where it cannot.

    torch 2.10 takes ``is_causal`` and no scale (the default ``head_dim ** -0.5`` only); 2.11 replaced ``is_causal``
    with ``window_size`` and added ``scale``.
    """
    if _release(torch.__version__) >= (2, 11):
        return {"window_size": (-1, 0), "scale": scale}
    if scale is not None and abs(scale - head_dim**-0.5) > 1e-6 * scale:
        return None
    return {"is_causal": True}


def reference_varlen(q, k, v, cu_seq, max_len, scale):
    """Per-sample causal SDPA on ``(T, H, D)`` q/k/v: the contract of the flash kernel, anywhere (tests, CPU)."""
    bounds = cu_seq.tolist()
    outputs = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)
        outputs.append(out.transpose(0, 1))
    return torch.cat(outputs)


def flash_varlen(q, k, v, cu_seq, max_len, scale):
    return _flash_varlen()(q, k, v, cu_seq, cu_seq, max_len, max_len, **_flash_keywords(scale, q.shape[-1]))


def runs_flash(query: torch.Tensor, scale: float | None = None) -> bool:
    """Whether the flash kernel takes these queries (the device, dtype, head size and scale it is built for)."""
    return (
        _flash_varlen() is not None
        and query.is_cuda
        and query.dtype in (torch.float16, torch.bfloat16)
        and query.shape[-1] <= 256
        and _flash_keywords(scale, query.shape[-1]) is not None
    )


KERNEL: Callable | None = None
"""The varlen implementation in use: ``None`` picks :func:`flash_varlen` where it runs; tests set
:func:`reference_varlen` to run this module's path on the CPU."""


@functools.cache
def _announce(kernel: str) -> None:
    logger.info("packed rows: attention per sample through %s", kernel)


def varlen_attention(module, query, key, value, attention_mask, *, fallback, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention-function contract (``(B, H, T, D)`` in, ``((B, T, H, D), None)`` out) for a packed
    row: per-sample causal attention from ``cu_seq_lens_q``; anything else goes to ``fallback``."""
    cu_seq, max_len = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    kernel = KERNEL or (flash_varlen if runs_flash(query, scaling) else None)
    usable = (
        kernel is not None
        # Compiled, the row's max length (an int) would be specialised on: a recompile per step. Mask path there.
        and not torch.compiler.is_compiling()
        and cu_seq is not None
        and isinstance(max_len, int)
        and query.shape[0] == 1
        and query.shape[2] == key.shape[2]  # no cache: keys are the row's own
        and kwargs.get("sliding_window") is None
        and kwargs.get("softcap") is None
        and not (module.training and dropout)
    )
    if not usable:
        return fallback(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    _announce(getattr(kernel, "__name__", str(kernel)))
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (T, H, D)
    if k.shape[1] != q.shape[1]:  # grouped-query attention: every query head gets its key/value head
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    out = kernel(q, k, v, cu_seq.to(device=q.device, dtype=torch.int32), max_len, scaling)
    return out.unsqueeze(0), None


class AttentionFunctions:
    """Stands for transformers' ``ALL_ATTENTION_FUNCTIONS`` in a patched attention forward: every lookup gives
    the configured function with the packed-row path in front of it."""

    def __init__(self, functions):
        self._functions = functions

    def get_interface(self, name: str, default: Callable) -> Callable:
        return functools.partial(varlen_attention, fallback=self._functions.get_interface(name, default))

    def __getitem__(self, name: str) -> Callable:
        return functools.partial(varlen_attention, fallback=self._functions[name])

    def __getattr__(self, name: str) -> Any:
        return getattr(self._functions, name)
