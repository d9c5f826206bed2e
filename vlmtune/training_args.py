"""The ``transformers.TrainingArguments`` of a run: what vlmtune sets from a :class:`~vlmtune.train.TrainConfig`, and
the check that ``TrainConfig.trainer_args`` adds only what vlmtune leaves open."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch

from vlmtune.data.host import dataloader_arguments
from vlmtune.train_eval import eval_arguments

if TYPE_CHECKING:
    from vlmtune.train import TrainConfig


def trainer_kwargs(config: TrainConfig, dtype: torch.dtype, find_unused: bool, evaluate: bool) -> dict[str, Any]:
    """The ``TrainingArguments`` vlmtune sets from a :class:`TrainConfig` (``trainer_args`` may add others)."""
    on_cuda = torch.cuda.is_available()
    kwargs = dict(
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
        **dataloader_arguments(config.dataloader_workers, config.prefetch_factor, on_cuda),
        remove_unused_columns=False,
        report_to=config.report_to,
        disable_tqdm=False,
        # Non-reentrant checkpointing works with it (the reentrant kind is what transformers' own default avoids).
        ddp_find_unused_parameters=find_unused,
    )
    # Evaluation, token counting and the best-checkpoint choice (vlmtune.train_eval).
    kwargs.update(eval_arguments(config, evaluate))
    return kwargs


def training_arguments(config: TrainConfig, dtype: torch.dtype, find_unused: bool, evaluate: bool = False):
    from transformers import TrainingArguments

    # Activation checkpointing is set up by vlmtune.tuning (non-reentrant); Trainer's own default (off) leaves it.
    return TrainingArguments(**trainer_kwargs(config, dtype, find_unused, evaluate), **config.trainer_args)


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
    "dataloader_prefetch_factor": "prefetch_factor",
    "eval_strategy": "eval_steps",
}


def check_trainer_args(config: TrainConfig) -> None:
    """Refuse ``trainer_args`` that are not ``TrainingArguments`` fields, or that TrainConfig sets itself."""
    from transformers import TrainingArguments

    unknown = sorted(set(config.trainer_args) - {f.name for f in dataclasses.fields(TrainingArguments)})
    if unknown:
        raise ValueError(f"trainer_args {unknown} are not fields of transformers.TrainingArguments")
    owned = trainer_kwargs(config, torch.float32, find_unused=False, evaluate=True)
    for name in sorted(set(config.trainer_args) & set(owned)):
        field_name = _RENAMED.get(name, name)
        where = f"TrainConfig.{field_name}" if field_name in {f.name for f in dataclasses.fields(config)} else None
        raise ValueError(
            f"trainer_args[{name!r}] conflicts with what vlmtune sets: "
            + (f"set {where} instead" if where else "vlmtune chooses it from the device and the data path")
        )
