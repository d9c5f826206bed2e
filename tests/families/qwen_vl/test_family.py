"""Qwen-VL (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) beyond the conformance suite: the pixel-range options, the aspect-ratio
limit, M-RoPE positions against the model's own ``get_rope_index``, and a projector nested in the vision module.
"""

import copy

import pytest
import torch

from vlmtune.data.schema import DataError
from vlmtune.testing import collate, init_lora_b, noise, single, turn
from vlmtune.tuning import TuningConfig, apply_tuning, trainable_parameter_names

QWEN_VL = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]


def test_qwen3_vl_patches_normalisation_and_interleaved_mrope(tiny):
    t = tiny("qwen3_vl")
    image_processor = t.processor.image_processor
    assert (image_processor.patch_size, image_processor.merge_size) == (16, 2)
    assert list(image_processor.image_mean) == list(image_processor.image_std) == [0.5] * 3
    assert t.config.text_config.rope_parameters["mrope_interleaved"] is True


# Grids of 1000x700 and 20x20 images: 1000x700 under max 112*112 (Qwen2) is beta = sqrt(700000/12544) = 7.47 ->
# 112x84 -> 8x6 patches; under min 112*112 it is 252x168 -> 18x12 as without it, and 20x20 is scaled up to 112x112
# -> 8x8 (else 56x56 -> 4x4). Qwen3-VL, max 128*128: beta = sqrt(700000/16384) = 6.54 -> 128x96 -> 8x6.
PIXEL_OPTIONS = {
    "qwen2_vl-max_pixels": ("qwen2_vl", {"max_pixels": 112 * 112}, [[1, 6, 8], [1, 4, 4]]),
    "qwen2_vl-min_pixels": ("qwen2_vl", {"min_pixels": 112 * 112}, [[1, 12, 18], [1, 8, 8]]),
    "qwen2_5_vl-max_pixels": ("qwen2_5_vl", {"max_pixels": 112 * 112}, [[1, 6, 8], [1, 4, 4]]),
    "qwen2_5_vl-min_pixels": ("qwen2_5_vl", {"min_pixels": 112 * 112}, [[1, 12, 18], [1, 8, 8]]),
    "qwen3_vl-max_pixels": ("qwen3_vl", {"max_pixels": 128 * 128}, [[1, 6, 8], [1, 4, 4]]),
}


@pytest.mark.parametrize(("model_type", "options", "grids"), PIXEL_OPTIONS.values(), ids=PIXEL_OPTIONS.keys())
def test_pixel_options_match_processor(tiny, model_type, options, grids):
    t = tiny(model_type)
    rows = [(single("Two images.", "ok", n_images=2), [noise((1000, 700), 1), noise((20, 20), 2)])]
    # The reference call states both bounds through `size`: transformers 5.17 ignores a lone min/max_pixels kwarg.
    default = t.processor.image_processor.size
    size = {
        "shortest_edge": options.get("min_pixels", default["shortest_edge"]),
        "longest_edge": options.get("max_pixels", default["longest_edge"]),
    }
    batch = t.assert_matches_processor(rows, collator=t.collator_with(**options), size=size)
    assert batch["image_grid_thw"].tolist() == grids


@pytest.mark.parametrize("size", [(1, 300), (300, 1)])
@pytest.mark.parametrize("model_type", QWEN_VL)
def test_aspect_ratio_over_200_is_a_data_error_naming_the_row(tiny, model_type, size):
    with pytest.raises(DataError, match=r"^row 5: .*aspect ratio"):
        tiny(model_type).collator.encode({"messages": single("q", "a"), "images": [noise(size)]}, 5)


def mrope_rows():
    return (
        (single("Read this.", r"x^{2} + y"), [noise((300, 60), 7)]),
        (
            [turn("user", "Two:", 2), turn("assistant", "a"), turn("user", "ok"), turn("assistant", "b")],
            [noise((64, 64), 8), noise((100, 200), 9)],
        ),
        ([turn("user", "No image."), turn("assistant", "fine")], []),
    )


