"""Padding-free packing: several samples in one row, attention kept inside each sample.

Two parts:

* :func:`pack_lengths` groups sample indices into bins under a token budget (images counted: a sample's length
  is its ``input_ids`` length, image tokens included, as :class:`~vlmtune.data.collator.PreparedDataset`
  records it).
* :class:`PackedCollator` encodes the samples of one bin and concatenates them into a single row of batch size
  1 with no pad token. Positions restart at 0 with every sample; the first label of every sample is -100 so that
  no sample is trained to predict the next one's first token.

How attention stays inside each sample is per family (the ``PACKING`` table, keyed by ``adapter.name``):

* Qwen-VL (``qwen2_5_vl``, which also serves Qwen2-VL, and ``qwen3_vl``): no ``attention_mask``;
  ``position_ids`` is ``(4, 1, T)``: row 0 the text positions restarting per sample, rows 1-3 the M-RoPE
  positions of each sample computed alone. ``Qwen2_5_VLTextModel.forward`` (and Qwen2-VL's and Qwen3-VL's) reads
  a 4-row tensor as "packed, text positions first" and hands row 0 to ``create_causal_mask``,
  whose ``find_packed_sequence_indices`` turns each restart into a new sequence (transformers >= 4.54).
* Gemma-3: ``attention_mask`` is a dict ``{"full_attention": mask, "sliding_attention": mask}`` of 4-D masks built
  here, which ``Gemma3Model.forward`` passes through unchanged ("may already have been prepared"). transformers'
  own packed path is wrong for the sliding layers: it composes ``blockwise_overlay(block_sequence_ids)`` as an
  ``or_mask_function``, and the packed remap then feeds that overlay per-sample positions instead of row indices,
  so image bidirectionality lands on the wrong tokens (checked in 5.23's ``create_masks_for_vision_model``). The
  masks cost ``T * T`` booleans (``float32`` for eager) per layer type: 64 MiB at T = 8192 in bool.
* MiniCPM-V 2.6 / 4.x (``minicpmv``, vlmtune's model): no ``attention_mask``; ``position_ids`` ``(1, T)``
  restarting per sample. ``MiniCPMV.forward`` hands both to its transformers LLM (Qwen2, Qwen3 or Llama), whose
  ``create_causal_mask`` finds the restarts as for Qwen-VL (same code in 5.17 and 5.23). ``image_bound`` is the
  adapter's, recomputed on the packed row, so each view's range follows its sample's offset.
* MiniCPM-V 4.6 (``minicpmv4_6``, transformers' model): the same for its full-attention layers (a 2-D
  ``position_ids`` becomes the text row of Qwen3.5's 4-row positions). Its Gated DeltaNet layers carry a conv
  window and a recurrent state along the row that no mask cuts, so the row also carries the sample boundaries
  under transformers' flash-attention names (``cu_seq_lens_q`` ...), and the DeltaNet forward that
  :mod:`vlmtune.adapters.minicpmv4_6` installs at load runs each sample's slice alone. Load with
  :func:`vlmtune.load` (or call ``keep_packed_samples_apart``): without it transformers 5.17's reference path
  silently mixes samples, 5.23's refuses the keys, and with ``flash-linear-attention`` installed the conv still
  reads across boundaries. On transformers < 5.19 in ``16x`` mode the whole row's views must share one size
  (the adapter's check, run here on the packed row).

Images of every family travel concatenated in sample order (:meth:`ImageBatch.cat`); each model fills its
placeholders in row order (Qwen-VL, Gemma-3 and 4.6 by ``masked_scatter`` over the image token, 2.6 through
``image_bound``), so every image's features land on its own sample's placeholders.
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


def _qwen_vl(batch: dict, images: ImageBatch, lengths: list[int], collator: Collator, attn: str) -> dict:
    # Each sample's M-RoPE positions came from the adapter on that sample alone; prepend the text row.
    text = text_positions(lengths).view(1, 1, -1)
    return {"position_ids": torch.cat([text, batch["position_ids"]], dim=0), "attention_mask": None}


def _gemma3(batch: dict, images: ImageBatch, lengths: list[int], collator: Collator, attn: str) -> dict:
    if attn not in ("sdpa", "eager"):
        raise ValueError(f"packing Gemma-3 needs attn_implementation 'sdpa' or 'eager', got {attn!r}")
    positions = text_positions(lengths)
    text_config = collator.model_config.get_text_config()
    masks = packed_attention_masks(
        packed_sequence_ids(lengths),
        positions,
        batch["token_type_ids"][0].bool(),
        getattr(text_config, "sliding_window", None),
        attn,
    )
    return {"position_ids": positions[None], "attention_mask": masks}


def _minicpmv(batch: dict, images: ImageBatch, lengths: list[int], collator: Collator, attn: str) -> dict:
    # The adapter's extras of the packed row itself: image_bound ranges in row coordinates (2.6 layout), and
    # 4.6's downsample_mode with its check that the views of the whole row suit this transformers' merger.
    extras = collator.adapter.batch_extras(batch, images, collator.processor, collator.model_config)
    return {**extras, "position_ids": text_positions(lengths)[None], "attention_mask": None}


def _minicpmv4_6(batch: dict, images: ImageBatch, lengths: list[int], collator: Collator, attn: str) -> dict:
    # Sample boundaries under transformers' flash-attention names: the Gated DeltaNet layers need them (see the
    # module docstring), and flash_attention_2 takes its varlen path from them.
    bounds = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    flash = {
        "cu_seq_lens_q": bounds,
        "cu_seq_lens_k": bounds,
        "max_length_q": max(lengths),
        "max_length_k": max(lengths),
    }
    return {**_minicpmv(batch, images, lengths, collator, attn), **flash}


@dataclass(frozen=True)
class PackingRule:
    """How one family keeps attention inside each packed sample.

    Attributes:
        finish: ``(batch, images, lengths, collator, attn_implementation) -> dict`` of keys replacing or adding
            to those of the concatenated batch (``position_ids``, ``attention_mask``, ...); it must also supply
            every non-tensor key of the per-sample batches (``image_bound``, ``downsample_mode``), which do not
            concatenate.
    """

    finish: Callable[..., dict[str, Any]]


PACKING: dict[str, PackingRule] = {
    "qwen2_5_vl": PackingRule(_qwen_vl),
    "qwen3_vl": PackingRule(_qwen_vl),
    "gemma3": PackingRule(_gemma3),
    "minicpmv": PackingRule(_minicpmv),
    "minicpmv4_6": PackingRule(_minicpmv4_6),
}


class PackedCollator:
    """Collate dataset items into one padding-free packed row (batch size 1).

    Args:
        collator: the family's :class:`Collator` (encoding, image processing, extra keys).
        attn_implementation: the model's attention implementation; families whose masks are built here
            (Gemma-3) need it to pick boolean (``"sdpa"``) or additive (``"eager"``) masks.

    The returned batch holds ``input_ids``/``labels`` ``(1, T)``, the family's image tensors in sample order,
    its extra keys concatenated along the sequence (or, where they are not tensors, rebuilt for the row by the
    family's rule), ``position_ids`` restarting per sample, and ``use_cache=False``. There is no
    ``attention_mask`` key where transformers derives the packed mask from the position restarts (Qwen-VL,
    MiniCPM-V).
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
        images = ImageBatch.cat([e.images for e in encoded])
        batch: dict[str, Any] = {
            key: torch.cat([s[key] for s in singles], dim=-1)
            for key in singles[0]
            if key not in images.tensors and torch.is_tensor(singles[0][key])
        }
        batch.update(images.tensors)
        starts = torch.tensor([0, *lengths[:-1]]).cumsum(0)
        batch["labels"][0, starts] = IGNORE_INDEX  # never predict one sample's first token from the previous
        batch.update(self.rule.finish(batch, images, lengths, self.collator, self.attn_implementation))
        missing = {key for s in singles for key in s} - set(batch)
        if missing:
            raise ValueError(f"the {self.collator.adapter.name} packing rule left out the keys {sorted(missing)}")
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
