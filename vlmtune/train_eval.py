"""Evaluation during training: its Trainer arguments, the held-out data, the kernels turned off for generation,
and the callbacks that log, evaluate and report, wired onto a ``Trainer`` by :func:`attach`.

At each evaluation (before the first step, every ``TrainConfig.eval_steps``, at the end) the Trainer computes
the eval loss over the held-out rows with vlmtune's collator (the fused loss of the kernels gives it without
logits), then :class:`~vlmtune.evaluation_callback.GenerationEval` generates on the first ``eval_samples`` of them
and adds exact match, CER and BLEU to the same evaluation, so ``best_metric`` and every Trainer integration see
them. This module imports no transformers at import time (``vlmtune.train`` imports it); the callbacks live in
:mod:`vlmtune.evaluation_callback` and :mod:`vlmtune.metrics_log`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmtune.data.bad_rows import BadRows
from vlmtune.data.collator import Collator, PreparedDataset
from vlmtune.data.schema import DataError

logger = logging.getLogger(__name__)

BEST_METRICS = {"cer": False, "exact_match": True, "bleu": True, "loss": False}
"""``TrainConfig.best_metric`` choices, each with whether greater is better."""


def check_best_metric(best_metric: str | None, eval_steps: int, save_steps: int, eval_samples: int) -> None:
    """Refuse a ``best_metric`` the run cannot select by, saying which setting to change."""
    if best_metric is None:
        return
    if best_metric not in BEST_METRICS:
        raise ValueError(f"best_metric must be one of {sorted(BEST_METRICS)} or None, got {best_metric!r}")
    if eval_steps < 1 or save_steps < 1 or save_steps % eval_steps:
        raise ValueError(
            f"best_metric={best_metric!r} picks among checkpoints saved at evaluations: set eval_steps > 0 and "
            f"save_steps to a multiple of it (got eval_steps={eval_steps}, save_steps={save_steps})"
        )
    if best_metric != "loss" and eval_samples < 1:
        raise ValueError(f"best_metric={best_metric!r} is a generation metric: set eval_samples > 0")


def eval_arguments(config, has_eval: bool) -> dict[str, Any]:
    """The ``TrainingArguments`` of evaluation, token counting and best-checkpoint selection for ``config``."""
    arguments: dict[str, Any] = {
        # Packed rows have no padding and (Qwen-VL, MiniCPM-V) no attention mask to count non-padding tokens by.
        "include_num_input_tokens_seen": "all" if config.packing else "non_padding",
        "per_device_eval_batch_size": config.batch_size,
    }
    if not has_eval:
        return arguments
    arguments.update(
        # A resumed run already has its step-0 evaluation (metrics.jsonl keeps it).
        eval_on_start=not config.resume,
        # eval_steps 0: the end-of-training evaluation comes from EvaluateAtEnd, not from a step interval.
        eval_strategy="steps" if config.eval_steps > 0 else "no",
        eval_steps=config.eval_steps or None,
        prediction_loss_only=True,
    )
    if config.best_metric is not None:
        arguments.update(
            metric_for_best_model=f"eval_{config.best_metric}",
            greater_is_better=BEST_METRICS[config.best_metric],
            load_best_model_at_end=True,
        )
    return arguments


def prepare_eval(config, collator: Collator) -> PreparedDataset | None:
    """The held-out rows checked like the training rows; errors name them as eval rows."""
    if config.eval_rows is None:
        if config.best_metric is not None:
            raise ValueError(f"best_metric={config.best_metric!r} needs held-out rows: set TrainConfig.eval_rows")
        return None
    try:
        return PreparedDataset(
            config.eval_rows,
            collator,
            overflow=config.overflow,
            on_bad_row=config.on_bad_row,
            bad_rows_path=Path(config.output_dir) / "bad_eval_rows.jsonl",
            what="held-out rows",
        )
    except BadRows as err:
        errors = [DataError(e.row, e.reason, e.kind, where=f"eval row {e.row}") for e in err.errors]
        raise BadRows(errors, err.total, err.path) from err
    except DataError as err:
        raise DataError(err.row, err.reason, err.kind, where=f"eval row {err.row}") from err


class KernelSwitch:
    """The run's Triton kernels, on for training and off while generating.

    Generation needs the logits that the fused loss never builds, and ``vlmtune eval`` generates with the plain
    model: evaluation generates with every forward restored, so its predictions are the export's. Turning the
    patch off and on walks the modules once each way (milliseconds); the compiled kernels stay cached.
    """

    def __init__(self, model, family, enabled: bool):
        self.model, self.family, self.patch = model, family, None
        if enabled:
            self.on()

    def on(self) -> None:
        """Patch the kernels in (no-op when they are)."""
        from vlmtune.kernels.patch import apply_kernels

        if self.patch is None:
            self.patch = apply_kernels(self.model, self.family)

    def off(self) -> None:
        """Restore every forward (no-op when the kernels are off)."""
        if self.patch is not None:
            self.patch.revert()
            self.patch = None

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """The plain model inside the block; the kernels as they were after it."""
        active = self.patch is not None
        self.off()
        try:
            yield
        finally:
            if active:
                self.on()


@dataclass
class RunWatch:
    """What :func:`attach` put on the Trainer, and what :func:`vlmtune.train` returns from it."""

    metrics_log: Any
    eval_prepared: PreparedDataset | None
    best_metric: str | None = None
    callbacks: list = field(default_factory=list)

    def result_fields(self, trainer) -> dict[str, Any]:
        """``TrainResult`` fields: held-out rows kept / skipped, the evaluations, the best step."""
        prepared = self.eval_prepared
        best = trainer.state.best_global_step if self.best_metric and trainer.state.best_model_checkpoint else None
        return {
            "kept_eval_rows": len(prepared) if prepared is not None else 0,
            "skipped_eval_rows": dict(prepared.skipped) if prepared is not None else {},
            "evaluations": list(self.metrics_log.evaluations),
            "best_step": best,
        }


def attach(trainer, processor, summary: dict[str, Any], config, eval_prepared, kernels: KernelSwitch) -> RunWatch:
    """Put the evaluation, metrics, report and progress callbacks on ``trainer``, in the order they must run.

    Args:
        trainer: the run's ``Trainer`` (its ``eval_dataset`` already set when there are held-out rows).
        processor: the family's processor (generation).
        summary: what the run is (:func:`vlmtune.metrics_log.run_summary`), recorded in ``run.json``.
        config: the run's ``TrainConfig``.
        eval_prepared: the checked held-out rows, or None.
        kernels: the run's kernel switch, paused while generating.
    """
    from transformers import ProgressCallback

    from vlmtune.evaluation_callback import EvaluateAtEnd, GenerationEval
    from vlmtune.metrics_log import MetricsLog, RunProgress

    out = Path(config.output_dir) if config.report else None
    callbacks = []
    if eval_prepared is not None:
        if config.eval_steps == 0:
            callbacks.append(EvaluateAtEnd())
        if config.eval_samples > 0:
            rows = [eval_prepared[i]["row"] for i in range(min(config.eval_samples, len(eval_prepared)))]
            callbacks.append(
                GenerationEval(
                    rows, processor, config.eval_max_new_tokens, config.image_options, kernels, trainer.log, out
                )
            )
    metrics_log = MetricsLog(out, summary)
    # GenerationEval adds its metrics to an evaluation before MetricsLog writes it, and before the progress bar.
    callbacks += [metrics_log, RunProgress(metrics_log)]
    trainer.remove_callback(ProgressCallback)
    for callback in callbacks:
        trainer.add_callback(callback)
    return RunWatch(metrics_log, eval_prepared, config.best_metric, callbacks)