# The first row's 300x60 image, merged 2x2: Qwen2 308x56 -> grid 1x4x22 -> 2x11 (22 tokens, text resumes 11
# positions on); Qwen3 288x64 -> grid 1x4x18 -> 2x9 (18 tokens, 9 on).
IMAGE_TOKENS_AND_ADVANCE = {"qwen2_vl": (22, 11), "qwen2_5_vl": (22, 11), "qwen3_vl": (18, 9)}


@pytest.mark.parametrize("model_type", QWEN_VL)
def test_mrope_positions_equal_model_get_rope_index_on_a_right_padded_batch(tiny, model_type):
    t = tiny(model_type)
    batch = collate(t.collator, *mrope_rows())
    lengths = batch["attention_mask"].sum(1).tolist()
    assert len(set(lengths)) == 3
    expected, _deltas = t.model.model.get_rope_index(
        batch["input_ids"],
        mm_token_type_ids=batch["mm_token_type_ids"],
        image_grid_thw=batch["image_grid_thw"],
        attention_mask=batch["attention_mask"],
    )
    positions = batch["position_ids"]
    assert positions.shape == expected.shape == (3, 3, max(lengths))
    mask = batch["attention_mask"].bool()
    assert torch.equal(positions[:, mask], expected[:, mask])
    assert positions[:, ~mask].eq(0).all()
    # Real 3-D positions: images compress positions, and rows and columns differ.
    for b, n in enumerate(lengths[:2]):
        assert int(positions[0, b, n - 1]) < n - 1
        assert not torch.equal(positions[1, b, :n], positions[2, b, :n])
    tokens, advance = IMAGE_TOKENS_AND_ADVANCE[model_type]
    assert int(positions[0, 0, lengths[0] - 1]) == lengths[0] - 1 - tokens + advance
    # Text alone advances the three axes together.
    assert positions[:, 2, : lengths[2]].tolist() == [list(range(lengths[2]))] * 3


@pytest.mark.parametrize("model_type", QWEN_VL)
def test_explicit_positions_give_the_same_loss_as_the_model_s_own(tiny, model_type):
    t = tiny(model_type)
    batch = collate(
        t.collator,
        (single("Read this.", r"x^{2}"), [noise((96, 64), 1)]),
        (single("And this one, please.", r"\frac{1}{2} + \sqrt{3}"), [noise((64, 160), 2)]),
    )
    with torch.no_grad():
        ours = t.model(**batch).loss
        own = t.model(**{k: v for k, v in batch.items() if k != "position_ids"}).loss
    torch.testing.assert_close(ours, own, rtol=0, atol=0)


# --- the merger inside model.visual ------------------------------------------------------------------------

MERGER_COPY = "base_model.model.model.visual.merger.modules_to_save.default."
MERGER_LORA = {f"base_model.model.model.visual.merger.mlp.{i}.lora_{ab}.default.weight" for i in (0, 2) for ab in "AB"}


@pytest.mark.parametrize(("projector", "trained"), [("full", 5), ("lora", 4)])
def test_trained_projector_inside_frozen_vision_still_gets_grads(tiny, projector, trained):
    """The merger sits inside model.visual: a frozen vision tower must not cut it off with no_grad."""
    t = tiny("qwen2_5_vl")
    peft_model = apply_tuning(copy.deepcopy(t.model), t.family, TuningConfig(vision="frozen", projector=projector))
    init_lora_b(peft_model)
    peft_model.train()
    peft_model(**collate(t.collator, (single("Read this.", r"\frac{1}{2}"), [noise((112, 56))]))).loss.backward()
    merger = {n: p for n, p in peft_model.named_parameters() if n.startswith(MERGER_COPY) or n in MERGER_LORA}
    assert len(merger) == trained
    for name, param in merger.items():
        assert param.requires_grad and param.grad is not None and param.grad.abs().sum() > 0, name
    blocks = [p for n, p in peft_model.named_parameters() if ".visual.blocks." in n]
    assert blocks and all(p.grad is None and not p.requires_grad for p in blocks)


def test_full_vision_keeps_a_frozen_projector_frozen(tiny):
    t = tiny("qwen2_5_vl")
    peft_model = apply_tuning(copy.deepcopy(t.model), t.family, TuningConfig(vision="full", projector="frozen"))
    trainable = trainable_parameter_names(peft_model)
    assert any(".visual." in n and ".blocks." in n for n in trainable)
    assert [n for n in trainable if ".merger." in n] == []
