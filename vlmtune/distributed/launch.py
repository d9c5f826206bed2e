"""What a launch looks like from inside one process: world size, rank, the mode, the per-device batch.

``torchrun`` and ``accelerate launch`` both export ``WORLD_SIZE`` / ``RANK`` before the script runs; the process
group itself is created later by transformers' ``TrainingArguments``, so these read the environment first.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import torch

logger = logging.getLogger(__name__)

MODES = ("auto", "ddp", "fsdp")


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def launched_world_size() -> int:
    """Processes of this launch (1 without a launcher)."""
    if _initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's global rank (0 without a launcher)."""
    if _initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Whether this process logs, saves and exports (global rank 0)."""
    return rank() == 0


def resolve_mode(requested: str, world_size: int) -> str:
    """The data-parallel mode of a run: ``"none"`` (one process), ``"ddp"`` or ``"fsdp"``.

    ``"auto"`` is DDP under a launcher of several processes, FSDP2 under ``accelerate launch`` with an FSDP
    config. ``"fsdp"`` needs a launcher (even of one process): :func:`vlmtune.distributed.fsdp_trainer` says so.

    Raises:
        ValueError: for a mode not in :data:`MODES`.
    """
    if requested not in MODES:
        raise ValueError(f"distributed must be one of {MODES}, got {requested!r}")
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and requested != "ddp":
        # An accelerate config with `distributed_type: FSDP` asks for sharding: vlmtune shards with its own
        # per-tower units, and accelerate stays the launcher (its plugin would wrap the model a second time).
        os.environ["ACCELERATE_USE_FSDP"] = "false"
        logger.info("accelerate's FSDP config selects distributed='fsdp' (vlmtune applies FSDP2 itself)")
        return "fsdp"
    if requested == "fsdp":
        return "fsdp"
    return "ddp" if world_size > 1 else "none"


def per_device_batch(config):
    """``config`` with the rows each process takes per micro-step, so that a step sees ``batch_size x grad_accum``.

    ``TrainConfig.batch_size`` is the global micro-batch: the same recipe gives the same steps on 1 or N processes.
    With packing every process takes one packed row (the global micro-batch is then N packed rows).

    Raises:
        ValueError: when the world size does not divide ``batch_size``, naming the sizes that work.
    """
    world_size = launched_world_size()
    if config.packing or world_size <= 1:
        return config
    if config.batch_size % world_size:
        below = config.batch_size - config.batch_size % world_size
        options = f"{below} or {below + world_size}" if below else f"{world_size}"
        raise ValueError(
            f"batch_size={config.batch_size} does not split over {world_size} processes: TrainConfig.batch_size is "
            f"the global micro-batch, so use a multiple of the world size ({options}), or launch a number of "
            f"processes that divides {config.batch_size}"
        )
    return dataclasses.replace(config, batch_size=config.batch_size // world_size)


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter of ``model`` whole, on the CPU, keyed by its name.

    Under FSDP2 each is a ``DTensor`` shard: ``full_tensor()`` all-gathers it, so every process must call this, in
    the same order (``named_parameters`` is the same on every rank). Only what trains is gathered (the adapter and
    ``modules_to_save``): the frozen, possibly 4-bit base never leaves its shards.
    """
    from torch.distributed.tensor import DTensor

    state = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            value = param.detach()
            value = value.full_tensor() if isinstance(value, DTensor) else value
            state[name] = value.cpu().clone()
    return state
