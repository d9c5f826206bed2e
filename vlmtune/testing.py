"""Small helpers for tests of adapters and data code: random images, conversations, collating rows.

from vlmtune.testing import collate, noise, single
batch = collate(collator, (single("Read it.", "x^{2}"), [noise((64, 32))]))
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A random RGB image of PIL ``size`` (width, height): every pixel matters for pixel_values equality."""
    width, height = size
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def turn(role: str, text: str, n_images: int = 0) -> dict:
    """One message: ``n_images`` image parts, then the text."""
    return {"role": role, "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}


def single(question: str, answer: str, n_images: int = 1) -> list[dict]:
    """A one-turn conversation: the user's images and question, the assistant's answer."""
    return [turn("user", question, n_images), turn("assistant", answer)]


def collate(collator, *rows):
    """Collate ``(messages, images)`` pairs as dataset items numbered from 0."""
    return collator([{"index": i, "row": {"messages": m, "images": imgs}} for i, (m, imgs) in enumerate(rows)])
