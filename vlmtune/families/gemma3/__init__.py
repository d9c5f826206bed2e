"""Gemma-3 (see :mod:`vlmtune.families.gemma3.family`)."""

from vlmtune.families.gemma3.family import GEMMA3

__all__ = ["GEMMA3"]
