"""Positions and attention masks of padding-free packed rows, for the families' packing rules.

A packed row holds several samples one after another (:mod:`vlmtune.data.packing`); each family's ``pack``
function (its descriptor) uses these to keep attention inside each sample.
"""

from __future__ import annotations

from typing import Any

import torch


def packed_sequence_ids(lengths: list[int]) -> torch.Tensor:
    """``(T,)`` index of the sample each token of a packed row belongs to."""
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))


def text_positions(lengths: list[int]) -> torch.Tensor:
    """``(T,)`` positions restarting at 0 with every sample."""
    return torch.cat([torch.arange(n) for n in lengths])


def packed_row_keywords(lengths: list[int]) -> dict[str, Any]:
    """A packed row's sample boundaries under transformers' flash-attention keyword names: ``cu_seq_lens_q`` /
    ``_k`` ``(n + 1,)`` int32 and ``max_length_q`` / ``_k``; built on the host, so no layer syncs to read them."""
    bounds = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    longest = max(lengths)
    return {"cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds, "max_length_q": longest, "max_length_k": longest}


def empty_mask() -> torch.Tensor:
    """A 4-D attention mask of no size, for a packed row whose attention runs per sample from its boundaries.

    transformers' ``create_causal_mask`` passes a 4-D mask through as already prepared, so a text model that
    always calls it (Qwen3-VL's) builds no ``(T, T)`` mask for its layers to ignore (0.9 GB at 30k tokens); the
    varlen attention (:mod:`vlmtune.kernels.hf.varlen`) reads it as no mask, and a layer it cannot take builds
    the row's mask on the device.
    """
    return torch.zeros(1, 1, 0, 0, dtype=torch.bool)


def packed_image_blocks(lengths: list[int], image_tokens: torch.Tensor) -> dict[str, Any]:
    """Each image of a packed row as one bidirectional attention block, in the varlen layout (built on the host).

    A Gemma-3 image token attends to every earlier token of its sample and to the whole of its image: queries
    ``[a, b)`` (the image's tokens in the row) against keys ``[s, b)`` (from the start ``s`` of its sample to
    the image's end), with no causal mask. Returns ``queries`` / ``keys``: ``int64`` row indices of every block's
    queries and keys, block after block; ``cu_q`` / ``cu_k``: ``(n + 1,)`` ``int32`` boundaries into them;
    ``max_q`` / ``max_k``: the longest block's counts (0 for a row without images).
    """
    tokens = image_tokens.tolist()
    starts = torch.tensor([0, *lengths]).cumsum(0).tolist()
    queries, keys, q_counts, k_counts = [], [], [0], [0]
    for sample_start, sample_end in zip(starts[:-1], starts[1:], strict=True):
        i = sample_start
        while i < sample_end:
            if not tokens[i]:
                i += 1
                continue
            end = i
            while end < sample_end and tokens[end]:
                end += 1
            queries.append(torch.arange(i, end))
            keys.append(torch.arange(sample_start, end))
            q_counts.append(end - i)
            k_counts.append(end - sample_start)
            i = end
    empty = torch.zeros(0, dtype=torch.long)
    return {
        "queries": torch.cat(queries) if queries else empty,
        "keys": torch.cat(keys) if keys else empty,
        "cu_q": torch.tensor(q_counts).cumsum(0).to(torch.int32),
        "cu_k": torch.tensor(k_counts).cumsum(0).to(torch.int32),
        "max_q": max(q_counts),
        "max_k": max(k_counts),
    }


def image_block_ids(image_tokens: torch.Tensor) -> torch.Tensor:
    """``(T,)`` one id per run of image tokens (an image), -1 on text; as Gemma-3's ``token_type_ids`` blocks."""
    starts = image_tokens & ~torch.nn.functional.pad(image_tokens, (1, 0))[:-1]
    return torch.where(image_tokens, starts.long().cumsum(0) - 1, -1)


def packed_attention_masks(
    sequence_ids: torch.Tensor,
    positions: torch.Tensor,
    image_tokens: torch.Tensor,
    sliding_window: int | None,
    attn_implementation: str,
) -> dict[str, torch.Tensor]:
    """4-D masks ``(1, 1, T, T)`` for a packed row, per layer type, as Gemma-3 composes them unpacked.

    ``full_attention``: same sample and (causal or same image); ``sliding_attention``: that and the key within
    ``sliding_window`` positions (transformers 5.x: AND(sliding window, OR(causal, blockwise))). Boolean
    (True attends) for SDPA, additive ``float32`` (0 or the dtype's minimum) for eager attention.
    """
    same_sample = sequence_ids[:, None] == sequence_ids[None, :]
    blocks = image_block_ids(image_tokens)
    same_image = (blocks[:, None] == blocks[None, :]) & (blocks[:, None] >= 0)
    causal = positions[None, :] <= positions[:, None]
    masks = {"full_attention": same_sample & (causal | same_image)}
    if sliding_window is not None:
        in_window = positions[None, :] > positions[:, None] - sliding_window
        masks["sliding_attention"] = masks["full_attention"] & in_window
    if attn_implementation == "eager":
        low = torch.finfo(torch.float32).min
        return {k: torch.zeros(m.shape).masked_fill(~m, low)[None, None] for k, m in masks.items()}
    return {k: m[None, None] for k, m in masks.items()}
