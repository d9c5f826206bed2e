"""Trainer callbacks that record a run: ``metrics.jsonl`` and ``run.json`` (:mod:`vlmtune.run_files`), the report
refreshed at every checkpoint and at the end, and a progress bar with loss, tokens/s and time left.

A train line (``"kind": "train"``, one per logged step)::

    {"step": 20, "epoch": 0.5, "loss": 1.23, "lr": 1.9e-4, "grad_norm": 0.8, "tokens": 81920, "tokens_per_s": 4100.0,
     "train_s": 19.9, "step_time_s": 1.99, "elapsed_s": 31.2, "gpu_peak_gib": 17.4}

``tokens`` counts the input tokens seen so far (images' tokens included, padding not); ``train_s`` is the
training time since the previous line, without the evaluations and checkpoints in between, so ``tokens_per_s``
and ``step_time_s`` measure training alone; ``elapsed_s`` is the wall time of the whole run (resumed runs
continue it); ``gpu_peak_gib`` is the process's peak CUDA memory allocated so far (``null`` off CUDA). An eval
line (``"kind": "eval"``, one per evaluation, step 0 before training)::

    {"step": 20, "epoch": 0.5, "eval_loss": 1.4, "exact_match": 0.25, "cer": 0.31, "bleu": 0.42, "eval_loss_s": 3.1,
     "generation_s": 12.0, "eval_s": 15.2, "elapsed_s": 46.4}
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from transformers import ProgressCallback, TrainerCallback

from vlmtune import run_files
from vlmtune.export import jsonable, package_versions

logger = logging.getLogger(__name__)


def run_summary(model, family, tuning, config, prepared, eval_prepared, kernels: bool) -> dict[str, Any]:
    """What the run is, for ``run.json`` and the report's summary.

    Args:
        model: the tuned model (a ``PeftModel`` or a transformers model).
        family: its family descriptor.
        tuning: the :class:`~vlmtune.TuningConfig` it was built with.
        config: the run's :class:`~vlmtune.TrainConfig`.
        prepared: the checked training rows (a ``PreparedDataset``).
        eval_prepared: the checked held-out rows, or None.
        kernels: whether the Triton kernels are on.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    first = next(model.parameters())
    rows = {"train": {"kept": len(prepared), "skipped": dict(prepared.skipped)}}
    if eval_prepared is not None:
        rows["eval"] = {"kept": len(eval_prepared), "skipped": dict(eval_prepared.skipped)}
    floating = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return {
        "base_model": str(getattr(base, "name_or_path", "") or ""),
        "family": family.name,
        "model_type": getattr(base.config, "model_type", None),
        "towers": {"vision": tuning.vision, "projector": tuning.projector, "language": tuning.language},
        "lora": {"r": tuning.r, "alpha": tuning.alpha, "dropout": tuning.dropout, "use_rslora": tuning.use_rslora},
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "parameters": sum(_stored_numel(p) for p in model.parameters()),
        "quant": quant_of(base),
        "dtype": str(floating).removeprefix("torch."),
        "kernels": kernels,
        "device": torch.cuda.get_device_name(first.device) if first.device.type == "cuda" else first.device.type,
        "rows": rows,
        "config": jsonable(config),
        "versions": package_versions(),
    }


def _stored_numel(parameter: torch.Tensor) -> int:
    # bitsandbytes' Params4bit stores two 4-bit values per byte; its quant_state keeps the unpacked shape.
    state = getattr(parameter, "quant_state", None)
    return state.shape.numel() if state is not None else parameter.numel()


def quant_of(model) -> str:
    """``"nf4"`` / ``"fp4"`` (4-bit), ``"int8"``, another method's name, or ``"none"``."""
    config = getattr(model.config, "quantization_config", None)
    if config is None:
        return "none"
    config = config if isinstance(config, dict) else config.to_dict()
    if config.get("load_in_4bit"):
        return str(config.get("bnb_4bit_quant_type", "4bit"))
    if config.get("load_in_8bit"):
        return "int8"
    return str(config.get("quant_method", "quantized"))


