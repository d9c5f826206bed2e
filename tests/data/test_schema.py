"""The canonical row: structural validation and lazy, RGB-normalising image decoding."""

import io

import pytest
from PIL import Image

from vlmtune.data.schema import (
    DataError,
    count_image_parts,
    decoded_messages,
    load_image,
    text_of,
    validate_row,
)


def turn(role, text, n_images=0):
    return {"role": role, "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


# --- validate_row -----------------------------------------------------------------------------------------


def test_valid_rows_pass():
    validate_row({"messages": [turn("user", "q", 1), turn("assistant", "a")], "images": ["x.png"]}, 0)
    validate_row({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, 0)
    system = {"role": "system", "content": "Be brief."}
    validate_row({"messages": [system, turn("user", "q", 2), turn("assistant", "a")], "images": [1, 2]}, 0)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({}, "row 4: has no messages"),
        ({"messages": []}, "row 4: has no messages"),
        ({"messages": "hi"}, "row 4: has no messages"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "row 4: message 0 has role 'bot'; expected one of"),
        (
            {"messages": [turn("user", "q"), {"role": "assistant", "content": 3}]},
            "row 4: message 1 content must",
        ),
        (
            {"messages": [turn("user", "q"), turn("assistant", " \t")]},
            r"row 4: assistant turn \(message 1\) is empty",
        ),
        (
            {
                "messages": [turn("user", "q"), {"role": "assistant", "content": [{"type": "image"}]}],
                "images": [0],
            },
            r"row 4: assistant turn \(message 1\) is empty",
        ),
        ({"messages": [turn("user", "q")]}, "row 4: has no assistant turn to learn from"),
        (
            {"messages": [turn("user", "q"), turn("assistant", "a")], "images": ["x.png"]},
            r"row 4: has 0 image tag\(s\) in its messages but 1 image\(s\)",
        ),
        (
            {"messages": [turn("user", "q", 1), turn("assistant", "a")]},
            r"row 4: has 1 image tag\(s\) in its messages but 0 image\(s\)",
        ),
        (
            {"messages": [turn("user", "q", 1), turn("assistant", "a")], "images": None},
            r"row 4: has 1 image tag\(s\) in its messages but 0 image\(s\)",
        ),
        (
            {"messages": [turn("user", "q", 2), turn("assistant", "a")], "images": ["x.png"]},
            r"row 4: has 2 image tag\(s\) in its messages but 1 image\(s\)",
        ),
    ],
)
def test_invalid_rows_name_the_row(row, message):
    with pytest.raises(DataError, match="^" + message) as info:
        validate_row(row, 4)
    assert info.value.row == 4


def test_text_of_and_count_image_parts():
    assert text_of("plain") == "plain"
    assert text_of([{"type": "image"}, {"type": "text", "text": "a"}, {"type": "text", "text": None}]) == "a"
    messages = [turn("user", "q", 2), {"role": "assistant", "content": "a"}, turn("user", "r", 1)]
    assert count_image_parts(messages) == 3


# --- load_image -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("image", "pixel"),
    [
        (Image.new("L", (3, 2), 77), (77, 77, 77)),
        # half-transparent over white: 10 * 128/255 + 255 * 127/255 = 132 (and so on)
        (Image.new("RGBA", (3, 2), (10, 20, 30, 128)), (132, 137, 142)),
        (Image.new("P", (3, 2), 1), None),
        (Image.new("1", (3, 2), 1), (255, 255, 255)),
        (Image.new("RGB", (3, 2), (1, 2, 3)), (1, 2, 3)),
    ],
    ids=["grayscale", "rgba", "palette", "bilevel", "rgb"],
)
def test_modes_become_rgb_from_every_source(tmp_path, image, pixel):
    if image.mode == "P":
        image.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
        pixel = (200, 100, 50)
    data = encoded(image)
    path = tmp_path / "img.png"
    path.write_bytes(data)
    sources = [
        image,
        data,
        bytearray(data),
        str(path),
        path,
        {"bytes": data, "path": None},
        {"path": str(path)},
    ]
    for source in sources:
        out = load_image(source, 0)
        assert out.mode == "RGB" and out.size == (3, 2), type(source)
        assert out.getpixel((2, 1)) == pixel, type(source)


def test_missing_path_names_the_row(tmp_path):
    with pytest.raises(DataError, match=r"^row 12: image file '.*absent\.png' not found"):
        load_image(str(tmp_path / "absent.png"), 12)
    with pytest.raises(DataError, match=r"^row 12: image file '.*absent\.png' not found"):
        load_image({"bytes": None, "path": str(tmp_path / "absent.png")}, 12)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"definitely not an image",
        encoded(Image.new("RGB", (16, 16)))[:-30],
        b"\x89PNG\r\n\x1a\n" + b"\0" * 20,
    ],
    ids=["empty", "garbage", "truncated_png", "png_header_only"],
)
def test_corrupt_bytes_name_the_row(data, tmp_path):
    if data == b"":  # empty bytes are "no bytes": the entry has nothing to decode
        with pytest.raises(DataError, match=r"^row 6: image entry has neither bytes nor path"):
            load_image({"bytes": data, "path": None}, 6)
        return
    with pytest.raises(DataError, match=r"^row 6: cannot decode image"):
        load_image(data, 6)
    with pytest.raises(DataError, match=r"^row 6: cannot decode image"):
        load_image({"bytes": data, "path": None}, 6)
    path = tmp_path / "bad.png"
    path.write_bytes(data)
    with pytest.raises(DataError, match=r"^row 6: cannot decode image"):
        load_image(str(path), 6)


