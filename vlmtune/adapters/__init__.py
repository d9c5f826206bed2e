"""Model-family adapters, registered by ``config.model_type``.

Adding a family: write ``vlmtune/adapters/<family>.py`` building an :class:`~vlmtune.adapters.base.Adapter`,
add one line per model type to :data:`REGISTRY`, a tiny builder in ``vlmtune/tiny.py`` and
``tests/adapters/test_<family>.py``.
"""

from __future__ import annotations

from vlmtune.adapters.base import Adapter, ImageBatch, LoraTargets
from vlmtune.adapters.gemma3 import GEMMA3
from vlmtune.adapters.minicpmv import MINICPMV
from vlmtune.adapters.minicpmv4_6 import MINICPMV4_6
from vlmtune.adapters.qwen_vl import QWEN2_5_VL, QWEN3_VL

REGISTRY: dict[str, Adapter] = {
    "qwen2_vl": QWEN2_5_VL,
    "qwen2_5_vl": QWEN2_5_VL,
    "qwen3_vl": QWEN3_VL,
    "gemma3": GEMMA3,
    "minicpmv4_6": MINICPMV4_6,
    "minicpmv": MINICPMV,
}


def detect(config) -> Adapter:
    """The adapter for a loaded ``PretrainedConfig`` (or anything with ``model_type``)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in REGISTRY:
        raise ValueError(f"model_type {model_type!r} is not supported by vlmtune; supported: {sorted(REGISTRY)}")
    return REGISTRY[model_type]


__all__ = ["REGISTRY", "Adapter", "ImageBatch", "LoraTargets", "detect"]
