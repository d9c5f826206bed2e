"""Fixtures of the tuning tests: a fresh copy of each family's tiny model with a two-image batch."""

import copy

import pytest

import vlmtune
from vlmtune.data.collator import Collator
from vlmtune.testing import collate, noise, single


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    """``loaded(family)``: a fresh copy of the family's tiny model, its adapter and a fresh two-image batch."""
    cache = {}

    def get(family: str):
        if family not in cache:
            # On the CPU wherever the tests run: the batches are built there, and the numbers compared are CPU ones.
            model, processor, adapter = vlmtune.load(tiny_checkpoint(family), device="cpu")
            cache[family] = model, adapter, Collator(adapter, processor, model.config)
        model, adapter, collator = cache[family]
        return copy.deepcopy(model), adapter, image_batch(collator)

    return get


def image_batch(collator) -> dict:
    """Two samples of different lengths, one image each: every tower runs, and the batch is padded."""
    return collate(
        collator,
        (single("Read this.", r"\frac{1}{2}"), [noise((64, 48), 0)]),
        (single("And this one, please.", r"x^{2} + y"), [noise((48, 80), 1)]),
    )
