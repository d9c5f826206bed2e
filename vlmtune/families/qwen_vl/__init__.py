"""Qwen-VL: Qwen2-VL, Qwen2.5-VL and Qwen3-VL (see :mod:`vlmtune.families.qwen_vl.family`)."""

from vlmtune.families.qwen_vl.family import QWEN2_5_VL, QWEN3_VL

__all__ = ["QWEN2_5_VL", "QWEN3_VL"]