def gpu_peak_gib() -> float | None:
    """Peak CUDA memory allocated by this process so far, in GiB (None without CUDA in use)."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    return torch.cuda.max_memory_allocated() / 2**30


class MetricsLog(TrainerCallback):
    """Write ``metrics.jsonl`` and ``run.json`` as the run goes; rebuild the report at checkpoints and at the end.

    Every rank keeps :attr:`evaluations` (the eval lines, those before a resume included); only the main process
    writes. ``out`` None writes nothing.
    """

    def __init__(self, out: Path | None, summary: dict[str, Any]):
        self.out, self.summary = out, summary
        self.evaluations: list[dict[str, Any]] = []
        self.last_line: dict[str, Any] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.start = self.last_log = self.last_event = now
        self.paused, self.last_step, self.last_tokens = 0.0, state.global_step, state.num_input_tokens_seen
        kept = []
        if self.out is not None:
            # Resuming at step N: the lines after N were written by the killed run after its last checkpoint and
            # are about to be done again. A fresh run (step 0) starts the files over.
            through = state.global_step if state.global_step > 0 else -1
            if state.is_world_process_zero:
                self.out.mkdir(parents=True, exist_ok=True)
                kept = run_files.keep_through(self.out / run_files.METRICS, through)
                run_files.keep_through(self.out / run_files.PREDICTIONS, through)
                self._write_run(args, state, finished=False)
            else:
                kept = [r for r in run_files.read_lines(self.out / run_files.METRICS) if r["step"] <= through]
        self.elapsed_before = max((r.get("elapsed_s", 0.0) for r in kept), default=0.0)
        self.evaluations = [r for r in kept if r["kind"] == "eval"]

    def on_step_end(self, args, state, control, **kwargs):
        self.last_event = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return  # evaluations are written whole in on_evaluate; the end-of-run summary is not a step
        now = time.perf_counter()
        train_s = max(now - self.last_log - self.paused, 1e-9)
        tokens = state.num_input_tokens_seen
        line = {
            "kind": "train",
            "step": state.global_step,
            "epoch": state.epoch,
            "loss": logs["loss"],
            "lr": logs.get("learning_rate"),
            "grad_norm": logs.get("grad_norm"),
            "tokens": tokens,
            "tokens_per_s": (tokens - self.last_tokens) / train_s,
            "train_s": train_s,
            "step_time_s": train_s / max(1, state.global_step - self.last_step),
            "elapsed_s": self._elapsed(now),
            "gpu_peak_gib": gpu_peak_gib(),
            "collate_s": logs.get("collate_s"),  # per batch, from vlmtune.data.host.TimedCollate
        }
        self._append(state, line)
        self.last_line = line
        self.last_log = self.last_event = now
        self.paused, self.last_step, self.last_tokens = 0.0, state.global_step, tokens

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        now = time.perf_counter()
        metrics = metrics or {}
        eval_s = now - self.last_event
        self.paused += eval_s
        self.last_event = now
        line = {
            "kind": "eval",
            "step": state.global_step,
            "epoch": state.epoch,
            "eval_loss": metrics.get("eval_loss"),
            "exact_match": metrics.get("eval_exact_match"),
            "cer": metrics.get("eval_cer"),
            "bleu": metrics.get("eval_bleu"),
            "eval_loss_s": metrics.get("eval_runtime"),
            "generation_s": metrics.get("eval_generation_s"),
            "eval_s": eval_s,
            "elapsed_s": self._elapsed(now),
        }
        self.evaluations.append(line)
        self._append(state, line)

    def on_save(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.paused += now - self.last_event  # the checkpoint just written
        self._refresh(args, state, finished=False)
        self.last_event = time.perf_counter()
        self.paused += self.last_event - now

    def on_train_end(self, args, state, control, **kwargs):
        self._refresh(args, state, finished=True)

    def _elapsed(self, now: float) -> float:
        return self.elapsed_before + now - self.start

    def _append(self, state, line: dict[str, Any]) -> None:
        if self.out is not None and state.is_world_process_zero:
            run_files.append_line(self.out / run_files.METRICS, line)

    def _write_run(self, args, state, finished: bool) -> None:
        best = state.best_global_step if args.metric_for_best_model and state.best_model_checkpoint else None
        progress = {"max_steps": state.max_steps, "global_step": state.global_step, "finished": finished}
        progress.update(best_metric=args.metric_for_best_model, best_step=best)
        run_files.write_json(self.out / run_files.RUN, {**self.summary, "progress": progress})

    def _refresh(self, args, state, finished: bool) -> None:
        if self.out is None or not state.is_world_process_zero:
            return
        from vlmtune.report import build_report

        self._write_run(args, state, finished)
        build_report(self.out)


class RunProgress(ProgressCallback):
    """transformers' progress bar (steps, rate, time left) with the last loss and training tokens/s beside it (from
    ``metrics``, the run's :class:`MetricsLog`, which runs first), and one line per evaluation, instead of a
    printed dict per log."""

    def __init__(self, metrics: MetricsLog):
        super().__init__()
        self.metrics = metrics

    def on_log(self, args, state, control, logs=None, **kwargs):
        line = self.metrics.last_line
        if self.training_bar is None or not logs or "loss" not in logs or not line:
            return
        self.training_bar.set_postfix_str(f"loss {line['loss']:.4f} · {line['tokens_per_s']:,.0f} tok/s", refresh=False)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        super().on_evaluate(args, state, control, **kwargs)
        if self.training_bar is None or not metrics:
            return
        names = {"eval_loss": "loss", "eval_cer": "CER", "eval_exact_match": "exact match", "eval_bleu": "BLEU"}
        parts = [f"{label} {metrics[key]:.4f}" for key, label in names.items() if metrics.get(key) is not None]
        self.training_bar.write(f"step {state.global_step} eval: " + " · ".join(parts))
