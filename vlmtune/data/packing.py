"""Padding-free packing: several samples in one row, attention kept inside each sample.

Two parts:

* :func:`pack_lengths` groups sample indices into bins under a token budget (images counted: a sample's length
  is its ``input_ids`` length, image tokens included, as :class:`~vlmtune.data.collator.PreparedDataset`
  records it).
* :class:`PackedCollator` encodes the samples of one bin and concatenates them into a single row of batch size
  1 with no pad token. Positions restart at 0 with every sample; the first label of every sample is -100 so that
  no sample is trained to predict the next one's first token.

How attention stays inside each sample is the family's ``pack`` function (its descriptor; the positions and
masks it builds come from :mod:`vlmtune.data.positions`): position restarts that transformers turns into
per-sample causal masks (Qwen-VL, MiniCPM-V), explicit 4-D masks (Gemma-3), and, for MiniCPM-V 4.6's Gated
DeltaNet layers, sample boundaries that the per-sample forward installed at load reads (load with
:func:`vlmtune.load`). A family whose ``pack`` is ``None`` does not support packing.

Images of every family travel concatenated in sample order (:meth:`ImageBatch.cat`); each model fills its
placeholders in row order (Qwen-VL, Gemma-3 and 4.6 by ``masked_scatter`` over the image token, 2.6 through
``image_bound``), so every image's features land on its own sample's placeholders.
"""

from __future__ import annotations

from typing import Any

import torch

from vlmtune.data.collator import IGNORE_INDEX, Collator, Encoded
from vlmtune.data.positions import (  # noqa: F401  (re-exported: the packing API in one place)
    image_block_ids,
    packed_attention_masks,
    packed_sequence_ids,
    text_positions,
)
from vlmtune.families.base import ImageBatch

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


class PackedCollator:
    """Collate dataset items into one padding-free packed row (batch size 1).

    Args:
        collator: the family's :class:`Collator` (encoding, image processing, extra keys).
        attn_implementation: the model's attention implementation; families whose masks are built here
            (Gemma-3) need it to pick boolean (``"sdpa"``) or additive (``"eager"``) masks, or none for
            ``"varlen"`` (the kernels attend per sample: :func:`vlmtune.kernels.hf.rope.packed_attention`).

    The returned batch holds ``input_ids``/``labels`` ``(1, T)``, the family's image tensors in sample order,
    its extra keys concatenated along the sequence (or, where they are not tensors, rebuilt for the row by the
    family's rule), ``position_ids`` restarting per sample, and ``use_cache=False``. There is no
    ``attention_mask`` key where transformers derives the packed mask from the position restarts (Qwen-VL,
    MiniCPM-V).
    """

    def __init__(self, collator: Collator, attn_implementation: str = "sdpa"):
        if collator.family.pack is None:
            raise ValueError(f"packing is not supported for {collator.family.name}; train with packing=False")
        self.collator, self.attn_implementation = collator, attn_implementation

    def pack(self, encoded: list[Encoded]) -> dict[str, Any]:
        """Concatenate encoded samples into one row; see the class docstring for the keys."""
        lengths = [len(e.input_ids) for e in encoded]
        # Each sample alone is a batch without padding: the family's extra keys (M-RoPE positions, token
        # types) come out exactly as for that sample, and concatenate along the sequence (last) dimension.
        singles = [self.collator.pad([e]) for e in encoded]
        images = ImageBatch.cat([e.images for e in encoded])
        batch: dict[str, Any] = {
            key: torch.cat([s[key] for s in singles], dim=-1)
            for key in singles[0]
            if key not in images.tensors and torch.is_tensor(singles[0][key])
        }
        batch.update(images.tensors)
        starts = torch.tensor([0, *lengths[:-1]]).cumsum(0)
        batch["labels"][0, starts] = IGNORE_INDEX  # never predict one sample's first token from the previous
        batch.update(self.collator.family.pack(batch, images, lengths, self.collator, self.attn_implementation))
        missing = {key for s in singles for key in s} - set(batch)
        if missing:
            raise ValueError(f"the {self.collator.family.name} packing rule left out the keys {sorted(missing)}")
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


def packed_bins(prepared, config) -> torch.utils.data.Dataset:
    """The packed rows of a run: a token budget's (:class:`~vlmtune.data.budget.BudgetBins`) when
    ``config.max_tokens_per_step`` is set, else rows of ``config.max_length`` (:class:`PackedBins`)."""
    if config.max_tokens_per_step is None:
        return PackedBins(prepared, config.max_length)
    from vlmtune.data.budget import BudgetBins

    return BudgetBins(prepared, config.max_tokens_per_step)


def collate_bin(packer: PackedCollator):
    """A DataLoader collate function for :class:`PackedBins` at batch size 1."""

    def collate(bins: list[list[dict[str, Any]]]) -> dict[str, Any]:
        return packer([item for bin_items in bins for item in bin_items])

    return collate
