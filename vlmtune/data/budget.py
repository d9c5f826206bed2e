"""Token-budget packing: as many samples per optimiser micro-step as fit a token budget, vision load balanced.

A step is **one packed row** of at most ``max_tokens_per_step`` tokens (images included, never cut: a sample is
an atom), built by :class:`~vlmtune.data.packing.PackedCollator`: no pad token at all, positions restarting per
sample, attention kept inside each sample by the family's packing rule. One row rather than several rows of
``max_length`` each because every family's packing rule already handles a row of any length and a row carries
no padding; the cost is attention: with flash-attention (varlen over the position restarts) it stays the sum of
the samples' own squares, while with ``sdpa`` / ``eager`` the block mask spans the whole row, so a budget far
above the longest sample spends attention work on masked-out blocks (keep the budget a few thousand tokens
there, or let ``max_tokens_per_step="auto"`` pick it from memory).

Balance: first-fit decreasing on tokens alone can put the samples with the most image tokens side by side (long
samples are usually long because of their images), so one step would run the vision tower on many more patches
than another. :func:`pack_budget` first counts the bins tokens alone need, then packs again with a second cap on
each bin's image tokens: ``balance`` times the mean image load per bin (never below the largest single sample).
Image tokens stand for the vision work of every family (Qwen-VL: 4 patches per token; Gemma-3: 256 tokens per
896-px crop; MiniCPM-V: 64 queries per slice).

Each kept sample lands in exactly one bin, so an epoch (the Trainer's seeded shuffle of the bins) visits every row
once; the bins depend on the lengths alone, so a resumed run rebuilds the same ones.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from vlmtune.data.packing import pack_lengths

DEFAULT_BALANCE = 1.25


def pack_budget(
    lengths: list[int], image_tokens: list[int], budget: int, balance: float = DEFAULT_BALANCE
) -> list[list[int]]:
    """Group sample indices into bins of at most ``budget`` tokens with a balanced image load.

    Args:
        lengths: tokens per sample, image tokens included.
        image_tokens: image tokens per sample (the vision tower's share of its work).
        budget: most tokens per bin.
        balance: no bin holds more than ``balance`` x the mean image tokens per bin of the tokens-only packing
            (or the largest single sample's, when that is more); ``math.inf`` packs on tokens alone.

    Returns:
        Bins of sample indices (ascending within a bin), every index exactly once, deterministic for the input.

    Raises:
        ValueError: a sample longer than the budget (named), mismatched lists, or ``balance < 1``.
    """
    if len(lengths) != len(image_tokens):
        raise ValueError(f"{len(lengths)} lengths but {len(image_tokens)} image token counts")
    if balance < 1:
        raise ValueError(f"balance must be >= 1, got {balance}")
    tokens_only = pack_lengths(lengths, budget)  # also refuses a sample over the budget, naming it
    if not lengths or math.isinf(balance) or not any(image_tokens):
        return tokens_only
    vision_cap = max(max(image_tokens), math.ceil(balance * sum(image_tokens) / len(tokens_only)))
    bins: list[list[int]] = []
    totals: list[list[int]] = []  # [tokens, image tokens] per bin
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], -image_tokens[i], i)):
        n, v = lengths[index], image_tokens[index]
        target = next((b for b, (t, w) in enumerate(totals) if t + n <= budget and w + v <= vision_cap), None)
        if target is None:
            bins.append([])
            totals.append([0, 0])
            target = len(bins) - 1
        bins[target].append(index)
        totals[target][0] += n
        totals[target][1] += v
    return [sorted(b) for b in bins]


class BudgetBins(torch.utils.data.Dataset):
    """A prepared dataset regrouped into token-budget bins; item ``i`` is bin ``i``'s items.

    Used at batch size 1 with :func:`~vlmtune.data.packing.collate_bin`: each optimiser micro-step then trains on
    one packed row of at most ``budget`` tokens.

    Args:
        prepared: a :class:`~vlmtune.data.collator.PreparedDataset` (its ``lengths`` and ``image_tokens``).
        budget: most tokens per step.
        balance: see :func:`pack_budget`.
    """

    def __init__(self, prepared, budget: int, balance: float = DEFAULT_BALANCE):
        self.prepared, self.budget = prepared, budget
        self.bins = pack_budget(list(prepared.lengths), list(prepared.image_tokens), budget, balance)

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, i: int) -> list[dict[str, Any]]:
        return [self.prepared[j] for j in self.bins[i]]

    def tokens(self, i: int) -> int:
        """Tokens of bin ``i`` (images included)."""
        return sum(self.prepared.lengths[j] for j in self.bins[i])

    def image_load(self, i: int) -> int:
        """Image tokens of bin ``i``."""
        return sum(self.prepared.image_tokens[j] for j in self.bins[i])
