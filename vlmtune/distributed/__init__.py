"""One machine, then many: the same run under ``torchrun`` / ``accelerate launch`` with PyTorch's DDP or FSDP2.

vlmtune writes no distributed runtime. DDP is transformers' ``Trainer`` as it is; FSDP2 is
``torch.distributed.fsdp.fully_shard`` applied per layer of both towers (:mod:`vlmtune.distributed.fsdp`), trained
by a ``Trainer`` subclass that saves and resumes the gathered adapter (:mod:`vlmtune.distributed.trainer`). Under
FSDP2 the ranks above 0 may start empty, filled from rank 0 once sharded (:mod:`vlmtune.distributed.rank0_load`).
"""

from vlmtune.distributed.launch import (
    MODES,
    is_main,
    launched_world_size,
    per_device_batch,
    resolve_mode,
    trainable_state_dict,
)
from vlmtune.distributed.rank0_load import check_loaded
from vlmtune.distributed.setup import fsdp_trainer

__all__ = [
    "MODES",
    "check_loaded",
    "fsdp_trainer",
    "is_main",
    "launched_world_size",
    "per_device_batch",
    "resolve_mode",
    "trainable_state_dict",
]
