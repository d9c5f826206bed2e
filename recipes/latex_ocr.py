"""Fine-tune a vision-language model on LaTeX-OCR: image of a formula in, its LaTeX out.

    python recipes/latex_ocr.py --model PATH --data DIR --out OUT [--qlora] [--no-tune-vision] [--max-steps 200]
    python recipes/latex_ocr.py ... --save-steps 50 --resume      # the same command again, after a crash

PATH is a local checkpoint folder (Qwen2-VL / Qwen2.5-VL, Gemma-3), DIR holds train/test parquet files with
`image` and `text` columns (make some with `vlmtune make-data latex-ocr --n 2000 --out DIR`). OUT receives the
LoRA adapter, the processor with its chat template, `vlmtune.json` (this config + package versions), and the run's
record: `metrics.jsonl` and `report.html` (open it in a browser). With `--eval-rows` test rows held out (200 by
default), the run evaluates before the first step, every `--eval-steps` and at the end: eval loss on all of them,
exact match / CER / BLEU of greedy predictions on the first `--eval-samples`.
Checkpoints go to OUT/checkpoints, and `--resume` continues from the newest complete one.

The whole run is :func:`main`: copy this file and change it, rather than adding options to it.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from dataclasses import dataclass, field

import vlmtune
from vlmtune.atomic import OutputWriteError
from vlmtune.checkpoints import NoCheckpointError, ResumeError

logger = logging.getLogger("recipes.latex_ocr")


@dataclass
class LatexOcrConfig:
    """Every knob of the recipe, with its default.

    Attributes:
        model: local checkpoint folder.
        data: folder with train/test parquet (``image``, ``text``); overrides the spec's path.
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
    out: str = "out/latex_ocr"
    spec: str = "latex_ocr"
    quant: str = "none"
    dtype: str = "auto"
    eval_rows: int = 200
    tuning: vlmtune.TuningConfig = field(default_factory=vlmtune.TuningConfig)
    training: vlmtune.TrainConfig = field(
        default_factory=lambda: vlmtune.TrainConfig(max_steps=200, eval_max_new_tokens=96, report_latex=True)
    )


def main(config: LatexOcrConfig) -> dict:
    """Load, tune, train (evaluating on held-out test rows), export; return the losses and final metrics."""
    config.training.output_dir = config.out
    model, processor, family = vlmtune.load(config.model, quant=config.quant, dtype=config.dtype)
    model = vlmtune.apply_tuning(model, family, config.tuning)
    train_rows = vlmtune.load_rows(config.spec, split="train", path=config.data)
    if config.eval_rows > 0:
        test_rows = vlmtune.load_rows(config.spec, split="test", path=config.data)
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


def parse_args(argv: list[str] | None = None) -> LatexOcrConfig:
    """Command-line flags → :class:`LatexOcrConfig` (flags mirror the config fields)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", default=None)
    parser.add_argument("--out", default="out/latex_ocr")
    parser.add_argument("--spec", default="latex_ocr")
    parser.add_argument("--qlora", action="store_true", help="4-bit NF4 language tower (QLoRA)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--eval-rows", type=int, default=200, help="test rows held out for evaluation (0: none)")
    parser.add_argument("--eval-steps", type=int, default=0, help="evaluate every N steps (0: at start and end)")
    parser.add_argument("--eval-samples", type=int, default=16, help="held-out rows generated on per evaluation")
    parser.add_argument(
        "--eval-max-new-tokens", "--max-new-tokens", type=int, default=96, help="generation budget at evaluation"
    )
    parser.add_argument("--best-metric", choices=["cer", "exact_match", "bleu", "loss"], default=None)
    parser.add_argument("--vision", choices=["frozen", "lora", "full"], default="lora")
    parser.add_argument("--no-tune-vision", action="store_true", help="same as --vision frozen")
    parser.add_argument("--projector", choices=["frozen", "lora", "full"], default="frozen")
    parser.add_argument("--language", choices=["frozen", "lora", "full"], default="lora")
    parser.add_argument("--no-attention", action="store_true", help="no LoRA on attention projections")
    parser.add_argument("--no-mlp", action="store_true", help="no LoRA on MLP projections")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--alpha", type=int, default=16)
    parser.add_argument("--lora-dropout", type=float, default=0.0)
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--vision-lr", type=float, default=None, help="vision tower LR (default: --lr)")
    parser.add_argument("--no-kernels", action="store_true", help="plain transformers path on CUDA")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--packing", action="store_true", help="padding-free packing into rows of --max-length")
    parser.add_argument("--max-pixels", type=int, default=None, help="Qwen-VL: cap on image pixels")
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps (0: none)")
    parser.add_argument("--save-total-limit", type=int, default=None, help="complete checkpoints to keep")
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="PATH",
        help="continue from the newest complete checkpoint in OUT/checkpoints, or from PATH",
    )
    parser.add_argument("--resume-force", action="store_true", help="resume even if the run's settings changed")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    tuning = vlmtune.TuningConfig(
        vision="frozen" if args.no_tune_vision else args.vision,
        projector=args.projector,
        language=args.language,
        attention=not args.no_attention,
        mlp=not args.no_mlp,
        r=args.r,
        alpha=args.alpha,
        dropout=args.lora_dropout,
        vision_lr=args.vision_lr,
    )
    training = vlmtune.TrainConfig(
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        max_length=args.max_length,
        logging_steps=args.logging_steps,
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        seed=args.seed,
        kernels=False if args.no_kernels else None,
        packing=args.packing,
        image_options={"max_pixels": args.max_pixels} if args.max_pixels else {},
        resume=args.resume,
        resume_force=args.resume_force,
        eval_steps=args.eval_steps,
        eval_samples=args.eval_samples,
        eval_max_new_tokens=args.eval_max_new_tokens,
        best_metric=args.best_metric,
        report_latex=True,
    )
    return LatexOcrConfig(
        model=args.model,
        data=args.data,
        out=args.out,
        spec=args.spec,
        quant="nf4" if args.qlora else "none",
        dtype=args.dtype,
        eval_rows=args.eval_rows,
        tuning=tuning,
        training=training,
    )


if __name__ == "__main__":
    # force: under `vlmtune train` the CLI has already set WARNING; the recipe says what it does at INFO.
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True)
    cfg = parse_args()
    logger.info("config: %s", dataclasses.asdict(cfg))
    try:
        summary = main(cfg)
    except (ResumeError, NoCheckpointError, OutputWriteError) as err:
        sys.exit(f"error: {err}")  # the message says what to do; a traceback would only bury it
    if summary["losses"]:
        print(f"first loss {summary['losses'][0]:.4f}, last loss {summary['losses'][-1]:.4f}")
    if "metrics" in summary:
        print("test metrics:", {k: round(v, 4) for k, v in summary["metrics"].items()})
    if cfg.training.report:
        print(f"report: {cfg.out}/report.html")
