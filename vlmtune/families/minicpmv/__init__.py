"""MiniCPM-V 2.6 / 4.x in the released remote-code layout (see :mod:`vlmtune.families.minicpmv.family`).

``family`` is the descriptor; ``processing`` the processor transformers lacks for this layout; ``image`` its
slicing and placeholders; ``configuration`` and ``modeling`` the native model class (no ``trust_remote_code``);
``vision`` its vision encoder and resampler; ``tiny`` the tiny checkpoint builder.
"""

from vlmtune.families.minicpmv.family import MINICPMV

__all__ = ["MINICPMV"]