def test_unsupported_source_type_names_the_row():
    with pytest.raises(DataError, match=r"^row 2: image of type int is not a PIL image, path or bytes"):
        load_image(42, 2)


@pytest.mark.parametrize(
    "messages",
    [
        ["hello", {"role": "assistant", "content": "a"}],
        [{"role": "user", "content": ["a bare string part"]}, {"role": "assistant", "content": "a"}],
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": ["a bare string part"]}],
    ],
    ids=["message_is_a_string", "user_part_is_a_string", "assistant_part_is_a_string"],
)
def test_malformed_message_structure_names_the_row(messages):
    with pytest.raises(DataError, match=r"^row 8: "):
        validate_row({"messages": messages}, 8)


def test_images_given_as_a_bare_string_is_not_counted_by_characters():
    row = {"messages": [turn("user", "q", 1), turn("assistant", "a")], "images": "x.png"}
    try:
        validate_row(row, 8)  # accepting it as one image is fine
    except DataError as err:  # so is refusing it, as long as the reason is right
        assert str(err).startswith("row 8: ") and "5 image" not in str(err)


# --- every image mode becomes 8-bit RGB that shows the same picture ------------------------------------------


def _png(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_sixteen_bit_grayscale_is_rescaled_not_clipped():
    import numpy as np

    ramp = (np.arange(16, dtype=np.uint16).reshape(4, 4) * 4369).astype(np.uint16)  # 0 .. 65535
    image = load_image(_png(Image.fromarray(ramp)), 0)
    pixels = np.asarray(image)[..., 0]
    assert image.mode == "RGB"
    assert pixels[0, 0] == 0 and pixels[-1, -1] == 255 and pixels[1, 2] == round(6 * 4369 / 257)


def test_transparency_is_composited_on_white():
    import numpy as np

    transparent_black = Image.new("RGBA", (3, 3), (0, 0, 0, 0))
    opaque_black = Image.new("RGBA", (3, 3), (0, 0, 0, 255))
    assert np.asarray(load_image(_png(transparent_black), 0))[0, 0].tolist() == [255, 255, 255]
    assert np.asarray(load_image(_png(opaque_black), 0))[0, 0].tolist() == [0, 0, 0]


def test_cmyk_converts_to_rgb():
    import numpy as np

    image = load_image(Image.new("CMYK", (2, 2), (0, 255, 255, 0)), 0)  # pure cyan-free red in CMYK terms
    assert image.mode == "RGB" and np.asarray(image)[0, 0].tolist() == [255, 0, 0]


def png16(array) -> bytes:
    """A 16-bit PNG written by hand (gray ``(H, W)``, RGB ``(H, W, 3)`` or RGBA ``(H, W, 4)`` uint16): PIL writes
    16-bit grayscale only."""
    import struct
    import zlib

    height, width = array.shape[:2]
    color = 0 if array.ndim == 2 else {3: 2, 4: 6}[array.shape[2]]
    raw = b"".join(b"\0" + array[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, color, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _sixteen_bit(channels: tuple[int, ...]):
    import numpy as np

    return png16(np.broadcast_to(np.array(channels, dtype=np.uint16), (2, 3, len(channels))).copy())


def _cmyk_jpeg() -> bytes:
    return encoded(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG")


def _palette_with_transparency() -> bytes:
    image = Image.new("P", (3, 2), 0)
    image.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    image.info["transparency"] = 0  # palette entry 0 (black) is see-through
    return encoded(image)


@pytest.mark.parametrize(
    ("make", "mode", "pixel"),
    [
        (lambda: _sixteen_bit((65535, 32768, 255)), "RGB", (255, 128, 0)),  # PIL keeps each channel's high byte
        (lambda: _sixteen_bit((65535, 0, 0, 0)), "RGBA", (255, 255, 255)),  # fully transparent: white
        (lambda: _sixteen_bit((65535, 0, 0, 65535)), "RGBA", (255, 0, 0)),
        (_cmyk_jpeg, "CMYK", (255, 0, 0)),
        (_palette_with_transparency, "P", (255, 255, 255)),
        (lambda: encoded(Image.new("LA", (3, 2), (40, 255))), "LA", (40, 40, 40)),
    ],
    ids=["png-16bit-rgb", "png-16bit-rgba-transparent", "png-16bit-rgba-opaque", "jpeg-cmyk", "palette-trns", "la"],
)
def test_more_encoded_modes_become_rgb(make, mode, pixel):
    data = make()
    with Image.open(io.BytesIO(data)) as raw:
        assert raw.mode == mode  # the file really is in that mode
    image = load_image(data, 0)
    assert image.mode == "RGB" and image.getpixel((0, 0)) == pixel


def test_text_may_be_utf8_bytes_and_other_bytes_name_the_row():
    row = {"messages": [turn("user", "q"), turn("assistant", "café".encode())]}
    validate_row(row, 0)
    assert text_of(row["messages"][1]["content"]) == "café"
    assert decoded_messages(row["messages"], 0)[1]["content"] == [{"type": "text", "text": "café"}]
    assert row["messages"][1]["content"][0]["text"] == "café".encode()  # the input is left as it was
    assert decoded_messages([{"role": "user", "content": bytearray(b"hi")}], 0)[0]["content"] == "hi"

    latin1 = {"messages": [turn("user", "q"), turn("assistant", "café".encode("latin-1"))]}
    with pytest.raises(DataError, match=r"^row 3: message 1 part 0 text is not valid UTF-8 \(byte 0xe9 at offset 3"):
        validate_row(latin1, 3)
    as_string = {"messages": [{"role": "user", "content": b"\xff question"}, turn("assistant", "a")]}
    with pytest.raises(DataError, match=r"^row 3: message 0 content is not valid UTF-8 \(byte 0xff at offset 0") as e:
        validate_row(as_string, 3)
    assert e.value.kind == "non-UTF-8 text"
    with pytest.raises(DataError, match=r"^row 3: message 1 part 0 text must be a string, got int"):
        validate_row(
            {"messages": [turn("user", "q"), {"role": "assistant", "content": [{"type": "text", "text": 7}]}]}, 3
        )


def test_empty_user_turn_and_image_in_an_assistant_turn_name_the_row():
    empty = {"messages": [{"role": "user", "content": [{"type": "text", "text": " "}]}, turn("assistant", "a")]}
    with pytest.raises(DataError, match=r"^row 1: user turn \(message 0\) is empty: no text and no image") as e:
        validate_row(empty, 1)
    assert e.value.kind == "empty prompt"
    validate_row({"messages": [turn("user", "", 1), turn("assistant", "a")], "images": ["x.png"]}, 1)  # image only

    drawn = {"role": "assistant", "content": [{"type": "image"}, {"type": "text", "text": "here"}]}
    with pytest.raises(DataError, match=r"^row 1: assistant turn \(message 1\) holds an image part") as e:
        validate_row({"messages": [turn("user", "draw"), drawn], "images": ["x.png"]}, 1)
    assert e.value.kind == "image count"
    assert count_image_parts([turn("user", "q", 2), drawn]) == 2  # assistant parts are not image tags


@pytest.mark.parametrize(
    ("make", "message", "kind"),
    [
        (lambda tmp: b"", r"image data is empty \(0 bytes\)", "unreadable image"),
        (lambda tmp: _file(tmp, b""), r"image file '.*empty\.png' is empty \(0 bytes\)", "unreadable image"),
        (lambda tmp: {"bytes": b"", "path": None}, "image entry has neither bytes nor path", "missing image"),
        (lambda tmp: Image.new("RGB", (0, 0)), "image has size 0x0", "unreadable image"),
        (lambda tmp: Image.new("RGB", (0, 5)), "image has size 0x5", "unreadable image"),
        (
            lambda tmp: _file(tmp, _truncated_jpeg()),
            r"cannot decode image \(OSError: image file is truncated",
            "unreadable image",
        ),
        (lambda tmp: str(tmp), r"cannot decode image \(IsADirectoryError", "unreadable image"),
    ],
    ids=["empty-bytes", "empty-file", "empty-entry", "0x0", "0x5", "truncated-jpeg-file", "a-directory"],
)
def test_empty_zero_size_and_truncated_images_name_the_row(tmp_path, make, message, kind):
    with pytest.raises(DataError, match=rf"^row 5: {message}") as info:
        load_image(make(tmp_path), 5)
    assert info.value.kind == kind


def _file(folder, data: bytes):
    path = folder / "empty.png"
    path.write_bytes(data)
    return path


def _truncated_jpeg() -> bytes:
    import numpy as np

    data = encoded(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)), "JPEG")
    return data[: len(data) // 2]


def test_image_over_the_decompression_bomb_limit_names_the_row(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL refuses images over twice the limit
    with pytest.raises(DataError, match=r"^row 9: image is too large to decode safely .*MAX_IMAGE_PIXELS") as info:
        load_image(encoded(Image.new("RGB", (100, 30))), 9)
    assert info.value.kind == "image too large"
    with pytest.warns(Image.DecompressionBombWarning):  # over the limit but under twice: decoded, with PIL's warning
        assert load_image(encoded(Image.new("RGB", (40, 40))), 9).size == (40, 40)
