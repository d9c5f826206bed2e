"""Fine-tune a vision-language model on LaTeX-OCR: image of a formula in, its LaTeX out.

    vlmtune train --model PATH --data DIR --out OUT [--quant nf4] [--vision frozen] [--max-steps 200]
    python -m vlmtune.recipes.latex_ocr --model PATH --data DIR --out OUT ...      # the same

PATH is a checkpoint folder of any supported family (Qwen2-VL / Qwen2.5-VL / Qwen3-VL, Gemma-3, MiniCPM-V 2.6 /
4.x / 4.6), or a hub id read through the Hugging Face cache. DIR holds train/test parquet files with `image` and
`text` columns (make some with `vlmtune make-data latex-ocr --n 2000 --out DIR`), or is one file of training rows;
`--eval-data` names held-out rows elsewhere. OUT receives the LoRA adapter, the processor with its chat template,
`vlmtune.json` (this config + package versions), the run's record (`metrics.jsonl`, `report.html`: open it in a
browser) and, when some rows cannot be used, `bad_rows.jsonl`. Up to `--eval-rows` held-out rows (200) are
evaluated before the first step, every `--eval-steps` and at the end: eval loss on all of them, exact match / CER /
BLEU of greedy predictions on the first `--eval-samples`. Checkpoints (`--save-steps N`) go to OUT/checkpoints, and
`--resume` continues from the newest complete one after a crash.

Every flag is a field of LatexOcrConfig, TuningConfig or TrainConfig (`--help` lists them with their defaults).
The whole run is :func:`main`: copy this file (`python -c "import vlmtune.recipes.latex_ocr as r; print(r.__file__)"`)
and change it, rather than adding options to it.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from dataclasses import dataclass, field
from typing import Literal

import vlmtune
from vlmtune.atomic import OutputWriteError
from vlmtune.checkpoints import NoCheckpointError, ResumeError
from vlmtune.data.spec import has_split
from vlmtune.flags import HelpFormatter, add_config_flags, config_from_args

logger = logging.getLogger(__name__)


@dataclass
class LatexOcrConfig:
    """Every knob of the recipe, with its default.

    Attributes:
        model: checkpoint folder, or a hub id read through the Hugging Face cache.
        data: folder with train/test parquet (``image``, ``text``), or one file of training rows; overrides the
            spec's path.
        eval_data: held-out rows to evaluate on (a file, or a folder with a test split); default: the test split
            of ``data`` when it has one, else no evaluation (with a warning: training rows are never evaluated on).
        out: export folder.
        spec: data spec (a bundled name or a YAML path).
        quant: ``"none"`` (16-bit LoRA on CUDA, fp32 on CPU), ``"nf4"`` (QLoRA) or ``"int8"``.
        dtype: compute dtype (``"auto"``, ``"bfloat16"``, ``"float16"``, ``"float32"``).
        eval_rows: test rows held out for evaluation during training (``training.eval_rows``; 0: no evaluation).
            How often and on how many of them it generates: ``training.eval_steps`` and ``training.eval_samples``.
        tuning: which towers train and how (:class:`vlmtune.TuningConfig`).
        training: optimisation (:class:`vlmtune.TrainConfig`; ``output_dir`` follows ``out``).
    """

    model: str = ""
    data: str | None = None
    eval_data: str | None = None
    out: str = "out/latex_ocr"
    spec: str = "latex_ocr"
    quant: Literal["none", "nf4", "int8"] = "none"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    eval_rows: int = 200
    tuning: vlmtune.TuningConfig = field(default_factory=vlmtune.TuningConfig)
    training: vlmtune.TrainConfig = field(
        default_factory=lambda: vlmtune.TrainConfig(max_steps=200, eval_max_new_tokens=96, report_latex=True)
    )


def main(config: LatexOcrConfig) -> dict:
    """Load, tune, train (evaluating on held-out test rows), export; return the losses and final metrics."""
    config.training.output_dir = config.out
    empty = config.training.distributed == "fsdp"  # FSDP2: rank 0 reads the weights, the rest start empty
    model, processor, family = vlmtune.load(
        config.model, quant=config.quant, dtype=config.dtype, empty_on_other_ranks=empty
    )
    model = vlmtune.apply_tuning(model, family, config.tuning)
    train_rows = vlmtune.load_rows(config.spec, split="train", path=config.data)
    test_rows = held_out_rows(config)
    if test_rows is not None:
        config.training.eval_rows = [test_rows[i] for i in range(min(config.eval_rows, len(test_rows)))]
    result = vlmtune.train(model, processor, family, train_rows, config.training, config.tuning)
    vlmtune.export(result.model, processor, config.out, recipe=config, base_model=config.model)
    summary = {"losses": result.losses, "kept_rows": result.kept_rows, "skipped_rows": result.skipped_rows}
    final = result.metrics  # the exported model's: the best checkpoint's with --best-metric, else the last
    if final:
        summary["eval_loss"] = final["eval_loss"]
    if final.get("cer") is not None:
        summary["metrics"] = {k: final[k] for k in ("exact_match", "cer", "bleu")}
        logger.info("test metrics on %d rows: %s", config.training.eval_samples, summary["metrics"])
    return summary


def held_out_rows(config: LatexOcrConfig):
    """The rows to evaluate on: ``eval_data``, else ``data``'s test split; ``None`` (warned) when there are none."""
    if config.eval_rows <= 0:
        return None
    if config.eval_data is not None:
        return vlmtune.load_rows(config.spec, split="test", path=config.eval_data)
    if not has_split(config.spec, "test", config.data):
        where = config.data or f"the {config.spec!r} spec's path"
        logger.warning("%s has no test split: no evaluation (pass --eval-data with held-out rows)", where)
        return None
    return vlmtune.load_rows(config.spec, split="test", path=config.data)


