"""Padding-free packing: several samples in one row, attention kept inside each sample.

Two parts:

* :func:`pack_lengths` groups sample indices into bins under a token budget (images counted: a sample's length
  is its ``input_ids`` length, image tokens included, as :class:`~vlmtune.data.collator.PreparedDataset`
  records it).
* :class:`PackedCollator` encodes the samples of one bin and concatenates them into a single row of batch size
  1 with no pad token. Positions restart at 0 with every sample; the first label of every sample is -100 so that
  no sample is trained to predict the next one's first token.

How attention stays inside each sample is per family (the ``PACKING`` table, keyed by ``adapter.name``):

* Qwen-VL: no ``attention_mask``; ``position_ids`` is ``(4, 1, T)``: row 0 the text positions restarting per
  sample, rows 1-3 the M-RoPE positions of each sample computed alone. ``Qwen2_5_VLTextModel.forward`` (and
  Qwen3-VL's) reads a 4-row tensor as "packed, text positions first" and hands row 0 to ``create_causal_mask``,
  whose ``find_packed_sequence_indices`` turns each restart into a new sequence (transformers >= 4.54).
* Gemma-3: ``attention_mask`` is a dict ``{"full_attention": mask, "sliding_attention": mask}`` of 4-D masks built
  here, which ``Gemma3Model.forward`` passes through unchanged ("may already have been prepared"). transformers'
  own packed path is wrong for the sliding layers: it composes ``blockwise_overlay(block_sequence_ids)`` as an
  ``or_mask_function``, and the packed remap then feeds that overlay per-sample positions instead of row indices,
  so image bidirectionality lands on the wrong tokens (checked in 5.23's ``create_masks_for_vision_model``). The
  masks cost ``T * T`` booleans (``float32`` for eager) per layer type: 64 MiB at T = 8192 in bool.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from vlmtune.adapters.base import ImageBatch
from vlmtune.data.collator import IGNORE_INDEX, Collator, Encoded

STRATEGIES = ("first_fit", "greedy")


def pack_lengths(lengths: list[int], budget: int, strategy: str = "first_fit") -> list[list[int]]:
    """Group sample indices into bins whose summed length is at most ``budget``.

    Args:
        lengths: tokens per sample, images included.
        budget: most tokens per packed row.
        strategy: ``"first_fit"``: first-fit decreasing (longest first, each into the first bin it fits; ties
            keep index order), at most 11/9 OPT + 6/9 bins; ``"greedy"``: in index order, a new bin whenever the
            next sample does not fit the current one (keeps dataset order, wastes more).

    Returns:
        Bins of sample indices, deterministic for the same input; within a bin, indices ascend.

    Raises:
        ValueError: on a non-positive budget, an unknown strategy, or a sample longer than the budget.
    """
    if budget < 1:
        raise ValueError(f"budget must be positive, got {budget}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    for index, length in enumerate(lengths):
        if length > budget:
            raise ValueError(f"sample {index} has {length} tokens, more than the packing budget of {budget}")
    bins: list[list[int]] = []
    if strategy == "greedy":
        total = 0
        for index, length in enumerate(lengths):
            if not bins or total + length > budget:
                bins.append([])
                total = 0
            bins[-1].append(index)
            total += length
        return bins
    totals: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        target = next((b for b, total in enumerate(totals) if total + lengths[index] <= budget), None)
        if target is None:
            bins.append([])
            totals.append(0)
            target = len(bins) - 1
        bins[target].append(index)
        totals[target] += lengths[index]
    return [sorted(b) for b in bins]


def packed_sequence_ids(lengths: list[int]) -> torch.Tensor:
    """``(T,)`` index of the sample each token of a packed row belongs to."""
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))


def text_positions(lengths: list[int]) -> torch.Tensor:
    """``(T,)`` positions restarting at 0 with every sample."""
    return torch.cat([torch.arange(n) for n in lengths])


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


def _qwen_vl(batch: dict, lengths: list[int], collator: Collator, attn_implementation: str) -> dict:
    # Each sample's M-RoPE positions came from the adapter on that sample alone; prepend the text row.
    text = text_positions(lengths).view(1, 1, -1)
    return {"position_ids": torch.cat([text, batch["position_ids"]], dim=0), "attention_mask": None}


def _gemma3(batch: dict, lengths: list[int], collator: Collator, attn_implementation: str) -> dict:
    if attn_implementation not in ("sdpa", "eager"):
        raise ValueError(f"packing Gemma-3 needs attn_implementation 'sdpa' or 'eager', got {attn_implementation!r}")
    positions = text_positions(lengths)
    text_config = collator.model_config.get_text_config()
    masks = packed_attention_masks(
        packed_sequence_ids(lengths),
        positions,
        batch["token_type_ids"][0].bool(),
        getattr(text_config, "sliding_window", None),
        attn_implementation,
    )
    return {"position_ids": positions[None], "attention_mask": masks}


@dataclass(frozen=True)
class PackingRule:
    """How one family keeps attention inside each packed sample.

    Attributes:
        finish: ``(batch, lengths, collator, attn_implementation) -> dict`` of keys replacing those of the
            concatenated batch (``position_ids``, ``attention_mask``).
    """

    finish: Callable[..., dict[str, Any]]


PACKING: dict[str, PackingRule] = {
    "qwen2_5_vl": PackingRule(_qwen_vl),
    "qwen3_vl": PackingRule(_qwen_vl),
    "gemma3": PackingRule(_gemma3),
}


class PackedCollator:
    """Collate dataset items into one padding-free packed row (batch size 1).

    Args:
        collator: the family's :class:`Collator` (encoding, image processing, extra keys).
        attn_implementation: the model's attention implementation; families whose masks are built here
            (Gemma-3) need it to pick boolean (``"sdpa"``) or additive (``"eager"``) masks.

    The returned batch holds ``input_ids``/``labels`` ``(1, T)``, the family's image tensors in sample order,
    its extra keys concatenated along the sequence, ``position_ids`` restarting per sample, and
    ``use_cache=False``. There is no
    ``attention_mask`` key where transformers derives the packed mask from the position restarts (Qwen-VL).
    """

    def __init__(self, collator: Collator, attn_implementation: str = "sdpa"):
        if collator.adapter.name not in PACKING:
            raise ValueError(f"packing is not supported for {collator.adapter.name}; supported: {sorted(PACKING)}")
        self.collator, self.attn_implementation = collator, attn_implementation
        self.rule = PACKING[collator.adapter.name]

    def pack(self, encoded: list[Encoded]) -> dict[str, Any]:
        """Concatenate encoded samples into one row; see the class docstring for the keys."""
        lengths = [len(e.input_ids) for e in encoded]
        # Each sample alone is a batch without padding: the adapter's extra keys (M-RoPE positions, token
        # types) come out exactly as for that sample, and concatenate along the sequence (last) dimension.
        singles = [self.collator.pad([e]) for e in encoded]
        image_keys = set(ImageBatch.cat([e.images for e in encoded]).tensors)
        batch: dict[str, Any] = {
            key: torch.cat([s[key] for s in singles], dim=-1) for key in singles[0] if key not in image_keys
        }
        batch.update(ImageBatch.cat([e.images for e in encoded]).tensors)
        starts = torch.tensor([0, *lengths[:-1]]).cumsum(0)
        batch["labels"][0, starts] = IGNORE_INDEX  # never predict one sample's first token from the previous
        batch.update(self.rule.finish(batch, lengths, self.collator, self.attn_implementation))
        if batch.get("attention_mask") is None:
            batch.pop("attention_mask", None)
        # With a cache, transformers skips packed-sequence detection (``_preprocess_mask_arguments`` looks for
        # restarts only when ``past_key_values is None``), and Qwen-VL builds a DynamicCache whenever use_cache
        # is on, in training too unless gradient checkpointing turns it off: the samples would silently attend
        # to each other.
        batch["use_cache"] = False
        return batch

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """Collate dataset items ``{"index": i, "row": canonical_row}`` into one packed row."""
        return self.pack([self.collator.encode(item["row"], item["index"]) for item in items])


class PackedBins(torch.utils.data.Dataset):
    """A prepared dataset regrouped into bins of at most ``budget`` tokens; item ``i`` is bin ``i``'s items.

    Used with batch size 1 and :func:`collate_bin`: each optimiser micro-step then sees one packed row.
    """

    def __init__(self, prepared, budget: int, strategy: str = "first_fit"):
        self.prepared = prepared
        self.bins = pack_lengths(list(prepared.lengths), budget, strategy)

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, i: int) -> list[dict[str, Any]]:
        return [self.prepared[j] for j in self.bins[i]]


def collate_bin(packer: PackedCollator):
    """A DataLoader collate function for :class:`PackedBins` at batch size 1."""

    def collate(bins: list[list[dict[str, Any]]]) -> dict[str, Any]:
        return packer([item for bin_items in bins for item in bin_items])

    return collate
