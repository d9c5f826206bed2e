"""Fixtures of the family tests: each tiny checkpoint loaded once per test module, and its own processor run on the
rows the collator gets."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import vlmtune
from vlmtune.data.collator import Collator
from vlmtune.families import Family
from vlmtune.testing import collate


@dataclass
class Tiny:
    """One family's tiny checkpoint as ``vlmtune.load`` gives it, with a collator on the default image options.

    ``model`` is shared by the tests of a module and stays in eval mode: a test that tunes or trains works on
    ``copy.deepcopy(model)``.
    """

    folder: Path
    model: torch.nn.Module
    processor: Any
    family: Family
    collator: Collator

    @property
    def config(self):
        return self.model.config

    def collator_with(self, **image_options) -> Collator:
        """A collator of this family with the given image options."""
        return Collator(self.family, self.processor, self.config, image_options=image_options)

    def processor_batch(self, rows, **kwargs):
        """The family's own processor on ``(messages, images)`` rows: chat template, then one call on all rows."""
        texts = [self.processor.apply_chat_template(messages, tokenize=False) for messages, _ in rows]
        images = [sample_images for _, sample_images in rows]
        if len(rows) > 1:
            kwargs["padding"] = True
        return self.processor(
            text=texts,
            images=images if any(images) else None,
            add_special_tokens=False,
            return_tensors="pt",
            **kwargs,
        )

    def assert_matches_processor(self, rows, collator: Collator | None = None, **kwargs) -> dict:
        """Collate ``rows`` and check every key the family's processor returns for them, token for token; return
        the batch.

        Our batches are right-padded and some processors pad on the left, so per-token keys are compared sample by
        sample on the real tokens, and per-sample position ranges (``image_bound``) from each sample's first real
        token; other keys (pixels, grids) must be equal as they are.
        """
        batch = collate(collator or self.collator, *rows)
        ref = self.processor_batch(rows, **kwargs)
        assert set(ref) <= set(batch), sorted(set(ref) - set(batch))
        assert ("pixel_values" in batch) == ("pixel_values" in ref) == any(images for _, images in rows)
        ours, theirs = batch["attention_mask"].bool(), ref["attention_mask"].bool()
        for key in ref:
            if isinstance(ref[key], list):
                for b, (mine, other) in enumerate(zip(batch[key], ref[key], strict=True)):
                    first, ref_first = ours[b].nonzero()[0, 0], theirs[b].nonzero()[0, 0]
                    assert torch.equal(mine - first, other - ref_first), (key, b)
            elif ref[key].shape == ref["input_ids"].shape:
                assert batch[key].shape[0] == len(rows)
                for b in range(len(rows)):
                    assert torch.equal(batch[key][b][ours[b]].long(), ref[key][b][theirs[b]].long()), (key, b)
                if len(rows) == 1:
                    assert torch.equal(batch[key].long(), ref[key].long()), key
            else:
                assert torch.equal(batch[key], ref[key]), key
        return batch


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    """``tiny(model_type)``: that family's :class:`Tiny`, loaded on first use in the test module."""
    loaded: dict[str, Tiny] = {}

    def get(model_type: str) -> Tiny:
        if model_type not in loaded:
            folder = tiny_checkpoint(model_type)
            model, processor, family = vlmtune.load(folder, device="cpu")
            collator = Collator(family, processor, model.config)
            loaded[model_type] = Tiny(folder, model.eval(), processor, family, collator)
        return loaded[model_type]

    return get
