"""What ``vlmtune.train`` does differently under FSDP2, in one call (keeps the trainer readable top to bottom)."""

from __future__ import annotations

import logging
from typing import Any

import torch

from vlmtune.distributed.fsdp import shard, vision_probe
from vlmtune.distributed.launch import is_main
from vlmtune.families.base import Family

logger = logging.getLogger(__name__)


def fsdp_trainer(model, family: Family, processor, tuning, config) -> tuple[type, dict[str, Any], bool]:
    """Shard ``model`` (in place) and return ``(trainer class, its extra kwargs, whether the kernels may run)``.

    Call it after ``TrainingArguments`` exist (they create the process group) and before the optimizer is made
    (sharding replaces every parameter by its DTensor shard).

    Raises:
        ValueError: no launcher, an evaluation FSDP2 cannot run (:func:`check_fsdp_eval`), or what
            :func:`vlmtune.distributed.fsdp.check_shardable` refuses.
    """
    from vlmtune.distributed.trainer import ShardedTrainer

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise ValueError(
            "distributed='fsdp' shards over the processes of a launch: run under torchrun --nproc-per-node N "
            "or accelerate launch (N=1 works too), or train with distributed='auto' in one process"
        )
    check_fsdp_eval(config)
    # A rank can skip the vision tower exactly when a batch can lack images; text-only runs never need the probe.
    probe = vision_probe(family, processor, config.image_options)
    root = shard(model, family, probe)
    four_bit = any(type(p).__name__ == "Params4bit" for p in model.parameters())
    if four_bit and config.kernels is not False and torch.cuda.is_available() and is_main():
        # vlmtune's LoRA kernels read the NF4 quant_state off the weight, which the all-gather's plain tensor lacks.
        logger.warning("kernels off: under FSDP2 the 4-bit weights reach the layers without their quant_state")
    return ShardedTrainer, {"sharded": root}, not four_bit


def check_fsdp_eval(config) -> None:
    """Refuse the parts of evaluation during training that need the whole model on one process.

    The eval loss runs sharded like a training forward: every rank evaluates its share of the held-out batches
    (the same number on each, so the all-gathers line up) and the Trainer averages them. Generation (exact match,
    CER, BLEU) would run ``generate`` on every rank, whose varying lengths and early stops leave the ranks issuing
    different numbers of all-gathers; reloading the best checkpoint at the end would load a whole adapter into
    the shards behind the Trainer's back.

    Raises:
        ValueError: held-out rows with ``eval_samples > 0`` or a ``best_metric``, each message saying the fix.
    """
    if config.eval_rows is None:
        return
    if config.eval_samples > 0:
        raise ValueError(
            f"with distributed='fsdp' evaluation during training gives the eval loss only: generation metrics need "
            f"the whole model on one process; set eval_samples=0 (got {config.eval_samples}) and compute exact "
            "match / CER / BLEU on the export with `vlmtune eval`, or train with distributed='ddp'"
        )
    if config.best_metric is not None:
        raise ValueError(
            f"best_metric={config.best_metric!r} is not supported with distributed='fsdp' (the best checkpoint "
            "would be reloaded into the shards): drop best_metric and pick a checkpoint from metrics.jsonl, or "
            "train with distributed='ddp'"
        )
