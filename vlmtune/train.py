"""The shared trainer: transformers' ``Trainer`` with vlmtune's collator, seed, logging and checkpoints.

result = train(model, processor, family, train_rows, TrainConfig(output_dir="out", max_steps=100))
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from vlmtune.compile import COMPILE_TOWERS, compile_layers, resolve_compile
from vlmtune.data.collator import Collator, PreparedDataset
from vlmtune.data.host import TimedCollate, collate_time_callback
from vlmtune.distributed import check_loaded, fsdp_trainer, launched_world_size, per_device_batch, resolve_mode
from vlmtune.families import Family
from vlmtune.step_probe import check_step_config, resolve_step_size
from vlmtune.train_eval import KernelSwitch, attach, check_best_metric, prepare_eval
from vlmtune.training_args import check_trainer_args, training_arguments
from vlmtune.tuning import TuningConfig, param_groups, tuning_of

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Optimisation settings of one run.

    Attributes:
        output_dir: where checkpoints go (``<output_dir>/checkpoints``) and the export is written.
        max_steps: optimiser steps (overrides ``epochs`` when > 0).
        epochs: passes over the data when ``max_steps`` is 0.
        batch_size: samples per micro-step (under a launcher, over all processes: see ``distributed``), or
            ``"auto"``: the largest that fits ``memory_limit_gib``, found by a short probe on the longest samples
            before the first step (:mod:`vlmtune.step_probe`; CPU: 4).
        grad_accum: gradient accumulation steps.
        lr: peak learning rate (LoRA usually 1e-4 to 2e-4).
        weight_decay: AdamW weight decay.
        warmup_ratio: share of steps with linear warm-up.
        scheduler: transformers scheduler name (``"linear"``, ``"cosine"``, ``"constant"`` ...).
        max_grad_norm: gradient clipping.
        max_length: longest sample in tokens, images included.
        overflow: what to do with a sample longer than ``max_length``: ``"drop"`` (skip and count) or
            ``"error"`` (stop naming the row). Images are never cut.
        on_bad_row: a row that cannot be used (missing / unreadable image, empty answer ...): ``"error"`` stops
            before the first step listing every such row; ``"skip"`` drops them and the summary counts them by
            kind. Either way every bad row (over-long ones too) is written to ``<output_dir>/bad_rows.jsonl``.
        train_on: ``"assistant"`` (default) or ``"all"`` text tokens.
        packing: padding-free packing: samples are binned (first-fit decreasing) into rows of at most
            ``max_length`` tokens (``max_tokens_per_step`` when set), attention kept within each sample; a micro-step
            is then 1 packed row. The loss is the mean over the supervised tokens of the optimiser step (all its
            micro-steps), however many samples they hold: a sample weighs by its answer tokens, as unpacked.
        image_options: family image options (``max_pixels``, ``do_pan_and_scan`` ...).
        logging_steps: log the loss every N steps.
        save_steps: checkpoint every N steps (0: no intermediate checkpoints). A checkpoint is written whole or
            not at all (:mod:`vlmtune.checkpoints`).
        save_total_limit: complete checkpoints to keep; older ones are deleted once a new one is in place
            (``None``: keep all).
        seed: seed of weights init for LoRA, data order and dropout.
        optim: ``"adamw"`` (torch AdamW, fused on CUDA) or ``"adamw_8bit"`` (bitsandbytes' 8-bit AdamW).
        kernels: swap the language tower's hot ops for vlmtune's Triton kernels (``None``: on when the
            model is on CUDA; ``False``: the plain transformers path).
        dataloader_workers: DataLoader worker processes (images decode and the processor runs in them);
            ``None``: ``min(4, cpus - 1)`` on Linux with CUDA, else 0 (:mod:`vlmtune.data.host`).
        report_to: transformers integrations (``"none"``, ``"tensorboard"``, ``"wandb"`` ...).
        resume: continue an interrupted run: ``True`` for the newest complete checkpoint in
            ``<output_dir>/checkpoints``, or the path of a checkpoint (or of a folder of them). The run must be the
            same (model, trainable parameters, data, batch, schedule ...): a difference is refused, naming it.
        resume_force: resume even though the run changed since the checkpoint (or from a complete checkpoint
            an older vlmtune wrote without its marker).
        resume_from_checkpoint: deprecated name of ``resume``.
        eval_rows: held-out canonical rows (``None``: no evaluation). The eval loss runs on all of them, the
            generation metrics on the first ``eval_samples``, before the first step, every ``eval_steps`` and at
            the end; bad rows follow ``on_bad_row`` and are counted apart from the training rows. Recorded in
            ``vlmtune.json`` as a row count only.
        eval_steps: evaluate every N steps (0: only before the first step and at the end).
        eval_samples: held-out rows generated on at each evaluation (exact match, CER, BLEU); the report shows up
            to 16 of them. 0: eval loss only.
        eval_max_new_tokens: generation budget per row at evaluation.
        best_metric: keep the checkpoint with the best ``"cer"``, ``"exact_match"``, ``"bleu"`` or eval
            ``"loss"`` and return (so export) it instead of the last; needs ``eval_steps`` and ``save_steps`` a
            multiple of it. ``None``: the last model.
        report: write ``<output_dir>/metrics.jsonl`` while training and ``<output_dir>/report.html`` at every
            checkpoint and at the end.
        report_latex: the answers are LaTeX: the report draws each prediction as a formula (matplotlib mathtext)
            beside the input image.
        trainer_args: further ``transformers.TrainingArguments`` fields, passed through as they are (e.g.
            ``{"lr_scheduler_kwargs": {...}, "torch_compile": True}``); one that TrainConfig sets itself is refused,
            naming the field to set instead.
        max_tokens_per_step: with ``packing``, the token budget of a micro-step (images counted, never cut; the
            image load balanced across steps, :mod:`vlmtune.data.budget`), or ``"auto"``: the largest that fits
            ``memory_limit_gib`` (CPU: ``max_length``). ``None``: ``max_length``.
        memory_limit_gib: the memory cap of ``"auto"`` (``None``: the device's free memory less a margin).
        prefetch_factor: batches each DataLoader worker prepares ahead (with workers).
        compile: ``torch.compile`` the layers of ``"language"``, ``"vision"`` or ``"both"`` towers one by one, so
            each tower's layers share one graph (:mod:`vlmtune.compile`), with the kernels inside as custom ops;
            ``"off"``: eager. ``None``: ``vlmtune.compile.DEFAULT_COMPILE`` on a CUDA model, else ``"off"``.
        distributed: data parallelism under ``torchrun`` / ``accelerate launch``: ``"auto"`` (DDP when launched
            with several processes), ``"ddp"`` or ``"fsdp"`` (FSDP2: each layer of both towers sharded over the
            processes; see :mod:`vlmtune.distributed`). Under a launcher ``batch_size`` is the global micro-batch,
            split evenly over the processes, so one step sees the same rows as in one process.
    """

    output_dir: str = "out"
    max_steps: int = 0
    epochs: float = 1.0
    batch_size: int | Literal["auto"] = 4
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    scheduler: str = "linear"
    max_grad_norm: float = 1.0
    max_length: int = 2048
    overflow: Literal["drop", "error"] = "drop"
    on_bad_row: Literal["error", "skip"] = "error"
    packing: bool = False
    train_on: Literal["assistant", "all"] = "assistant"
    image_options: dict[str, Any] = field(default_factory=dict)
    logging_steps: int = 10
    save_steps: int = 0
    seed: int = 0
    optim: Literal["adamw", "adamw_8bit"] = "adamw"
    kernels: bool | None = None
    dataloader_workers: int | None = None
    report_to: str = "none"
    save_total_limit: int | None = None
    resume: bool | str | None = None
    resume_force: bool = False
    resume_from_checkpoint: str | bool | None = None
    eval_rows: Any = field(default=None, repr=False, compare=False, metadata={"record": "length"})
    eval_steps: int = 0
    eval_samples: int = 16
    eval_max_new_tokens: int = 128
    best_metric: str | None = None
    report: bool = True
    report_latex: bool = False
    trainer_args: dict[str, Any] = field(default_factory=dict)
    max_tokens_per_step: int | Literal["auto"] | None = None
    memory_limit_gib: float | None = None
    prefetch_factor: int = 2
    compile: Literal["off", "language", "vision", "both"] | None = None
    distributed: Literal["auto", "ddp", "fsdp"] = "auto"

    def __post_init__(self) -> None:
        if self.max_steps < 0:
            raise ValueError(f"max_steps must be >= 0, got {self.max_steps}")
        if self.max_steps == 0 and self.epochs <= 0:
            raise ValueError("set max_steps > 0 or epochs > 0")
        if self.grad_accum < 1:
            raise ValueError("grad_accum must be >= 1")
        check_step_config(self)
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.optim not in ("adamw", "adamw_8bit"):
            raise ValueError(f"optim must be 'adamw' or 'adamw_8bit', got {self.optim!r}")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ValueError(f"save_total_limit must be >= 1 or None, got {self.save_total_limit}")
        if self.resume_from_checkpoint is not None:
            if self.resume is not None and self.resume != self.resume_from_checkpoint:
                raise ValueError("set only resume (resume_from_checkpoint is its deprecated name)")
            warnings.warn("TrainConfig.resume_from_checkpoint is deprecated: use resume", FutureWarning, stacklevel=3)
            self.resume, self.resume_from_checkpoint = self.resume_from_checkpoint, None
        if self.resume is not None and not isinstance(self.resume, bool):
            self.resume = str(self.resume)  # a Path too
        if self.eval_steps < 0 or self.eval_samples < 0 or self.eval_max_new_tokens < 1:
            raise ValueError("eval_steps and eval_samples must be >= 0 and eval_max_new_tokens >= 1")
        check_best_metric(self.best_metric, self.eval_steps, self.save_steps, self.eval_samples)
        if self.trainer_args:
            check_trainer_args(self)
        if self.compile not in (None, *COMPILE_TOWERS):
            raise ValueError(f"compile must be None or one of {sorted(COMPILE_TOWERS)}, got {self.compile!r}")
        resolve_mode(self.distributed, 1)