_SHORTCUT = {"action": "store_const", "default": argparse.SUPPRESS}


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """One flag per field of :class:`LatexOcrConfig` and its nested configs, defaults and help from the dataclasses."""
    parser = argparse.ArgumentParser(
        prog=prog,
        usage=f"{prog or '%(prog)s'} --model PATH --data DIR --out OUT [flags]",
        description=__doc__,
        formatter_class=HelpFormatter,
    )
    # eval_rows are filled from --eval-data / the test split; resume_from_checkpoint is the deprecated name of --resume.
    skip = {"training.output_dir", "training.eval_rows", "training.resume_from_checkpoint"}
    add_config_flags(parser, LatexOcrConfig(), skip=skip, required={"model"})
    shortcuts = parser.add_argument_group("shortcuts")
    shortcuts.add_argument("--qlora", dest="quant", const="nf4", help="= --quant nf4", **_SHORTCUT)
    shortcuts.add_argument(
        "--no-tune-vision", dest="tuning.vision", const="frozen", help="= --vision frozen", **_SHORTCUT
    )
    shortcuts.add_argument(
        "--max-new-tokens",
        dest="training.eval_max_new_tokens",
        type=int,
        metavar="INT",
        default=argparse.SUPPRESS,
        help="= --eval-max-new-tokens",
    )
    return parser


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> LatexOcrConfig:
    """Command-line flags → :class:`LatexOcrConfig`; an invalid value raises the config's ``ValueError``."""
    return config_from_args(LatexOcrConfig(), build_parser(prog).parse_args(argv))


if __name__ == "__main__":
    from vlmtune.distributed import is_main

    # force: under `vlmtune train` the CLI has already set WARNING; the recipe says what it does at INFO (under a
    # launcher, rank 0 does; the others say only what goes wrong).
    level = logging.INFO if is_main() else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)
    cfg = parse_args()
    logger.info("config: %s", dataclasses.asdict(cfg))
    try:
        summary = main(cfg)
    except (ResumeError, NoCheckpointError, OutputWriteError) as err:
        sys.exit(f"error: {err}")  # the message says what to do; a traceback would only bury it
    if is_main() and summary["losses"]:
        print(f"first loss {summary['losses'][0]:.4f}, last loss {summary['losses'][-1]:.4f}")
    if is_main() and "metrics" in summary:
        print("test metrics:", {k: round(v, 4) for k, v in summary["metrics"].items()})
    if is_main() and cfg.training.report:
        print(f"report: {cfg.out}/report.html")
