"""The shared trainer: transformers' ``Trainer`` with vlmtune's collator, seed, logging and checkpoints.

result = train(model, processor, family, train_rows, TrainConfig(output_dir="out", max_steps=100))
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from vlmtune.data.collator import Collator, PreparedDataset
from vlmtune.families import Family
from vlmtune.tuning import TuningConfig, param_groups, tuning_of

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Optimisation settings of one run.

    Attributes:
        output_dir: where checkpoints go (``<output_dir>/checkpoints``) and the export is written.
        max_steps: optimiser steps (overrides ``epochs`` when > 0).
        epochs: passes over the data when ``max_steps`` is 0.
        batch_size: samples per device step.
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
            ``max_length`` tokens, attention kept within each sample; ``batch_size`` is then 1 packed row per
            micro-step (Qwen-VL and Gemma-3).
        image_options: family image options (``max_pixels``, ``do_pan_and_scan`` ...).
        logging_steps: log the loss every N steps.
        save_steps: checkpoint every N steps (0: no intermediate checkpoints).
        seed: seed of weights init for LoRA, data order and dropout.
        optim: ``"adamw"`` (torch AdamW, fused on CUDA) or ``"adamw_8bit"`` (bitsandbytes' 8-bit AdamW).
        kernels: swap the language tower's hot ops for vlmtune's Triton kernels (``None``: on when the
            model is on CUDA; ``False``: the plain transformers path).
        dataloader_workers: DataLoader worker processes (images decode in them).
        report_to: transformers integrations (``"none"``, ``"tensorboard"``, ``"wandb"`` ...).
        resume_from_checkpoint: path of a checkpoint to resume, or ``True`` for the latest in ``output_dir``.
        eval_steps: with held-out rows (``train(..., eval_rows=...)``), evaluate their loss every N steps (0: once,
            after the last step); the loss goes to the log and ``TrainResult.eval_loss``.
        trainer_args: further ``transformers.TrainingArguments`` fields, passed through as they are (e.g.
            ``{"lr_scheduler_kwargs": {...}, "torch_compile": True}``); one that TrainConfig sets itself is refused,
            naming the field to set instead.
    """

    output_dir: str = "out"
    max_steps: int = 0
    epochs: float = 1.0
    batch_size: int = 4
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
    dataloader_workers: int = 0
    report_to: str = "none"
    resume_from_checkpoint: str | bool | None = None
    eval_steps: int = 0
    trainer_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.max_steps < 0:
            raise ValueError(f"max_steps must be >= 0, got {self.max_steps}")
        if self.max_steps == 0 and self.epochs <= 0:
            raise ValueError("set max_steps > 0 or epochs > 0")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("batch_size and grad_accum must be >= 1")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.optim not in ("adamw", "adamw_8bit"):
            raise ValueError(f"optim must be 'adamw' or 'adamw_8bit', got {self.optim!r}")
        if self.trainer_args:
            check_trainer_args(self)


@dataclass
class TrainResult:
    """What a run produced: the trained model, per-step losses, the data summary and the held-out loss.

    ``eval_kept`` lists the indices of the held-out rows that passed the checks (all of them unless skipped).
    """

    model: Any
    losses: list[float]
    kept_rows: int
    skipped_rows: dict[str, int]
    eval_loss: float | None = None
    eval_kept: list[int] = field(default_factory=list)


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


def _trainer_kwargs(config: TrainConfig, dtype: torch.dtype, find_unused: bool, evaluate: bool) -> dict[str, Any]:
    """The ``TrainingArguments`` vlmtune sets from a :class:`TrainConfig` (``trainer_args`` may add others)."""
    on_cuda = torch.cuda.is_available()
    return dict(
        output_dir=f"{config.output_dir}/checkpoints",
        max_steps=config.max_steps if config.max_steps > 0 else -1,
        num_train_epochs=config.epochs,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.lr,
        weight_decay=config.weight_decay,
        # transformers 5 reads a float below 1 as a share of the steps (warmup_ratio is gone).
        warmup_steps=config.warmup_ratio,
        lr_scheduler_type=config.scheduler,
        max_grad_norm=config.max_grad_norm,
        logging_steps=config.logging_steps,
        save_strategy="steps" if config.save_steps > 0 else "no",
        save_steps=config.save_steps if config.save_steps > 0 else 500,
        seed=config.seed,
        data_seed=config.seed,
        bf16=on_cuda and dtype == torch.bfloat16,
        fp16=on_cuda and dtype == torch.float16,
        use_cpu=not on_cuda,
        dataloader_num_workers=config.dataloader_workers,
        remove_unused_columns=False,
        report_to=config.report_to,
        eval_strategy="steps" if evaluate and config.eval_steps > 0 else "no",
        eval_steps=config.eval_steps if config.eval_steps > 0 else None,
        per_device_eval_batch_size=config.batch_size,
        prediction_loss_only=True,  # evaluation reports the loss; logits of a whole eval set would only cost memory
        disable_tqdm=False,
        # Non-reentrant checkpointing works with it (the reentrant kind is what transformers' own default avoids).
        ddp_find_unused_parameters=find_unused,
    )


