"""The canonical conversation row and its validation.

Every data source becomes rows of this shape::

    {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "..."}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "..."}]}],
     "images": [<PIL image | path | bytes | {"bytes": ..., "path": ...}>, ...]}

Images are decoded lazily (:func:`load_image`), so a large dataset does not sit in memory. Text may be given as
``str`` or as UTF-8 ``bytes`` (a parquet ``binary`` column, as ``datasets`` hands it over); bytes are decoded
strictly (:func:`decode_text`), never with replacement characters. Image parts belong to user (or system) turns:
text written in an assistant turn is the answer, so a literal image tag there is text, not an image.
"""

from __future__ import annotations

import io
import os
from typing import Any

from PIL import Image, UnidentifiedImageError

ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A row of the user's data cannot be used; the message names the row (or the file and line) and the reason.

    Args:
        row: the row's index in the user's data.
        reason: what is wrong, in the user's terms.
        kind: the reason's category, used to count skipped rows (``"missing image"``, ``"empty answer"`` ...).
        where: replaces ``"row N"`` at the start of the message (e.g. ``"train.jsonl line 7"``).
    """

    def __init__(self, row: int | str, reason: str, kind: str = "invalid row", where: str | None = None):
        self.row, self.reason, self.kind = row, reason, kind
        super().__init__(f"{where or f'row {row}'}: {reason}")


def decode_text(value: str | bytes | bytearray, index: int | str, what: str = "text") -> str:
    """``value`` as ``str``; bytes are decoded as UTF-8, else :class:`DataError` naming the row and the byte.

    Bytes are what ``datasets`` hands over for a ``binary`` column; decoding valid UTF-8 is what a user of HF
    datasets expects (a ``Value("string")`` column holds exactly that), while any other encoding is refused rather
    than decoded with replacement characters, which would train on text the user never wrote.
    """
    if not isinstance(value, (bytes, bytearray)):
        return value
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            index,
            f"{what} is not valid UTF-8 (byte 0x{value[err.start]:02x} at offset {err.start}: {err.reason}); "
            "decode it from its real encoding first",
            kind="non-UTF-8 text",
        ) from err


def text_of(content: Any, index: int | str = "?") -> str:
    """The text of a message's content (a string, or a list of parts whose text parts are joined), as ``str``."""
    if isinstance(content, (str, bytes, bytearray)):
        return decode_text(content, index)
    parts = (p for p in content if isinstance(p, dict) and p.get("type") == "text")
    return "".join(decode_text(part.get("text") or "", index) for part in parts)


def count_image_parts(messages: list[dict]) -> int:
    """How many ``{"type": "image"}`` parts the user and system turns hold (assistant turns hold none)."""
    return sum(
        1
        for m in messages
        if m.get("role") != "assistant" and isinstance(m["content"], list)
        for part in m["content"]
        if part.get("type") == "image"
    )


def decoded_messages(messages: list[dict], index: int | str) -> list[dict]:
    """A copy of ``messages`` with every text as ``str`` (UTF-8 bytes decoded); ``messages`` is left as it was."""

    def decoded(part: dict) -> dict:
        return (
            {**part, "text": decode_text(part["text"], index)}
            if isinstance(part.get("text"), (bytes, bytearray))
            else part
        )

    out = []
    for message in messages:
        content = message["content"]
        content = [decoded(p) for p in content] if isinstance(content, list) else decode_text(content, index)
        out.append({**message, "content": content})
    return out


def _check_message(message: Any, turn: int, index: int) -> None:
    if not isinstance(message, dict):
        raise DataError(index, f"message {turn} must be a dict with role and content, got {message!r:.60}")
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise DataError(index, f"message {turn} has role {role!r}; expected one of {ROLES}")
    if isinstance(content, list):
        for k, part in enumerate(content):
            if not isinstance(part, dict) or "type" not in part:
                raise DataError(index, f"message {turn} part {k} must be a dict with a 'type', got {part!r:.60}")
        texts = {f"message {turn} part {k} text": p.get("text") for k, p in enumerate(content) if p["type"] == "text"}
    elif isinstance(content, (str, bytes, bytearray)):
        texts = {f"message {turn} content": content}
    else:
        raise DataError(index, f"message {turn} content must be a string or a list of parts")
    for what, text in texts.items():
        if text is not None and not isinstance(text, (str, bytes, bytearray)):
            raise DataError(index, f"{what} must be a string, got {type(text).__name__}")
        decode_text(text or "", index, what)
    has_text = bool(text_of(content, index).strip())
    if role == "assistant" and not has_text:
        raise DataError(index, f"assistant turn (message {turn}) is empty", kind="empty answer")
    has_image = isinstance(content, list) and any(part["type"] == "image" for part in content)
    if role == "assistant" and has_image:
        # The template would write the tag inside the supervised answer, where it is text, not an image.
        raise DataError(
            index, f"assistant turn (message {turn}) holds an image part; images go in user turns", kind="image count"
        )
    if role == "user" and not has_text and not has_image:
        raise DataError(index, f"user turn (message {turn}) is empty: no text and no image", kind="empty prompt")