@dataclass
class TrainResult:
    """What a run produced: the trained model, per-step losses, the data summary and the evaluations.

    ``evaluations`` are the eval lines of ``metrics.jsonl`` (step, eval_loss, exact_match, cer, bleu, times);
    ``best_step`` is the step of the checkpoint ``best_metric`` chose (then ``model`` holds it).
    """

    model: Any
    losses: list[float]
    kept_rows: int
    skipped_rows: dict[str, int]
    kept_eval_rows: int = 0
    skipped_eval_rows: dict[str, int] = field(default_factory=dict)
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    best_step: int | None = None

    @property
    def metrics(self) -> dict[str, float | None]:
        """Eval loss, exact match, CER and BLEU of the returned model (the best step's, else the last
        evaluation's); empty without evaluation."""
        chosen = [e for e in self.evaluations if e["step"] == self.best_step] or self.evaluations[-1:]
        keys = ("eval_loss", "exact_match", "cer", "bleu")
        return {k: chosen[-1][k] for k in keys} if chosen else {}


def find_unused_parameters(model, family: Family, tuning: TuningConfig) -> bool:
    """DDP's ``find_unused_parameters`` for a run: on exactly when something outside the language tower trains.

    A batch of text-only rows never runs the vision tower or the projector, so on a rank whose batch has no image
    their trainable parameters get no gradient; unless DDP looks for unused parameters, the ranks then wait on
    different all-reduces (a hang) or the next step fails. Whether a batch holds an image changes from step to
    step and from rank to rank, so this is decided from the towers, not from the data. The search costs one walk
    of the autograd graph per step, small next to a vision forward; language-only runs (QLoRA's usual case) use
    every trainable parameter every step and skip it. (transformers' own default is on for a ``PeftModel`` and
    off for a checkpointed ``PreTrainedModel``: right here by accident, so vlmtune says it explicitly.)
    """
    return any(group["name"] != "language" for group in param_groups(model, family, tuning, lr=1.0))


