"""Padding-free packing: bin packing, and packed rows giving the padded batch's per-sample losses and gradients."""

import pytest
import torch
import transformers
from packaging.version import Version

import vlmtune
from vlmtune.data.collator import IGNORE_INDEX, Collator
from vlmtune.data.packing import PackedCollator, image_block_ids, pack_lengths, packed_attention_masks
from vlmtune.families.minicpmv4_6.family import keep_packed_samples_apart
from vlmtune.testing import single

QWEN = ["tiny_qwen", "tiny_qwen2_vl", "tiny_qwen3_vl"]
FAMILIES = [*QWEN, "tiny_gemma", "tiny_minicpmv", "tiny_minicpmv4_6"]
# Before transformers 5.19 MiniCPM-V 4.6's 16x merger takes views of one size only (the family refuses others).
MINICPMV4_6_MODE = "16x" if Version(transformers.__version__) >= Version("5.19") else "4x"

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


@pytest.fixture(scope="module")
def tuned(request):
    """``tuned(family, attn)``: :func:`tuned_model` once per module (the tests only read it and clear its grads)."""
    cache = {}

    def get(family: str, attn: str = "sdpa"):
        if (family, attn) not in cache:
            cache[family, attn] = tuned_model(request.getfixturevalue(family), attn)
        return cache[family, attn]

    return get


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
    options = {"downsample_mode": MINICPMV4_6_MODE} if adapter.name == "minicpmv4_6" else None
    return model, Collator(adapter, processor, model.config, image_options=options)


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


def assert_family_keys(family: str, packed: dict, chosen, collator) -> None:
    """What each family's rule puts in the packed row, by hand."""
    sizes = [len(e.input_ids) for e in chosen]
    restarts = torch.cat([torch.arange(n) for n in sizes])
    if family in QWEN:  # transformers derives the mask from the text-position restarts
        assert "attention_mask" not in packed and packed["position_ids"].shape[0] == 4
        assert torch.equal(packed["position_ids"][0, 0], restarts)
    elif family == "tiny_gemma":
        assert set(packed["attention_mask"]) == {"full_attention", "sliding_attention"}
    else:  # MiniCPM-V: the LLM's own packed-sequence detection from position restarts, no mask
        assert "attention_mask" not in packed and torch.equal(packed["position_ids"], restarts[None])
    if family == "tiny_minicpmv":
        # Each sample's query runs, moved by the tokens before it, in sample order.
        filler, offsets = collator.processor.image_token_id, torch.tensor([0, *sizes[:-1]]).cumsum(0)
        expected = torch.cat([filler_runs(e.input_ids, filler) + o for e, o in zip(chosen, offsets, strict=True)])
        assert len(packed["image_bound"]) == 1 and torch.equal(packed["image_bound"][0], expected)
        assert len(expected) == len(packed["tgt_sizes"])  # one range per view
    if family == "tiny_minicpmv4_6":  # the DeltaNet layers' sample boundaries
        bounds = torch.tensor([0, *sizes]).cumsum(0)
        assert packed["cu_seq_lens_q"].tolist() == bounds.tolist() and packed["max_length_q"] == max(sizes)


