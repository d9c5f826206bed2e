"""Model families, one folder each, registered by ``config.model_type``.

A family folder ``vlmtune/families/<family>/`` holds everything vlmtune knows about that family: its
descriptor (a :class:`~vlmtune.families.base.Family`, in ``family.py``), its tiny builder (``tiny.py``), and where
the family needs them its processor, model code and image slicing. Adding a family: write that folder, add its
descriptor to :data:`FAMILIES` below, and add its entry to the family conformance suite
(``tests/families/test_conformance.py``).
"""

from __future__ import annotations

from vlmtune.families.base import Family, ImageBatch, LoraTargets
from vlmtune.families.gemma3 import GEMMA3
from vlmtune.families.minicpmv import MINICPMV
from vlmtune.families.minicpmv4_6 import MINICPMV4_6
from vlmtune.families.qwen_vl import QWEN2_5_VL, QWEN3_VL

FAMILIES: tuple[Family, ...] = (QWEN2_5_VL, QWEN3_VL, GEMMA3, MINICPMV4_6, MINICPMV)

REGISTRY: dict[str, Family] = {model_type: family for family in FAMILIES for model_type in family.model_types}


class UnsupportedModelError(ValueError):
    """A checkpoint's ``model_type`` is not one vlmtune has a family for."""


def detect(config) -> Family:
    """The family of a loaded ``PretrainedConfig`` (or anything with ``model_type``)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in REGISTRY:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported by vlmtune; supported: {sorted(REGISTRY)}"
        )
    return REGISTRY[model_type]


__all__ = ["FAMILIES", "REGISTRY", "Family", "ImageBatch", "LoraTargets", "UnsupportedModelError", "detect"]
