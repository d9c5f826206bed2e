"""The canonical conversation row and its validation.

Every data source becomes rows of this shape::

    {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "..."}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "..."}]}],
     "images": [<PIL image | path | bytes | {"bytes": ..., "path": ...}>, ...]}

Images are decoded lazily (:func:`load_image`), so a large dataset does not sit in memory.
"""

from __future__ import annotations

import io
import os
from typing import Any

from PIL import Image, UnidentifiedImageError

ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A row of the user's data cannot be used; the message names the row and the reason."""

    def __init__(self, row: int | str, reason: str, kind: str = "invalid row"):
        self.row, self.reason, self.kind = row, reason, kind
        super().__init__(f"row {row}: {reason}")


def text_of(content: Any) -> str:
    """The text of a message's content (a string, or a list of parts whose text parts are joined)."""
    if isinstance(content, str):
        return content
    return "".join(part.get("text") or "" for part in content if isinstance(part, dict) and part.get("type") == "text")


def count_image_parts(messages: list[dict]) -> int:
    """How many ``{"type": "image"}`` parts the conversation holds."""
    return sum(
        1 for m in messages if not isinstance(m["content"], str) for part in m["content"] if part.get("type") == "image"
    )


def validate_row(row: dict, index: int) -> None:
    """Check one canonical row's structure; raise :class:`DataError` naming ``index`` on the first problem."""
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(index, "has no messages")
    for turn, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(index, f"message {turn} must be a dict with role and content, got {message!r:.60}")
        if message.get("role") not in ROLES:
            raise DataError(index, f"message {turn} has role {message.get('role')!r}; expected one of {ROLES}")
        content = message.get("content")
        if not isinstance(content, (str, list)):
            raise DataError(index, f"message {turn} content must be a string or a list of parts")
        if isinstance(content, list):
            for k, part in enumerate(content):
                if not isinstance(part, dict) or "type" not in part:
                    raise DataError(index, f"message {turn} part {k} must be a dict with a 'type', got {part!r:.60}")
        if message["role"] == "assistant" and not text_of(content).strip():
            raise DataError(index, f"assistant turn (message {turn}) is empty", kind="empty answer")
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
    """Decode one image to RGB, or raise :class:`DataError` naming the row (missing file, unreadable data)."""
    try:
        if isinstance(source, Image.Image):
            image = source
        elif isinstance(source, dict):
            if source.get("bytes"):
                image = Image.open(io.BytesIO(source["bytes"]))
            elif source.get("path"):
                return load_image(source["path"], index)
            else:
                raise DataError(index, "image entry has neither bytes nor path")
        elif isinstance(source, (bytes, bytearray)):
            image = Image.open(io.BytesIO(source))
        elif isinstance(source, (str, os.PathLike)):
            if not os.path.exists(source):
                raise DataError(index, f"image file {str(source)!r} not found", kind="missing image")
            image = Image.open(source)
        else:
            raise DataError(index, f"image of type {type(source).__name__} is not a PIL image, path or bytes")
        image.load()
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(index, f"cannot decode image ({type(err).__name__}: {err})", kind="unreadable image") from err
    if image.width < 1 or image.height < 1:
        raise DataError(index, f"image has size {image.width}x{image.height}", kind="unreadable image")
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB without losing what the picture shows.

    Transparency is composited on white (a transparent-background formula would otherwise turn black on
    black); 16/32-bit grayscale is rescaled to 8 bits (PIL's plain conversion clips it to white); CMYK, palette,
    grayscale and the rest go through PIL's own conversion.
    """
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        import numpy as np

        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        gray = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
