"""Gemma-3 beyond the conformance suite: pan-and-scan crops against ``Gemma3Processor``, its image options,
``token_type_ids``, and the projector that is no Linear.
"""

import copy

import pytest

from vlmtune.data.collator import Collator
from vlmtune.testing import collate, noise, single
from vlmtune.tuning import TuningConfig, apply_tuning

SOFT_TOKENS = 16
PAN_AND_SCAN = {
    "do_pan_and_scan": True,
    "pan_and_scan_min_crop_size": 16,
    "pan_and_scan_max_num_crops": 4,
    "pan_and_scan_min_ratio_to_activate": 1.2,
}

# 300x60: aspect 5 -> round(5) = 5 crops across, capped by pan_and_scan_max_num_crops=4 (75x60 each, above the
# 16 px minimum); 60x60 is below the 1.2 ratio that activates pan-and-scan.
PAN_CASES = {
    "wide": ([(300, 60)], 4),
    "square_untouched": ([(60, 60)], 0),
    "wide_and_square": ([(300, 60), (60, 60)], 4),
}


def count(batch, tokenizer, token: str) -> int:
    return int((batch["input_ids"] == tokenizer.convert_tokens_to_ids(token)).sum())


@pytest.mark.parametrize(("sizes", "crops"), PAN_CASES.values(), ids=PAN_CASES.keys())
def test_pan_and_scan_matches_processor(tiny, sizes, crops):
    t = tiny("gemma3")
    images = [noise(size, seed) for seed, size in enumerate(sizes)]
    rows = [(single("Read the formula.", r"x^{2}", n_images=len(images)), images)]
    batch = t.assert_matches_processor(rows, collator=t.collator_with(**PAN_AND_SCAN), **PAN_AND_SCAN)
    tok = t.processor.tokenizer
    sequences = crops + len(images)  # one per crop, plus each original
    assert batch["pixel_values"].shape == (sequences, 3, 64, 64)
    assert count(batch, tok, "<start_of_image>") == count(batch, tok, "<end_of_image>") == sequences
    assert count(batch, tok, "<image_soft_token>") == SOFT_TOKENS * sequences
    assert tok.decode(batch["input_ids"][0]).count("Here is the original image") == (1 if crops else 0)


def test_unknown_image_option_names_the_valid_ones(tiny):
    t = tiny("gemma3")
    with pytest.raises(ValueError, match="max_pixels.*valid: .*do_pan_and_scan"):
        Collator(t.family, t.processor, t.config, image_options={"max_pixels": 10})


def test_token_type_ids_mark_exactly_the_soft_tokens(tiny):
    # The model needs them in training for its bidirectional attention inside each image.
    t = tiny("gemma3")
    batch = collate(
        t.collator,
        (single("q", "a"), [noise((64, 64))]),
        (single("Write the LaTeX representation for this image.", r"\sum_{i=1}^{n} i^{2}"), [noise((300, 60))]),
    )
    soft = batch["input_ids"] == t.config.image_token_index
    assert batch["token_type_ids"].bool().tolist() == soft.tolist()
    assert batch["token_type_ids"].sum(1).tolist() == [SOFT_TOKENS, SOFT_TOKENS]


def test_lora_on_the_projector_alone_is_nothing_to_train(tiny):
    # The projector is a bare weight matrix (mm_input_projection_weight): "lora" there finds no target.
    t = tiny("gemma3")
    with pytest.raises(ValueError, match="nothing to train"):
        apply_tuning(
            copy.deepcopy(t.model), t.family, TuningConfig(vision="frozen", language="frozen", projector="lora")
        )
