"""Token-budget packing: the budget holds, images stay whole, every row once, vision load balanced, same losses."""

import random

import pytest
import torch

import vlmtune
from vlmtune.data.budget import BudgetBins, pack_budget
from vlmtune.data.collator import Collator, PreparedDataset
from vlmtune.data.packing import PackedCollator


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bins_never_exceed_the_budget_and_hold_every_sample_once(seed):
    rng = random.Random(seed)
    image = [rng.choice([0, 16, 64, 256]) for _ in range(300)]
    lengths = [v + rng.randint(20, 120) for v in image]
    bins = pack_budget(lengths, image, budget=1024)
    assert sorted(i for b in bins for i in b) == list(range(300))
    assert all(sum(lengths[i] for i in b) <= 1024 for b in bins)
    assert pack_budget(lengths, image, budget=1024) == bins  # deterministic


def test_image_load_is_balanced_where_tokens_alone_would_not_be():
    # Four image-heavy samples and four text-only ones of the same length: tokens alone pair the heavy ones.
    lengths, image = [100] * 8, [90] * 4 + [0] * 4
    unbalanced = pack_budget(lengths, image, budget=200, balance=float("inf"))
    assert max(sum(image[i] for i in b) for b in unbalanced) == 180
    balanced = pack_budget(lengths, image, budget=200)
    loads = [sum(image[i] for i in b) for b in balanced]
    assert len(balanced) == 4 and loads == [90, 90, 90, 90]


def test_no_bin_holds_much_more_vision_than_the_mean():
    rng = random.Random(3)
    image = sorted((rng.choice([0, 0, 32, 300]) for _ in range(200)), reverse=True)
    lengths = [v + rng.randint(10, 60) for v in image]
    bins = pack_budget(lengths, image, budget=2048, balance=1.25)
    loads = [sum(image[i] for i in b) for b in bins]
    mean = sum(image) / len(bins)
    assert max(loads) <= max(max(image), 1.25 * sum(image) / len(bins) * 1.01) and max(loads) < 1.5 * mean


def test_a_sample_over_the_budget_is_named():
    with pytest.raises(ValueError, match="sample 1 has 900 tokens, more than the packing budget of 512"):
        pack_budget([100, 900], [0, 0], budget=512)


@pytest.fixture(scope="module")
def tuned(tiny_qwen):
    torch.manual_seed(0)
    model, processor, family = vlmtune.load(tiny_qwen, dtype="float32")
    model = vlmtune.apply_tuning(model, family, vlmtune.TuningConfig(gradient_checkpointing=False))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_(0, 0.05)
    model.eval()
    return model, Collator(family, processor, model.config)


def test_budget_rows_keep_images_whole_and_give_the_padded_losses(tuned, latex_data):
    model, collator = tuned
    rows = vlmtune.load_rows("latex_ocr", split="train", path=latex_data)
    prepared = PreparedDataset(rows, collator)
    budget = 2 * max(prepared.lengths)
    bins = BudgetBins(prepared, budget)
    assert sorted(j for b in bins.bins for j in b) == list(range(len(prepared)))  # every row once an epoch
    packer, image_ids = PackedCollator(collator), set(collator.image_token_ids())
    for i in range(len(bins)):
        items = bins[i]
        encoded = [collator.encode(item["row"], item["index"]) for item in items]
        row = packer.pack(encoded)
        assert row["input_ids"].shape[1] == bins.tokens(i) <= budget
        # Every sample's image tokens are in the row, inside that sample's span: no image is cut.
        start = 0
        for e, j in zip(encoded, bins.bins[i], strict=True):
            span = row["input_ids"][0, start : start + len(e.input_ids)].tolist()
            assert sum(t in image_ids for t in span) == prepared.image_tokens[j] > 0
            start += len(e.input_ids)
    # Per-sample losses of a multi-sample budget row equal those of the same samples padded.
    i = max(range(len(bins)), key=lambda b: len(bins.bins[b]))
    encoded = [collator.encode(item["row"], item["index"]) for item in bins[i]]
    assert len(encoded) >= 2
    sizes = [len(e.input_ids) for e in encoded]
    with torch.no_grad():
        padded = _sample_losses(model(**collator.pad(encoded)).logits, collator.pad(encoded)["labels"])
        row = packer.pack(encoded)
        logits, labels = model(**row).logits, row["labels"]
    ce, mask = _token_losses(logits, labels)
    ce, mask = torch.nn.functional.pad(ce, (0, 1))[0], torch.nn.functional.pad(mask, (0, 1))[0]
    packed = torch.stack([(c * m).sum() / m.sum() for c, m in zip(ce.split(sizes), mask.split(sizes), strict=True)])
    torch.testing.assert_close(packed, padded, rtol=0, atol=1e-4)  # fp32: reordered reductions only


def _token_losses(logits, labels):
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
    return ce, labels != -100


def _sample_losses(logits, labels):
    ce, mask = _token_losses(logits, labels)
    return (ce * mask).sum(1) / mask.sum(1)
