"""Padding-free packing: bin packing, and packed rows giving the padded batch's per-sample losses and gradients."""

import pytest
import torch

import vlmtune
from vlmtune.data.collator import IGNORE_INDEX, Collator
from vlmtune.data.packing import PackedCollator, image_block_ids, pack_lengths, packed_attention_masks

# --- pack_lengths -----------------------------------------------------------------------------------------------


def test_first_fit_decreasing_bins_by_hand():
    # Sorted: 7(i1) 6(i4) 5(i0) 4(i3) 3(i5) 2(i2) 1(i6) into 10: [7,3] [6,4] [5,2,1].
    lengths = [5, 7, 2, 4, 6, 3, 1]
    assert pack_lengths(lengths, 10) == [[1, 5], [3, 4], [0, 2, 6]]


def test_greedy_keeps_order():
    lengths = [5, 7, 2, 4, 6, 3, 1]
    assert pack_lengths(lengths, 10, strategy="greedy") == [[0], [1, 2], [3, 4], [5, 6]]


@pytest.mark.parametrize("strategy", ["first_fit", "greedy"])
def test_bins_respect_the_budget_and_hold_every_sample_once(strategy):
    lengths = torch.randint(1, 50, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    bins = pack_lengths(lengths, 64, strategy=strategy)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
    assert pack_lengths(lengths, 64, strategy=strategy) == bins  # deterministic
    if strategy == "first_fit":
        assert len(bins) <= len(pack_lengths(lengths, 64, strategy="greedy"))


def test_oversize_sample_is_named():
    with pytest.raises(ValueError, match="sample 2 has 11 tokens"):
        pack_lengths([3, 4, 11], 10)


@pytest.mark.parametrize(("kwargs", "message"), [(dict(budget=0), "budget"), (dict(strategy="best"), "strategy")])
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        pack_lengths([1, 2], **{"budget": 4, **kwargs})


# --- masks ------------------------------------------------------------------------------------------------------


def test_packed_masks_stay_inside_samples_and_images():
    # Two samples of 4 and 5 tokens; the first holds an image at 1-2, the second at 6-7 (packed indices).
    image = torch.tensor([0, 1, 1, 0, 0, 0, 1, 1, 0], dtype=torch.bool)
    positions = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 4])
    sequence = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1])
    assert image_block_ids(image).tolist() == [-1, 0, 0, -1, -1, -1, 1, 1, -1]
    masks = packed_attention_masks(sequence, positions, image, sliding_window=2, attn_implementation="sdpa")
    full, sliding = masks["full_attention"][0, 0], masks["sliding_attention"][0, 0]
    assert not full[4:, :4].any() and not full[:4, 4:].any()  # nothing crosses samples
    assert full[1, 2] and full[6, 7]  # image tokens see their whole image
    assert not full[0, 1] and not full[5, 6]  # text does not see ahead
    assert full[8, 4] and not sliding[8, 4] and sliding[8, 7]  # the window counts per-sample positions
    eager = packed_attention_masks(sequence, positions, image, 2, "eager")["full_attention"][0, 0]
    assert ((eager == 0) == full).all()


# --- packed ≡ padded --------------------------------------------------------------------------------------------


def per_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token CE ``(B, T-1)`` and its mask, in fp32."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
    return ce, labels != IGNORE_INDEX


def padded_sample_losses(model, batch) -> torch.Tensor:
    ce, mask = per_token_losses(model(**batch).logits, batch["labels"])
    return (ce * mask).sum(1) / mask.sum(1)


def packed_sample_losses(model, batch, lengths: list[int]) -> torch.Tensor:
    ce, mask = per_token_losses(model(**batch).logits, batch["labels"])
    # The loss at position t predicts token t + 1: sample k's predictions sit at [start, start + n - 1).
    ce, mask = torch.nn.functional.pad(ce, (0, 1))[0], torch.nn.functional.pad(mask, (0, 1))[0]
    return torch.stack([(c * m).sum() / m.sum() for c, m in zip(ce.split(lengths), mask.split(lengths), strict=True)])


