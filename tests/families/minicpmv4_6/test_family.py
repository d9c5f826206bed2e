"""MiniCPM-V 4.6 (native transformers layout) beyond the conformance suite: the ``4x`` downsample mode against
``MiniCPMV4_6Processor`` and in training, the ``downsample_mode`` batch key, the slicing options, per-sample image
ids, and the hybrid Qwen3.5 text tower.
"""

import copy

import pytest
import torch
import transformers
from packaging.version import Version

from vlmtune.data.schema import DataError
from vlmtune.families.minicpmv4_6.family import num_image_tokens
from vlmtune.testing import collate, init_lora_b, noise, single, turn
from vlmtune.tuning import TuningConfig, apply_tuning

SEVERAL_VIEW_SIZES_AT_16X = Version(transformers.__version__) >= Version("5.19")


@pytest.fixture(scope="module")
def t(tiny):
    return tiny("minicpmv4_6")


def test_text_tower_alternates_deltanet_and_full_attention(t):
    assert t.config.text_config.layer_types == ["linear_attention", "full_attention"]


@pytest.mark.parametrize("size", [(5, 5), (30, 300), (300, 30), (1000, 700)], ids=["5x5", "tall", "wide", "sliced"])
def test_single_image_matches_processor_4x(t, size):
    rows = [(single("Read.", "x"), [noise(size)])]
    batch = t.assert_matches_processor(rows, collator=t.collator_with(downsample_mode="4x"), downsample_mode="4x")
    # 4x skips the in-tower merge: a quarter of each view's patches, four times the 16x budget per patch.
    tokens = int((batch["target_sizes"].prod(-1) // 4).sum())
    assert int((batch["input_ids"] == t.config.image_token_id).sum()) == tokens
    assert batch["downsample_mode"] == "4x"


def test_16x_is_the_config_s_mode_and_adds_no_batch_key(t):
    assert t.config.downsample_mode == "16x"
    assert "downsample_mode" not in collate(t.collator, (single("Read.", "x"), [noise((1000, 700))]))


@pytest.mark.parametrize(
    ("options", "views", "id_tags"),
    [
        # 4 slices at most: 2x2 (|0.357 - 0| beats 1x3's 0.742); 350x500 slices -> 112x112.
        ({"max_slice_nums": 4}, 5, 1),
        ({"slice_mode": False}, 1, 1),
        ({"use_image_id": False}, 9, 0),
    ],
    ids=["max_slice_nums", "no_slices", "no_image_id"],
)
def test_image_options_match_processor(t, options, views, id_tags):
    rows = [(single("Read.", "x"), [noise((1000, 700), 3)])]
    batch = t.assert_matches_processor(rows, collator=t.collator_with(**options), **options)
    assert len(batch["target_sizes"]) == views
    assert t.processor.tokenizer.decode(batch["input_ids"][0]).count("<image_id>") == id_tags


@pytest.mark.skipif(not SEVERAL_VIEW_SIZES_AT_16X, reason="views of several sizes need transformers>=5.19 at 16x")
def test_image_ids_count_per_sample(t):
    first = [turn("user", "Compare", 2), turn("assistant", "a"), turn("user", "And here?", 1), turn("assistant", "b")]
    rows = (
        (first, [noise((300, 60), 1), noise((56, 56), 2), noise((1000, 700), 3)]),
        (single("Read.", "y"), [noise((64, 200), 4)]),
    )
    texts = t.processor.tokenizer.batch_decode(collate(t.collator, *rows)["input_ids"])
    assert [texts[0].count(f"<image_id>{i}</image_id>") for i in range(3)] == [1, 1, 1]
    assert [texts[1].count(f"<image_id>{i}</image_id>") for i in range(2)] == [1, 0]


@pytest.mark.skipif(SEVERAL_VIEW_SIZES_AT_16X, reason="transformers>=5.19 runs views of several sizes at 16x")
def test_views_of_several_sizes_at_16x_need_a_newer_transformers(t):
    rows = ((single("a", "b"), [noise((200, 100), 1)]), (single("c", "d"), [noise((1000, 700), 2)]))
    with pytest.raises(ValueError, match="transformers>=5.19 or set the image option downsample_mode='4x'"):
        collate(t.collator, *rows)


def test_num_image_tokens_follows_the_mode(t):
    enc = t.collator.encode({"messages": single("q", "a"), "images": [noise((1000, 700))]}, 0)
    info = enc.images.infos[0]
    assert info["grid"] == (2, 4) and num_image_tokens(info) == 36
    assert num_image_tokens({**info, "downsample_mode": "4x"}) == 9 * 64 // 4


def test_unknown_downsample_mode_is_a_data_error_naming_the_row(t):
    with pytest.raises(DataError, match=r"^row 3: .*downsample_mode"):
        t.collator_with(downsample_mode="8x").encode({"messages": single("q", "a"), "images": [noise((64, 64))]}, 3)


def test_training_step_at_4x_with_frozen_vision(t):
    peft_model = apply_tuning(copy.deepcopy(t.model), t.family, TuningConfig(vision="frozen", r=4))
    init_lora_b(peft_model)  # PEFT starts lora_B at zero, which would make every lora_A grad zero
    peft_model.train()
    batch = collate(
        t.collator_with(downsample_mode="4x"),
        (single("Read this.", r"\frac{1}{2}"), [noise((200, 100), 1)]),
        (single("And this one, please.", r"x^{2} + y"), [noise((1000, 700), 2)]),
    )
    loss = peft_model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        elif ".vision_tower." in name or ".merger." in name:
            assert param.grad is None and not param.requires_grad, name
