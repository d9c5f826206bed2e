"""MiniCPM-V 4.6, transformers' native layout (see :mod:`vlmtune.families.minicpmv4_6.family`)."""

from vlmtune.families.minicpmv4_6.family import MINICPMV4_6

__all__ = ["MINICPMV4_6"]
