"""vlmtune: fine-tune vision-language models (Gemma-3, Qwen-VL, MiniCPM-V) with LoRA and QLoRA.

The public API::

    import vlmtune
    model, processor, family = vlmtune.load("path/to/checkpoint", quant="nf4")
    model = vlmtune.apply_tuning(model, family, vlmtune.TuningConfig(vision="frozen"))
    rows = vlmtune.load_rows("latex_ocr", split="train", path="data/latex_ocr")
    result = vlmtune.train(model, processor, family, rows, vlmtune.TrainConfig(output_dir="out"))
    vlmtune.export(result.model, processor, "out", recipe=...)
"""

import os

# Packed steps and token budgets change the step's shape every step; expandable segments keep the CUDA caching
# allocator from fragmenting over them (a cap that fits the probe step then fits the run). The allocator reads
# this when CUDA starts, so it is set on import; a setting of the user's own is left as it is.
if "PYTORCH_CUDA_ALLOC_CONF" not in os.environ and "PYTORCH_ALLOC_CONF" not in os.environ:
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"

from vlmtune import quiet  # noqa: E402
from vlmtune.data.spec import DataSpec, load_rows  # noqa: E402
from vlmtune.export import export, load_exported, merge  # noqa: E402
from vlmtune.families import detect  # noqa: E402
from vlmtune.loading import load  # noqa: E402
from vlmtune.train import TrainConfig, TrainResult, train  # noqa: E402
from vlmtune.tuning import TuningConfig, apply_tuning  # noqa: E402

__version__ = "0.1.0"

quiet.install()

__all__ = [
    "DataSpec",
    "TrainConfig",
    "TrainResult",
    "TuningConfig",
    "apply_tuning",
    "detect",
    "export",
    "load",
    "load_exported",
    "load_rows",
    "merge",
    "train",
]
