"""Deprecated: the former name of :mod:`vlmtune.families` (``Adapter`` is now ``Family``), kept for one release."""

import warnings

from vlmtune.families import REGISTRY, Family, ImageBatch, LoraTargets, detect

Adapter = Family

warnings.warn(
    "vlmtune.adapters is deprecated and will be removed; use vlmtune.families (Adapter is now Family)",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = ["REGISTRY", "Adapter", "ImageBatch", "LoraTargets", "detect"]