def validate_row(row: dict, index: int) -> None:
    """Check one canonical row's structure; raise :class:`DataError` naming ``index`` on the first problem.

    Text may be ``str`` or UTF-8 ``bytes`` (see :func:`decode_text`); image tags are the ``{"type": "image"}``
    parts of user and system turns, and there must be exactly one per entry of ``images``.
    """
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(index, "has no messages")
    for turn, message in enumerate(messages):
        _check_message(message, turn, index)
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(index, "has no assistant turn to learn from")
    images = row.get("images") or []
    if not isinstance(images, (list, tuple)):
        raise DataError(index, f"images must be a list (one entry per image tag), got {type(images).__name__}")
    n_tags = count_image_parts(messages)
    if n_tags != len(images):
        raise DataError(
            index, f"has {n_tags} image tag(s) in its messages but {len(images)} image(s)", kind="image count"
        )


def load_image(source: Any, index: int) -> Image.Image:
    """Decode one image to RGB, or raise :class:`DataError` naming the row (missing file, unreadable data).

    ``source`` is a PIL image, a path, encoded bytes, or a ``{"bytes", "path"}`` dict (the ``datasets`` image
    feature undecoded). Empty data, a 0x0 image and an image over PIL's decompression-bomb limit
    (``PIL.Image.MAX_IMAGE_PIXELS``) are refused; sizes within it are left for the family's processor to resize.
    """
    if isinstance(source, dict):
        if source.get("bytes"):
            return load_image(source["bytes"], index)
        if source.get("path"):
            return load_image(source["path"], index)
        raise DataError(index, "image entry has neither bytes nor path", kind="missing image")
    try:
        if isinstance(source, Image.Image):
            image = source
        elif isinstance(source, (bytes, bytearray)):
            if not source:
                raise DataError(index, "image data is empty (0 bytes)", kind="unreadable image")
            image = Image.open(io.BytesIO(source))
        elif isinstance(source, (str, os.PathLike)):
            if not os.path.exists(source):
                raise DataError(index, f"image file {str(source)!r} not found", kind="missing image")
            if os.path.isfile(source) and os.path.getsize(source) == 0:
                raise DataError(index, f"image file {str(source)!r} is empty (0 bytes)", kind="unreadable image")
            image = Image.open(source)
        else:
            raise DataError(index, f"image of type {type(source).__name__} is not a PIL image, path or bytes")
        image.load()
    except DataError:
        raise  # a ValueError itself: not to be re-wrapped as "cannot decode" below
    except Image.DecompressionBombError as err:
        raise DataError(
            index,
            f"image is too large to decode safely ({err}); downscale it, or raise PIL.Image.MAX_IMAGE_PIXELS "
            "if the file is trusted",
            kind="image too large",
        ) from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(index, f"cannot decode image ({type(err).__name__}: {err})", kind="unreadable image") from err
    if image.width < 1 or image.height < 1:
        raise DataError(index, f"image has size {image.width}x{image.height}", kind="unreadable image")
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB without losing what the picture shows.

    Transparency is composited on white (a transparent-background formula would otherwise turn black on
    black); 16/32-bit grayscale is rescaled to 8 bits (PIL's plain conversion clips it to white), and a float
    image with every value in [0, 1] is read as that range (PIL's conversion would make it black); CMYK,
    palette, grayscale and the rest go through PIL's own conversion.
    """
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        import numpy as np

        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        if image.mode == "F" and array.size and 0.0 <= array.min() and array.max() <= 1.0:
            top = 1.0  # a float picture in [0, 1] (numpy / scikit-image's convention), not one of at most 1/255
        gray = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