def _loss_recorder(losses: list[float]):
    from transformers import TrainerCallback

    class LossRecorder(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            # A resumed run starts from the checkpoint's log: the losses are those of the whole run.
            losses[:] = [float(entry["loss"]) for entry in state.log_history if "loss" in entry]

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    return LossRecorder()


def make_optimizer(model, family: Family, tuning: TuningConfig, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, one group per tower learning rate (see ``TuningConfig.*_lr``)."""
    groups = param_groups(model, family, tuning, config.lr, config.weight_decay)
    if config.optim == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=config.lr)
    on_cuda = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=config.lr, fused=on_cuda or None)


def use_kernels(config: TrainConfig, model: torch.nn.Module) -> bool:
    """Whether this run patches in the Triton kernels (default: exactly when the model is on CUDA)."""
    if config.kernels is not None:
        return config.kernels
    return torch.cuda.is_available() and any(p.device.type == "cuda" for p in model.parameters())


def _close_progress_bars(trainer) -> None:
    """Close the progress bars a failed run leaves open (the Trainer closes them only at the end of training), so
    that they print now and not after the run's error message."""
    from transformers import ProgressCallback

    for callback in trainer.callback_handler.callbacks:
        bar = getattr(callback, "training_bar", None) if isinstance(callback, ProgressCallback) else None
        if bar is not None:
            bar.close()
            callback.training_bar = None


def _tuning_for(model, tuning: TuningConfig | None) -> TuningConfig:
    """The tuning to train with: the caller's, else the one the model was built with (see ``apply_tuning``)."""
    built = tuning_of(model)
    if tuning is None and built is None:
        logger.warning(
            "the model was not prepared with vlmtune.apply_tuning and no tuning was passed: every trainable "
            "parameter trains at the one learning rate lr"
        )
        return TuningConfig()
    if tuning is not None and built is not None and tuning != built:
        logger.warning("training with the tuning passed to train(), which differs from the one the model was built")
    return tuning if tuning is not None else built


def train(
    model,
    processor,
    family: Family,
    rows,
    config: TrainConfig,
    tuning: TuningConfig | None = None,
    callbacks: list | None = None,
) -> TrainResult:
    """Train ``model`` (already wrapped by :func:`vlmtune.tuning.apply_tuning`) on canonical ``rows``.

    Rows are checked first (:class:`~vlmtune.data.collator.PreparedDataset`): bad rows stop the run, all of them
    listed and written to ``bad_rows.jsonl``, before any step runs (see ``TrainConfig.on_bad_row``). ``tuning``
    supplies per-tower learning rates; by default it is the :class:`TuningConfig` that ``apply_tuning`` built the
    model with. With ``config.eval_rows`` the run evaluates as it trains (:mod:`vlmtune.train_eval`; bad held-out
    rows go to ``bad_eval_rows.jsonl``); with ``config.report`` it writes ``metrics.jsonl`` and ``report.html``
    into ``config.output_dir``. ``callbacks`` are more ``transformers.TrainerCallback``s, run after vlmtune's.
    """
    from transformers import set_seed

    from vlmtune.checkpoints import CheckpointTrainer, prepare_resume
    from vlmtune.metrics_log import run_summary

    tuning = _tuning_for(model, tuning)
    set_seed(config.seed)
    collator = Collator(
        family,
        processor,
        model.config,
        max_length=config.max_length,
        image_options=config.image_options,
        train_on=config.train_on,
    )
    out = Path(config.output_dir)
    dataset = PreparedDataset(
        rows,
        collator,
        overflow=config.overflow,
        on_bad_row=config.on_bad_row,
        bad_rows_path=out / "bad_rows.jsonl",
        what="training rows",
    )
    prepared = dataset
    eval_prepared = eval_dataset = prepare_eval(config, collator)
    config, _ = resolve_step_size(
        config, model, collator, prepared, lambda: make_optimizer(model, family, tuning, config), family,
        kernels=use_kernels(config, model),
    )  # fmt: skip
    if config.packing:
        from vlmtune.data.packing import packed_bins

        dataset = packed_bins(dataset, config)
        eval_dataset = packed_bins(eval_prepared, config) if eval_prepared is not None else None
        config = dataclasses.replace(config, batch_size=1)
    losses: list[float] = []
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    mode, per_device = resolve_mode(config.distributed, launched_world_size()), per_device_batch(config)
    check_loaded(model, mode)  # a rank loaded empty trains only under FSDP2, which fills it from rank 0
    find_unused = mode == "ddp" and find_unused_parameters(model, family, tuning)
    args = training_arguments(per_device, dtype, find_unused, eval_dataset is not None)
    # Before the Trainer exists (it creates the output folder): a resume that cannot work stops here.
    checkpoint, fingerprint = prepare_resume(config, model, prepared, tuning, args.world_size)
    trainer_class, sharding, kernels_ok = CheckpointTrainer, {}, True
    if mode == "fsdp":  # shards the model in place (vlmtune.distributed.fsdp)
        trainer_class, sharding, kernels_ok = fsdp_trainer(model, family, processor, tuning, config)
    kernels = KernelSwitch(model, family, enabled=use_kernels(config, model) and kernels_ok)
    compiled = compile_layers(model, family, resolve_compile(config.compile, model))
    data_collator = collator
    if config.packing:  # after the kernels and compilation: they decide how packed rows attend
        from vlmtune.data.packing import PackedCollator, collate_bin
        from vlmtune.kernels.hf.rope import packed_attention

        attn = packed_attention(model, family, compiled="language" in compiled.layers)
        data_collator = collate_bin(PackedCollator(collator, attn_implementation=attn))
    data_collator = TimedCollate(data_collator)
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        data_collator=data_collator,
        callbacks=[_loss_recorder(losses), collate_time_callback(data_collator, args.dataloader_num_workers)],
        optimizers=(make_optimizer(model, family, tuning, config), None),
        fingerprint=fingerprint,
        save_total_limit=config.save_total_limit,
        **sharding,
    )
    summary = run_summary(model, family, tuning, config, prepared, eval_prepared, kernels.patch is not None)
    watch = attach(trainer, processor, summary, config, eval_prepared, kernels)
    for callback in callbacks or []:
        trainer.add_callback(callback)
    try:
        trainer.train(resume_from_checkpoint=checkpoint)
    finally:
        # Export sees the plain model; generation needs logits the fused loss never builds.
        compiled.revert()
        kernels.off()
        _close_progress_bars(trainer)
    return TrainResult(
        model=model,
        losses=losses,
        kept_rows=len(prepared),
        skipped_rows=dict(prepared.skipped),
        **watch.result_fields(trainer),
    )