def _training_arguments(config: TrainConfig, dtype: torch.dtype, find_unused: bool, evaluate: bool = False):
    from transformers import TrainingArguments

    # Activation checkpointing is set up by vlmtune.tuning (non-reentrant); Trainer's own default (off) leaves it.
    return TrainingArguments(**_trainer_kwargs(config, dtype, find_unused, evaluate), **config.trainer_args)


# TrainingArguments that TrainConfig sets under another name, for the message refusing them in trainer_args.
_RENAMED = {
    "num_train_epochs": "epochs",
    "per_device_train_batch_size": "batch_size",
    "per_device_eval_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "learning_rate": "lr",
    "warmup_steps": "warmup_ratio",
    "lr_scheduler_type": "scheduler",
    "save_strategy": "save_steps",
    "data_seed": "seed",
    "dataloader_num_workers": "dataloader_workers",
    "eval_strategy": "eval_steps",
}


def check_trainer_args(config: TrainConfig) -> None:
    """Refuse ``trainer_args`` that are not ``TrainingArguments`` fields, or that TrainConfig sets itself."""
    from transformers import TrainingArguments

    unknown = sorted(set(config.trainer_args) - {f.name for f in dataclasses.fields(TrainingArguments)})
    if unknown:
        raise ValueError(f"trainer_args {unknown} are not fields of transformers.TrainingArguments")
    owned = _trainer_kwargs(config, torch.float32, find_unused=False, evaluate=True)
    for name in sorted(set(config.trainer_args) & set(owned)):
        field_name = _RENAMED.get(name, name)
        where = f"TrainConfig.{field_name}" if field_name in {f.name for f in dataclasses.fields(config)} else None
        raise ValueError(
            f"trainer_args[{name!r}] conflicts with what vlmtune sets: "
            + (f"set {where} instead" if where else "vlmtune chooses it from the device and the data path")
        )


def _loss_recorder(losses: list[float]):
    from transformers import TrainerCallback

    class LossRecorder(TrainerCallback):
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
    model, processor, family: Family, rows, config: TrainConfig, tuning: TuningConfig | None = None, eval_rows=None
) -> TrainResult:
    """Train ``model`` (already wrapped by :func:`vlmtune.tuning.apply_tuning`) on canonical ``rows``.

    Rows are checked first (:class:`~vlmtune.data.collator.PreparedDataset`): bad rows stop the run, all of them
    listed, before any step runs (see ``TrainConfig.on_bad_row``). ``tuning`` supplies per-tower learning rates;
    by default it is the :class:`TuningConfig` that ``apply_tuning`` built the model with. ``eval_rows``, held-out
    canonical rows, are checked the same way (their bad rows go to ``bad_eval_rows.jsonl``) and their loss is
    evaluated as ``TrainConfig.eval_steps`` says.
    """
    from transformers import Trainer, set_seed

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
    checks = {"overflow": config.overflow, "on_bad_row": config.on_bad_row}
    dataset = PreparedDataset(rows, collator, **checks, bad_rows_path=out / "bad_rows.jsonl", what="training rows")
    eval_set = None
    if eval_rows is not None:
        eval_set = PreparedDataset(
            eval_rows, collator, **checks, bad_rows_path=out / "bad_eval_rows.jsonl", what="held-out rows"
        )
    data_collator = collator
    if config.packing:
        from vlmtune.data.packing import PackedBins, PackedCollator, collate_bin

        attn = getattr(model.config, "_attn_implementation", None) or "sdpa"
        data_collator = collate_bin(PackedCollator(collator, attn_implementation=attn))
        dataset = PackedBins(dataset, config.max_length)
        eval_set = None if eval_set is None else PackedBins(eval_set, config.max_length)
        config = dataclasses.replace(config, batch_size=1)
    losses: list[float] = []
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    patch = None
    if use_kernels(config, model):
        from vlmtune.kernels.patch import apply_kernels

        patch = apply_kernels(model, family)
    trainer = Trainer(
        model=model,
        args=_training_arguments(config, dtype, find_unused_parameters(model, family, tuning), eval_set is not None),
        train_dataset=dataset,
        eval_dataset=eval_set,
        data_collator=data_collator,
        callbacks=[_loss_recorder(losses)],
        optimizers=(make_optimizer(model, family, tuning, config), None),
    )
    try:
        trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
        eval_loss = trainer.evaluate()["eval_loss"] if eval_set is not None else None
    finally:
        if patch is not None:
            # Evaluation and export see the plain model; generation needs logits the fused loss never builds.
            patch.revert()
    prepared = dataset.prepared if config.packing else dataset
    eval_kept = [] if eval_set is None else list((eval_set.prepared if config.packing else eval_set).kept)
    return TrainResult(model, losses, len(prepared), dict(prepared.skipped), eval_loss, eval_kept)
