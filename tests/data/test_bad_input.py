"""The bad-input catalogue: every case stops preparation naming the row, or is skipped and counted by kind."""

import io

import pytest
import torch
from PIL import Image

import vlmtune
from vlmtune.data.collator import Collator, PreparedDataset
from vlmtune.data.schema import DataError


def _png(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _row(image=None, answer="x^{2}", text_only=False):
    content = (
        [{"type": "text", "text": "Read it."}]
        if text_only
        else [{"type": "image"}, {"type": "text", "text": "Read it."}]
    )
    return {
        "messages": [
            {"role": "user", "content": content},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ],
        "images": [] if text_only else [image],
    }


@pytest.fixture(scope="module")
def qwen(tiny_qwen):
    model, processor, adapter = vlmtune.load(tiny_qwen)
    return model, processor, adapter


def _catalogue(tmp_path):
    good = _png(Image.new("RGB", (60, 30), "white"))
    return {
        "missing image": _row(str(tmp_path / "gone.png")),
        "unreadable image": _row(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10),
        "truncated image": _row(good[: len(good) // 2]),
        "empty answer": _row(good, answer="   "),
        "image count": {**_row(good), "images": [good, good]},
    }


@pytest.mark.parametrize(
    "case", ["missing image", "unreadable image", "truncated image", "empty answer", "image count"]
)
def test_each_bad_row_stops_preparation_naming_the_row(qwen, tmp_path, case):
    model, processor, adapter = qwen
    good = _png(Image.new("RGB", (60, 30), "white"))
    rows = [_row(good), _row(good), _catalogue(tmp_path)[case]]
    with pytest.raises(DataError, match=r"^row 2: "):
        PreparedDataset(rows, Collator(adapter, processor, model.config))


def test_bad_rows_are_skipped_and_counted_by_kind_when_asked(qwen, tmp_path):
    model, processor, adapter = qwen
    good = _png(Image.new("RGB", (60, 30), "white"))
    bad = list(_catalogue(tmp_path).values())
    too_long = _row(good, answer="a b c " * 400)
    dataset = PreparedDataset(
        [_row(good), *bad, too_long], Collator(adapter, processor, model.config, max_length=256), on_bad_row="skip"
    )
    assert dataset.kept == [0]
    assert dict(dataset.skipped) == {
        "missing image": 1,
        "unreadable image": 2,
        "empty answer": 1,
        "image count": 1,
        "too long": 1,
    }


@pytest.mark.parametrize(
    "image",
    [
        Image.new("L", (40, 20), 128),
        Image.new("RGBA", (40, 20), (0, 0, 0, 0)),
        Image.new("P", (40, 20)),
        Image.new("CMYK", (40, 20)),
        Image.new("I;16", (40, 20)),
        Image.new("RGB", (1, 1)),
        Image.new("RGB", (3000, 2000), "white"),
    ],
    ids=["grayscale", "rgba", "palette", "cmyk", "16-bit", "1-pixel", "far-over-max-pixels"],
)
def test_odd_images_are_converted_and_resized_not_rejected(qwen, image):
    model, processor, adapter = qwen
    source = image if image.mode == "CMYK" else _png(image)  # PNG cannot hold CMYK
    encoded = Collator(adapter, processor, model.config).encode(_row(source), 0)
    grid = encoded.images.tensors["image_grid_thw"][0].tolist()
    assert grid[1] * grid[2] * 14 * 14 <= 224 * 224  # the tiny processor's max_pixels
    assert encoded.images.tensors["pixel_values"].isfinite().all()


@pytest.mark.parametrize("family", ["qwen2_5_vl", "gemma3"])
def test_text_only_rows_mix_with_image_rows_in_one_batch(family, tiny_qwen, tiny_gemma):
    model, processor, adapter = vlmtune.load({"qwen2_5_vl": tiny_qwen, "gemma3": tiny_gemma}[family])
    good = _png(Image.new("RGB", (60, 30), "white"))
    batch = Collator(adapter, processor, model.config)(
        [
            {"index": 0, "row": _row(text_only=True)},
            {"index": 1, "row": _row(good)},
            {"index": 2, "row": _row(text_only=True)},
        ]
    )
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert batch["pixel_values"].shape[0] > 0  # the one image row's pixels, and only those
