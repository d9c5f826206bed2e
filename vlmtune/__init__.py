"""vlmtune: fine-tune vision-language models (Gemma-3, Qwen-VL, MiniCPM-V) with LoRA and QLoRA.

The public API::

    import vlmtune
    model, processor, family = vlmtune.load("path/to/checkpoint", quant="nf4")
    model = vlmtune.apply_tuning(model, family, vlmtune.TuningConfig(vision="frozen"))
    rows = vlmtune.load_rows("latex_ocr", split="train", path="data/latex_ocr")
    result = vlmtune.train(model, processor, family, rows, vlmtune.TrainConfig(output_dir="out"))
    vlmtune.export(result.model, processor, "out", recipe=...)
"""

from vlmtune import quiet
from vlmtune.data.spec import DataSpec, load_rows
from vlmtune.export import export, load_exported, merge
from vlmtune.families import detect
from vlmtune.loading import load
from vlmtune.train import TrainConfig, TrainResult, train
from vlmtune.tuning import TuningConfig, apply_tuning

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
