"""The bad-input catalogue: every case stops preparation naming the row and the reason, or is skipped and counted
by kind; odd but usable input (image modes, sizes, UTF-8 bytes, text-only rows) is converted, never replaced."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

import vlmtune
from vlmtune.data.collator import Collator, PreparedDataset, SampleTooLong
from vlmtune.data.schema import DataError, load_image


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


GOOD = _png(Image.new("RGB", (60, 30), "white"))


def _row(image=GOOD, answer="x^{2}", question="Read it.", n_tags=1, images=None):
    content = [{"type": "image"}] * n_tags + [{"type": "text", "text": question}]
    return {
        "messages": [
            {"role": "user", "content": content},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ],
        "images": [image] * n_tags if images is None else images,
    }


def _text_only(answer="4", question="What is 2 + 2?"):
    return _row(n_tags=0, answer=answer, question=question)


def _image_in_answer():
    row = _text_only()
    row["messages"][1]["content"].insert(0, {"type": "image"})
    return {**row, "images": [GOOD]}


def _file(folder, name: str, data: bytes) -> str:
    path = folder / name
    path.write_bytes(data)
    return str(path)


def _noise_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def qwen(tiny_qwen):
    return vlmtune.load(tiny_qwen)


# case -> (row maker, the reason in the error, the kind it is counted under when skipped)
CATALOGUE = {
    "missing file": (lambda tmp: _row(str(tmp / "gone.png")), r"image file '.*gone\.png' not found", "missing image"),
    "corrupt image": (
        lambda tmp: _row(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10),
        r"cannot decode image \(",
        "unreadable image",
    ),
    "truncated file": (
        lambda tmp: _row(_file(tmp, "cut.jpg", _noise_jpeg()[:1000])),
        r"cannot decode image \(OSError: image file is truncated",
        "unreadable image",
    ),
    "zero-size file": (
        lambda tmp: _row(_file(tmp, "empty.png", b"")),
        r"image file '.*empty\.png' is empty \(0 bytes\)",
        "unreadable image",
    ),
    "0x0 image": (lambda tmp: _row(Image.new("RGB", (0, 0))), r"image has size 0x0", "unreadable image"),
    "decompression bomb": (
        lambda tmp: _row(_png(Image.new("RGB", (400, 300)))),  # with MAX_IMAGE_PIXELS at 50,000 below
        r"image is too large to decode safely",
        "image too large",
    ),
    "aspect ratio the processor refuses": (
        lambda tmp: _row(_png(Image.new("RGB", (1, 500)))),
        r"the image processor rejected an image \(absolute aspect ratio must be smaller than 200",
        "image rejected",
    ),
    "non-UTF-8 text": (
        lambda tmp: _row(answer="café".encode("latin-1")),
        r"message 1 part 0 text is not valid UTF-8 \(byte 0xe9 at offset 3",
        "non-UTF-8 text",
    ),
    "empty answer": (lambda tmp: _row(answer="  \n"), r"assistant turn \(message 1\) is empty", "empty answer"),
    "null answer": (lambda tmp: _row(answer=None), r"assistant turn \(message 1\) is empty", "empty answer"),
    "empty prompt": (
        lambda tmp: _text_only(question=""),
        r"user turn \(message 0\) is empty: no text and no image",
        "empty prompt",
    ),
    "more images than tags": (
        lambda tmp: _row(images=[GOOD, GOOD]),
        r"has 1 image tag\(s\) in its messages but 2 image\(s\)",
        "image count",
    ),
    "more tags than images": (
        lambda tmp: _row(n_tags=2, images=[GOOD]),
        r"has 2 image tag\(s\) in its messages but 1 image\(s\)",
        "image count",
    ),
    "image tag typed in the prompt": (
        lambda tmp: _row(question="Read <|image_pad|>."),
        r"the rendered prompt holds 2 image tag\(s\) for 1 image\(s\)",
        "image count",
    ),
    "image in the answer": (
        lambda tmp: _image_in_answer(),
        r"assistant turn \(message 1\) holds an image part",
        "image count",
    ),
    "too long": (lambda tmp: _row(answer="a b c " * 200), r"has \d+ tokens, more than max_length=256", "too long"),
}


@pytest.fixture
def small_bomb_limit(monkeypatch):
    # PIL refuses images over twice MAX_IMAGE_PIXELS; a low limit makes a 400x300 PNG a "bomb" without 1 GB of RAM.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)


@pytest.mark.parametrize("case", list(CATALOGUE))
def test_each_bad_row_stops_preparation_naming_the_row_and_reason(qwen, tmp_path, small_bomb_limit, case):
    model, processor, adapter = qwen
    make, reason, kind = CATALOGUE[case]
    collator = Collator(adapter, processor, model.config, max_length=256)
    rows = [_row(), _text_only(), make(tmp_path)]
    overflow = "error"  # a too-long row is dropped by default; here it stops the run like the rest
    with pytest.raises(DataError, match=rf"^row 2: {reason}") as info:
        PreparedDataset(rows, collator, overflow=overflow)
    assert info.value.row == 2 and info.value.kind == kind
    assert [type(e) is SampleTooLong for e in info.value.errors] == [case == "too long"]


def test_bad_rows_are_skipped_and_counted_by_kind_when_asked(qwen, tmp_path, small_bomb_limit):
    model, processor, adapter = qwen
    bad = [make(tmp_path) for make, _, _ in CATALOGUE.values()]
    rows = [_row(), *bad, _text_only()]
    collator = Collator(adapter, processor, model.config, max_length=256)
    dataset = PreparedDataset(rows, collator, on_bad_row="skip")
    assert dataset.kept == [0, len(rows) - 1]
    assert [dataset[i]["row"] for i in range(2)] == [rows[0], rows[-1]]  # kept rows are the user's, unchanged
    assert dict(dataset.skipped) == {
        "missing image": 1,
        "unreadable image": 4,  # corrupt, truncated, zero-size file, 0x0
        "image too large": 1,
        "image rejected": 1,
        "non-UTF-8 text": 1,
        "empty answer": 2,
        "empty prompt": 1,
        "image count": 4,
        "too long": 1,
    }
    assert sum(dataset.skipped.values()) == len(bad)


# --- odd but usable images are converted and resized, not rejected -----------------------------------------


def _png16_gray(value: int) -> bytes:
    return _png(Image.fromarray(np.full((20, 40), value, dtype=np.uint16)))


ODD_IMAGES = {
    # name: (source, RGB pixel after conversion)
    "grayscale": (_png(Image.new("L", (40, 20), 128)), (128, 128, 128)),
    "rgba transparent": (_png(Image.new("RGBA", (40, 20), (0, 0, 0, 0))), (255, 255, 255)),
    "palette": (_png(Image.new("P", (40, 20), 0)), (0, 0, 0)),
    "cmyk": (Image.new("CMYK", (40, 20), (0, 255, 255, 0)), (255, 0, 0)),  # PNG cannot hold CMYK
    "16-bit gray png": (_png16_gray(32768), (128, 128, 128)),
    "bilevel": (_png(Image.new("1", (40, 20), 1)), (255, 255, 255)),
    # mode "F" (e.g. a TIFF, or Image.fromarray of a float array): [0, 1] as numpy users write it, or 0-255
    "float in [0, 1]": (Image.fromarray(np.full((20, 40), 0.5, dtype=np.float32)), (128, 128, 128)),
    "float in [0, 255]": (Image.fromarray(np.full((20, 40), 128.0, dtype=np.float32)), (128, 128, 128)),
}


@pytest.mark.parametrize("name", list(ODD_IMAGES))
def test_odd_image_modes_are_converted(qwen, name):
    model, processor, adapter = qwen
    source, pixel = ODD_IMAGES[name]
    image = load_image(source, 0)
    assert image.mode == "RGB" and image.size == (40, 20) and image.getpixel((5, 5)) == pixel
    encoded = Collator(adapter, processor, model.config).encode(_row(source), 0)
    # 40x20 -> smart resize up to min_pixels (56x56 area) in multiples of 28: 56x84 -> 4x6 patches of 14 px
    assert encoded.images.tensors["image_grid_thw"].tolist() == [[1, 4, 6]]
    assert encoded.images.tensors["pixel_values"].shape == (24, 3 * 2 * 14 * 14)


@pytest.mark.parametrize(
    ("size", "image_options", "grid"),
    [
        ((1, 1), {}, [1, 4, 4]),  # up to min_pixels: 56x56
        ((3000, 2000), {}, [1, 12, 18]),  # down under the tiny processor's max_pixels 224*224: 168x252
        ((2000, 3000), {}, [1, 18, 12]),
        ((3000, 2000), {"max_pixels": 100 * 100}, [1, 4, 8]),  # the user's max_pixels: 56x112
    ],
    ids=["1-pixel", "far-over-max-pixels", "far-over-max-pixels-portrait", "far-over-user-max-pixels"],
)
def test_tiny_and_huge_images_are_resized_to_the_pixel_range(qwen, size, image_options, grid):
    model, processor, adapter = qwen
    collator = Collator(adapter, processor, model.config, image_options=image_options)
    encoded = collator.encode(_row(_png(Image.new("RGB", size, "white"))), 0)
    assert encoded.images.tensors["image_grid_thw"].tolist() == [grid]
    max_pixels = image_options.get("max_pixels", 224 * 224)
    assert 56 * 56 <= grid[1] * grid[2] * 14 * 14 <= max_pixels
    n_image = sum(t == model.config.image_token_id for t in encoded.input_ids)
    assert n_image == grid[1] * grid[2] // 4  # 2x2 merge


@pytest.mark.parametrize("size", [(1, 1), (3000, 2000), (1, 500)])
def test_gemma_resizes_any_image_to_its_square(tiny_gemma, size):
    model, processor, adapter = vlmtune.load(tiny_gemma)
    encoded = Collator(adapter, processor, model.config).encode(_row(_png(Image.new("RGB", size, "white"))), 0)
    assert encoded.images.tensors["pixel_values"].shape == (1, 3, 64, 64)
    assert sum(t == model.config.image_token_id for t in encoded.input_ids) == 16


def test_utf8_bytes_are_decoded_not_refused(qwen):
    model, processor, adapter = qwen
    collator = Collator(adapter, processor, model.config)
    as_bytes = collator.encode(_row(answer="café ∑".encode(), question="Lis ça.".encode()), 0)
    as_text = collator.encode(_row(answer="café ∑", question="Lis ça."), 0)
    assert as_bytes.input_ids == as_text.input_ids and as_bytes.labels == as_text.labels


@pytest.mark.parametrize("family", ["qwen2_5_vl", "gemma3"])
def test_text_only_rows_mix_with_image_rows_in_one_batch(family, tiny_qwen, tiny_gemma):
    model, processor, adapter = vlmtune.load({"qwen2_5_vl": tiny_qwen, "gemma3": tiny_gemma}[family])
    collator = Collator(adapter, processor, model.config)
    batch = collator(
        [{"index": 0, "row": _text_only()}, {"index": 1, "row": _row()}, {"index": 2, "row": _text_only()}]
    )
    only_image = collator([{"index": 1, "row": _row()}])
    assert torch.equal(batch["pixel_values"], only_image["pixel_values"])  # the one image row's pixels, only those
    n_image = (batch["input_ids"] == model.config.image_token_id).sum(1).tolist()
    assert n_image[0] == n_image[2] == 0 and n_image[1] > 0
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)
