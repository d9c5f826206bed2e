"""Trainer callbacks of evaluation during training: generation metrics on held-out rows, and an evaluation at the
last step when no step interval asks for one. Wired by :func:`vlmtune.train_eval.attach`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from transformers import TrainerCallback

from vlmtune import run_files
from vlmtune.data.schema import load_image, text_of
from vlmtune.evaluate import answer_of, generate, ocr_metrics, prompt_messages

logger = logging.getLogger(__name__)

REPORT_SAMPLES = 16
"""Held-out samples whose image is saved for the report's grid."""
THUMBNAIL_PIXELS = 512
"""Longest side of a saved sample image (a page scan would make the report tens of megabytes)."""


class GenerationEval(TrainerCallback):
    """At each evaluation, greedy predictions for the held-out ``rows``: exact match, CER and BLEU.

    The metrics join the Trainer's evaluation (``eval_exact_match``, ``eval_cer``, ``eval_bleu``, and the
    generation time ``eval_generation_s``), so ``metric_for_best_model`` can select by them, and are logged
    through ``log`` (the Trainer's), so TensorBoard / W&B see them at the evaluation's step. Generation is the
    one :func:`vlmtune.evaluate.generate` that ``vlmtune eval`` runs, on the plain model (kernels paused), in
    eval mode and under ``no_grad``. Every rank generates (the metric must be known on all of them for the
    best-checkpoint choice); only the main process writes files.

    Args:
        rows: the held-out rows to generate on (already checked).
        processor: the family's processor.
        max_new_tokens: generation budget per row.
        image_options: image-processor options of the run.
        kernels: the run's :class:`~vlmtune.train_eval.KernelSwitch`.
        log: the Trainer's ``log``.
        out: the run folder for ``predictions.jsonl`` and the sample images (None: write nothing).
    """

    def __init__(self, rows, processor, max_new_tokens, image_options, kernels, log: Callable, out: Path | None):
        self.rows, self.processor, self.max_new_tokens = rows, processor, max_new_tokens
        self.image_options, self.kernels, self.log, self.out = image_options, kernels, log, out
        self.references = [answer_of(row) for row in rows]

    def on_train_begin(self, args, state, control, **kwargs):
        if self.out is not None and state.is_world_process_zero:
            save_samples(self.rows, self.references, self.out)

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        start = time.perf_counter()
        with self.kernels.paused():
            predictions = generate(model, self.processor, self.rows, self.max_new_tokens, self.image_options)
        scores = {f"eval_{k}": v for k, v in ocr_metrics(predictions, self.references).items()}
        scores["eval_generation_s"] = time.perf_counter() - start
        if metrics is not None:
            metrics.update(scores)
        self.log(dict(scores))
        if self.out is not None and state.is_world_process_zero:
            run_files.append_line(
                self.out / run_files.PREDICTIONS, {"step": state.global_step, "predictions": predictions}
            )
        logger.info("step %d: generation metrics on %d held-out rows: %s", state.global_step, len(self.rows), scores)


class EvaluateAtEnd(TrainerCallback):
    """An evaluation after the last step, when ``eval_steps`` is 0 (the Trainer's own end-of-run evaluation
    needs a step interval)."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_evaluate = True


def save_samples(rows, references: list[str], out: Path) -> None:
    """``eval_samples/samples.json`` (reference and prompt of each row) and the first images, as PNG."""
    folder = out / run_files.SAMPLES
    folder.mkdir(parents=True, exist_ok=True)
    samples = []
    for index, (row, reference) in enumerate(zip(rows, references, strict=True)):
        image_name = None
        sources = row.get("images") or []
        if sources and index < REPORT_SAMPLES:
            image = load_image(sources[0], index)
            image.thumbnail((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))
            image_name = f"{index:02d}.png"
            image.save(folder / image_name, format="PNG")
        prompt = " ".join(text_of(m["content"], index) for m in prompt_messages(row) if m["role"] == "user")
        samples.append({"reference": reference, "image": image_name, "images": len(sources), "prompt": prompt})
    run_files.write_json(out / run_files.SAMPLES_INDEX, {"samples": samples})
