"""Tiny random checkpoints of every supported family, built offline.

Each builder writes a real checkpoint folder (config, safetensors, tokenizer, processor, chat template) that
`transformers.AutoModelForImageTextToText.from_pretrained` and `AutoProcessor.from_pretrained` load (MiniCPM-V
2.6's layout through `vlmtune.load`). Tokenizers are trained with the `tokenizers` library on a small built-in
corpus that includes LaTeX, and carry each family's real special tokens; chat templates follow the family's real
chat format; processors are the real `transformers` processor classes with small image sizes. Nothing is
downloaded. The builders live in each family's folder (``vlmtune/families/<family>/tiny.py``), registered in the
family's descriptor under its ``model_type``.

    python -c "import vlmtune.tiny as t; print(t.build('qwen2_5_vl', 'tiny/qwen2_5_vl'))"
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from vlmtune.families import FAMILIES

logger = logging.getLogger(__name__)

BUILDERS: dict[str, Callable[[Path], None]] = {
    model_type: builder for family in FAMILIES for model_type, builder in family.tiny.items()
}


def build(family: str, out: str | Path, seed: int = 0) -> Path:
    """Write the tiny checkpoint of ``family`` to ``out`` and return the folder.

    Args:
        family: a key of :data:`BUILDERS`, i.e. a ``model_type`` (``"qwen2_5_vl"``, ``"gemma3"``, ...).
        out: target folder; created if missing, files in it are overwritten.
        seed: seed of the random weights.
    """
    if family not in BUILDERS:
        raise ValueError(f"unknown tiny family {family!r}; choose one of {sorted(BUILDERS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    BUILDERS[family](out)
    logger.info("wrote tiny %s checkpoint to %s", family, out)
    return out
