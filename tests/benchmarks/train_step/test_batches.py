"""benchmarks/train_step/batches.py: a step's packed row holds exactly the samples of that step's padded batch."""

import importlib
from pathlib import Path

import pytest
import torch

from vlmtune.data.collator import IGNORE_INDEX

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def batches(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))  # benchmarks is not installed: it imports from the repository root
    return importlib.import_module("benchmarks.train_step.batches")


def test_packed_row_holds_the_samples_of_the_padded_batch(batches, tiny_paths, tmp_path):
    steps = batches.build_steps("unused on the real shape", tiny_paths, "real", batch=3, count=2, cache=tmp_path)
    assert steps["samples"] == [3, 3] and steps["images"] == [3, 3]
    assert set(steps["packed"]) == {"sdpa", "varlen"}
    for padded, row in zip(steps["batches"], steps["packed"]["sdpa"], strict=True):
        lengths = padded["attention_mask"].sum(1).tolist()
        assert len(set(lengths)) > 1  # the real shape pads, so the step has something to remove
        assert row["input_ids"].shape == (1, sum(lengths))
        # Sample after sample, the padded rows' tokens and labels without their padding, in batch order.
        for key in ("input_ids", "labels"):
            assert torch.equal(row[key][0], torch.cat([padded[key][i, :n] for i, n in enumerate(lengths)]))
        # Each sample starts in its prompt, unsupervised in both: the supervised tokens are the same ones.
        starts = torch.tensor([0, *lengths[:-1]]).cumsum(0)
        assert (row["labels"][0, starts] == IGNORE_INDEX).all()
        assert int((row["labels"] != IGNORE_INDEX).sum()) == int((padded["labels"] != IGNORE_INDEX).sum())
        assert torch.equal(row["pixel_values"], padded["pixel_values"])  # the same images, in sample order
        assert row["use_cache"] is False and "position_ids" in row


def test_description_counts_the_packed_rows(batches, tiny_qwen, tmp_path):
    steps = batches.build_steps("unused", tiny_qwen, "real", batch=2, count=1, cache=tmp_path)
    described = batches.describe(steps)
    assert described["packed_tokens_per_batch"] == described["tokens_per_batch"]
    assert described["padded_tokens_per_batch"][0] > described["tokens_per_batch"][0]
    assert "attention_mask" not in described["packed_keys"]["sdpa"] and described["images_per_batch"] == [2]
    # Qwen's rows for the varlen kernel carry a mask per layer type that is no mask (transformers builds none).
    assert "attention_mask" in described["packed_keys"]["varlen"]
    assert set(steps["packed"]["varlen"][0]["attention_mask"].values()) == {None}
