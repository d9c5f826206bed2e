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
        ValueError: no launcher, evaluation during training (not supported under FSDP2 yet), or what
            :func:`vlmtune.distributed.fsdp.check_shardable` refuses.
    """
    from vlmtune.distributed.trainer import ShardedTrainer

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise ValueError(
            "distributed='fsdp' shards over the processes of a launch: run under torchrun --nproc-per-node N "
            "or accelerate launch (N=1 works too), or train with distributed='auto' in one process"
        )
    if config.eval_rows is not None:
        raise ValueError(
            "evaluation during training is not supported with distributed='fsdp': drop eval_rows (evaluate the "
            "export with `vlmtune eval`), or train with distributed='ddp'"
        )
    # A rank can skip the vision tower exactly when a batch can lack images; text-only runs never need the probe.
    probe = vision_probe(family, processor, config.image_options)
    root = shard(model, family, probe)
    four_bit = any(type(p).__name__ == "Params4bit" for p in model.parameters())
    if four_bit and config.kernels is not False and torch.cuda.is_available() and is_main():
        # vlmtune's LoRA kernels read the NF4 quant_state off the weight, which the all-gather's plain tensor lacks.
        logger.warning("kernels off: under FSDP2 the 4-bit weights reach the layers without their quant_state")
    return ShardedTrainer, {"sharded": root}, not four_bit