def lora_grads(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.fixture(scope="module")
def rows(latex_data):
    return vlmtune.load_rows("latex_ocr", split="train", path=latex_data)


def tuned_model(path, attn: str):
    """The tiny model in fp32 with LoRA whose B is non-zero, in eval mode (no dropout), and its collator."""
    torch.manual_seed(0)
    model, processor, adapter = vlmtune.load(path, dtype="float32", attn_implementation=attn)
    model = vlmtune.apply_tuning(model, adapter, vlmtune.TuningConfig(gradient_checkpointing=False))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_(0, 0.05)  # non-zero B: LoRA changes the outputs and every factor gets a gradient
    model.eval()
    return model, Collator(adapter, processor, model.config)


def assert_packed_matches_padded(model, collator, chosen, attn):
    sizes = [len(e.input_ids) for e in chosen]
    padded = collator.pad(chosen)
    padded_losses = padded_sample_losses(model, padded)
    padded_losses.sum().backward()
    padded_grads = lora_grads(model)
    alone = torch.cat([padded_sample_losses(model, collator.pad([e])) for e in chosen])

    packed = PackedCollator(collator, attn_implementation=attn).pack(chosen)
    assert packed["input_ids"].shape == (1, sum(sizes))
    packed_losses = packed_sample_losses(model, packed, sizes)
    packed_losses.sum().backward()
    packed_grads = lora_grads(model)

    # fp32 on CPU: the packed row only reorders reductions (observed differences ~1e-6); 1e-4 leaves headroom.
    torch.testing.assert_close(packed_losses, alone, rtol=0, atol=1e-4)
    torch.testing.assert_close(packed_losses, padded_losses, rtol=0, atol=1e-4)
    assert padded_grads.keys() == packed_grads.keys() and padded_grads
    for name, grad in padded_grads.items():
        scale = grad.abs().max().clamp(min=1e-8)
        assert (packed_grads[name] - grad).abs().max() / scale < 1e-4, name


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["tiny_qwen", "tiny_gemma"])
def test_packed_matches_padded(family, attn, rows, request):
    model, collator = tuned_model(request.getfixturevalue(family), attn)
    encoded = [collator.encode(rows[i], i) for i in range(len(rows))]
    by_length = sorted({len(e.input_ids): i for i, e in enumerate(encoded)}.items())
    chosen = [encoded[i] for _, i in (by_length[0], by_length[len(by_length) // 2], by_length[-1])]
    assert len({len(e.input_ids) for e in chosen}) == 3
    packed = PackedCollator(collator, attn_implementation=attn).pack(chosen)
    if family == "tiny_qwen":  # transformers derives the mask from the text-position restarts
        assert "attention_mask" not in packed and packed["position_ids"].shape[0] == 4
    else:
        assert set(packed["attention_mask"]) == {"full_attention", "sliding_attention"}
    assert_packed_matches_padded(model, collator, chosen, attn)


@pytest.mark.parametrize("family", ["tiny_qwen", "tiny_gemma"])
def test_text_only_sample_before_an_image_sample(family, rows, request):
    # Images at different offsets in different samples: transformers 5.23's own packed Gemma-3 sliding mask
    # looks image blocks up by per-sample position, so the second sample's image lost its bidirectional
    # attention there (loss off by ~2e-2); the masks built in packing.py keep it.
    model, collator = tuned_model(request.getfixturevalue(family), "sdpa")
    text_row = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Say something long enough to matter here."}]},
            {"role": "assistant", "content": [{"type": "text", "text": "x + y = z"}]},
        ]
    }
    chosen = [collator.encode(text_row, 99), collator.encode(rows[0], 0), collator.encode(rows[1], 1)]
    assert_packed_matches_padded(model, collator, chosen, "sdpa")