def filler_runs(input_ids: list[int], filler: int) -> torch.Tensor:
    """``(k, 2)`` ``[start, end)`` runs of the ``filler`` token: MiniCPM-V 2.6's per-view ``<unk>`` queries."""
    is_filler = torch.tensor(input_ids) == filler
    edges = torch.diff(is_filler.int(), prepend=torch.tensor([0]), append=torch.tensor([0]))
    return torch.stack([(edges == 1).nonzero()[:, 0], (edges == -1).nonzero()[:, 0]], dim=1)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_matches_padded(family, attn, rows, tuned):
    model, collator = tuned(family, attn)
    encoded = [collator.encode(rows[i], i) for i in range(len(rows))]
    by_length = sorted({len(e.input_ids): i for i, e in enumerate(encoded)}.items())
    chosen = [encoded[i] for _, i in (by_length[0], by_length[len(by_length) // 2], by_length[-1])]
    assert len({len(e.input_ids) for e in chosen}) == 3
    assert_family_keys(family, PackedCollator(collator, attn_implementation=attn).pack(chosen), chosen, collator)
    assert_packed_matches_padded(model, collator, chosen, attn)


TEXT_ROW = {
    "messages": [
        {"role": "user", "content": [{"type": "text", "text": "Say something long enough to matter here."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "x + y = z"}]},
    ]
}


@pytest.mark.parametrize("family", FAMILIES)
def test_text_only_sample_before_an_image_sample(family, rows, tuned):
    # Images at different offsets in different samples: transformers 5.23's own packed Gemma-3 sliding mask
    # looks image blocks up by per-sample position, so the second sample's image lost its bidirectional
    # attention there (loss off by ~2e-2); the masks built in packing.py keep it.
    model, collator = tuned(family)
    chosen = [collator.encode(TEXT_ROW, 99), collator.encode(rows[0], 0), collator.encode(rows[1], 1)]
    assert_family_keys(family, PackedCollator(collator).pack(chosen), chosen, collator)
    assert_packed_matches_padded(model, collator, chosen, "sdpa")


@pytest.mark.parametrize("family", ["tiny_minicpmv", "tiny_minicpmv4_6"])
def test_two_image_sample_between_others(family, rows, tuned):
    # Two images in one sample, the second sliced into several views (the longest row): every view's features
    # must reach its own placeholder, in sample order, or the per-sample losses move. 4.6 in 4x mode: the
    # non-default mode travels as a string key, which the packed row must carry too.
    model, collator = tuned(family)
    if family == "tiny_minicpmv4_6":
        collator = Collator(collator.family, collator.processor, model.config, image_options={"downsample_mode": "4x"})
    encoded = [collator.encode(rows[i], i) for i in range(len(rows))]
    sliced = max(range(len(rows)), key=lambda i: len(encoded[i].input_ids))
    two = {
        "messages": single("Read both.", "a + b", n_images=2),
        "images": [rows[2]["images"][0], rows[sliced]["images"][0]],
    }
    chosen = [encoded[3], collator.encode(two, 98), collator.encode(TEXT_ROW, 99)]
    views = [len(info.get("tgt_sizes", info.get("target_sizes"))) for info in chosen[1].images.infos]
    assert len(views) == 2 and views[1] > 1
    packed = PackedCollator(collator).pack(chosen)
    assert_family_keys(family, packed, chosen, collator)
    if family == "tiny_minicpmv4_6":
        assert packed["downsample_mode"] == "4x"
    assert_packed_matches_padded(model, collator, chosen, "sdpa")


def test_minicpmv4_6_deltanet_layers_need_the_sample_bounds(rows, tuned):
    # The Gated DeltaNet layers carry a conv window and a recurrent state along the row: without the per-sample
    # forward (cu_seq_lens_q dropped) later samples read earlier ones (~4e-3 on the tiny model), with it none do.
    model, collator = tuned("tiny_minicpmv4_6")
    chosen = [collator.encode(rows[i], i) for i in range(3)]
    sizes = [len(e.input_ids) for e in chosen]
    bounds = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
    packed = PackedCollator(collator).pack(chosen)
    with torch.no_grad():
        alone = torch.cat([padded_sample_losses(model, collator.pad([e])) for e in chosen])
        torch.testing.assert_close(packed_sample_losses(model, packed, sizes), alone, rtol=0, atol=1e-4)
        leaked = packed_sample_losses(model, {k: v for k, v in packed.items() if k not in bounds}, sizes)
    assert (leaked[0] - alone[0]).abs() < 1e-4  # the first sample has nothing before it
    assert (leaked[1:] - alone[1:]).abs().min() > 1e-3


def test_keep_packed_samples_apart_patches_only_deltanet_layers_and_reverts(tiny_minicpmv4_6):
    from transformers import AutoModelForImageTextToText

    deltanet = ["model.language_model.layers.0.linear_attn"]  # the tiny text tower: DeltaNet, then full attention

    def patched(model) -> list[str]:
        return [name for name, module in model.named_modules() if "forward" in vars(module)]

    assert patched(vlmtune.load(tiny_minicpmv4_6)[0]) == deltanet  # the family's load_model installs it
    model = AutoModelForImageTextToText.from_pretrained(tiny_minicpmv4_6)
    restore = keep_packed_samples_apart(model)
    assert patched(model) == deltanet
    restore()
    assert patched(model) == []
