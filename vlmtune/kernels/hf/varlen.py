"""Packed rows attend per sample through variable-length flash attention, not a dense block-diagonal mask.

A packed row of ``T`` tokens holds many samples. transformers turns its position restarts into a ``(1, 1, T, T)``
mask, and SDPA with a mask runs the memory-efficient kernel over all ``T x T`` scores: the attention of a step
grows with the square of the row, however short its samples. Measured on an H200 (Qwen2.5-VL-7B QLoRA, packed
LaTeX-OCR rows of ~85 tokens each): a probe step took 1.8 s at 7,520 tokens and 17 s at 30,080, and training at
28,096 ran 1,936 tokens/s. Variable-length flash attention (aten's kernel behind
``torch.nn.attention.varlen.varlen_attn``) computes each sample's causal attention alone from the row's sample
boundaries, so its cost is the sum of the samples' squares: 11,300 tokens/s at 30,080.

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

from vlmtune.data.positions import packed_attention_masks
from vlmtune.kernels.flash import flash_varlen, runs_flash

logger = logging.getLogger(__name__)

GLOBAL = "ALL_ATTENTION_FUNCTIONS"
"""The modeling modules' global that the patched attention forward reads."""


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal=True):
    """Per-sequence SDPA on ``(T, H, D)`` q and ``(T, H_kv, D)`` k/v: the contract of the flash kernel, anywhere
    (tests, CPU).

    Sequence ``i`` is queries ``cu_q[i]:cu_q[i + 1]`` against keys ``cu_k[i]:cu_k[i + 1]``; causal attention is
    only asked of sequences whose queries are their keys. ``H`` is a multiple of ``H_kv`` (grouped-query
    attention: query head ``h`` reads key/value head ``h // (H / H_kv)``).
    """
    q_bounds, k_bounds = cu_q.tolist(), cu_k.tolist()
    outputs = []
    for i in range(len(q_bounds) - 1):
        queries, keys = slice(q_bounds[i], q_bounds[i + 1]), slice(k_bounds[i], k_bounds[i + 1])
        qi, ki, vi = (t.transpose(0, 1) for t in (q[queries], k[keys], v[keys]))
        groups = qi.shape[0] // ki.shape[0]
        ki, vi = ki.repeat_interleave(groups, dim=0), vi.repeat_interleave(groups, dim=0)
        out = torch.nn.functional.scaled_dot_product_attention(qi, ki, vi, is_causal=causal, scale=scale)
        outputs.append(out.transpose(0, 1))
    return torch.cat(outputs) if outputs else q.new_zeros(0, *q.shape[1:])


KERNEL: Callable | None = None
"""The varlen implementation in use: ``None`` picks :func:`flash_varlen` where it runs; tests set
:func:`reference_varlen` to run this module's path on the CPU."""

IMAGE_BLOCKS = "packed_image_blocks"
"""The keyword of a packed row's bidirectional image blocks (:func:`vlmtune.data.positions.packed_image_blocks`),
on Gemma-3 rows built for this path."""


@functools.cache
def _announce(kernel: str) -> None:
    logger.info("packed rows: attention per sample through %s", kernel)


def varlen_attention(module, query, key, value, attention_mask, *, fallback, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention-function contract (``(B, H, T, D)`` in, ``((B, T, H, D), None)`` out) for a packed
    row: per-sample causal attention from ``cu_seq_lens_q``, each image block of ``packed_image_blocks``
    bidirectional; anything else goes to ``fallback`` (with the row's mask built on the device where the row
    came without one)."""
    cu_seq, max_len = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    blocks = kwargs.pop(IMAGE_BLOCKS, None)
    if isinstance(attention_mask, torch.Tensor) and attention_mask.numel() == 0:  # positions.empty_mask: none
        attention_mask = None
    if torch.compiler.is_compiling():
        # Compiled, the row's max length (an int) would be specialised on: a recompile per step. Compiled layers
        # get rows with masks (rope.packed_attention), so nothing here is traced but the configured function.
        return fallback(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    window = kwargs.get("sliding_window")
    kernel = KERNEL or (flash_varlen if runs_flash(query) else None)
    usable = (
        kernel is not None
        and cu_seq is not None
        and isinstance(max_len, int)
        and query.shape[0] == 1
        and query.shape[2] == key.shape[2]  # no cache: keys are the row's own
        # A window as long as the longest sample leaves every sample's attention whole.
        and (window is None or max_len <= window)
        and kwargs.get("softcap") is None
        and not (module.training and dropout)
    )
    if not usable:
        if attention_mask is None and cu_seq is not None and blocks is not None:
            attention_mask = row_mask(cu_seq, blocks, window, query.shape[2])
        return fallback(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    _announce(getattr(kernel, "__name__", str(kernel)))
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (T, H, D), k / v with their own heads
    cu = cu_seq.to(device=q.device, dtype=torch.int32)
    out = kernel(q, k, v, cu, cu, max_len, max_len, scaling, True)
    if blocks is not None and blocks["max_q"]:
        queries, keys = blocks["queries"].to(q.device), blocks["keys"].to(q.device)
        inside = kernel(
            q.index_select(0, queries),
            k.index_select(0, keys),
            v.index_select(0, keys),
            blocks["cu_q"].to(device=q.device, dtype=torch.int32),
            blocks["cu_k"].to(device=q.device, dtype=torch.int32),
            blocks["max_q"],
            blocks["max_k"],
            scaling,
            False,
        )
        out = out.index_copy(0, queries, inside)  # image queries: their image whole, not only its past
    return out.unsqueeze(0), None


def row_mask(cu_seq: torch.Tensor, blocks: dict[str, Any], window: int | None, total: int) -> torch.Tensor:
    """The ``(1, 1, T, T)`` boolean SDPA mask of a packed row that came without one, built on its device: the
    mask :func:`vlmtune.data.positions.packed_attention_masks` gives (same sample, causal or same image, within
    ``window``). Kept in the row's ``blocks`` (under ``"masks"``, by window), so one forward's layers build each
    mask once and it goes when the row does."""
    masks = blocks.setdefault("masks", {})
    if window in masks:
        return masks[window]
    bounds = cu_seq.long()
    lengths = bounds[1:] - bounds[:-1]
    sequence_ids = torch.repeat_interleave(torch.arange(len(lengths), device=cu_seq.device), lengths)
    positions = torch.arange(total, device=cu_seq.device) - bounds[sequence_ids]
    image_tokens = torch.zeros(total, dtype=torch.bool, device=cu_seq.device)
    image_tokens[blocks["queries"].to(cu_seq.device)] = True
    kind = "full_attention" if window is None else "sliding_attention"
    masks[window] = packed_attention_masks(sequence_ids, positions, image_tokens, window, "sdpa")[kind]
    return masks[window]


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
