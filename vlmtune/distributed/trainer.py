"""The ``Trainer`` of an FSDP2 run: it trains the sharded root and saves, resumes and exports the whole adapter.

transformers' Trainer drives FSDP2 only through accelerate's plugin, which accelerate enables on accelerators
alone (its CPU path wraps every model in DDP, and refuses DTensor parameters). vlmtune shards the model itself
(:mod:`vlmtune.distributed.fsdp`) and hands the Trainer the sharded root from ``_wrap_model``: a wrapped model
is one the Trainer then leaves to its owner, the route it keeps for wrappers accelerate does not know.

A checkpoint holds what trains, gathered whole by every rank and written by rank 0 in the single-process layout
(``adapter_model.safetensors``, ``optimizer.pt`` keyed by parameter name, ``scheduler.pt``, one
``rng_state_<rank>.pth`` per process): small for LoRA, readable by plain peft, and independent of how the frozen
base is sharded. Resuming re-reads the base from its checkpoint and scatters the saved state onto the shards.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from vlmtune.checkpoints import CheckpointTrainer
from vlmtune.distributed.fsdp import ShardedModel
from vlmtune.distributed.launch import trainable_state_dict

logger = logging.getLogger(__name__)

ADAPTER = "adapter_model.safetensors"
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"


class ShardedTrainer(CheckpointTrainer):
    """:class:`~vlmtune.checkpoints.CheckpointTrainer` for a model sharded by :func:`vlmtune.distributed.fsdp.shard`.

    Args:
        sharded: the FSDP2 root wrapping ``model``.
    """

    def __init__(self, *args, sharded: ShardedModel, **kwargs):
        super().__init__(*args, **kwargs)
        self._sharded = sharded

    def _wrap_model(self, model, training: bool = True, dataloader=None):
        # Always the root: the sharded PeftModel alone has no FSDP hooks on its root-unit parameters.
        return self._sharded

    def _inner_optimizer(self) -> torch.optim.Optimizer:
        return getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate's AcceleratedOptimizer

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Gather the trainable parameters (every rank) and write the adapter (rank 0)."""
        output_dir = output_dir or self.args.output_dir
        state = trainable_state_dict(self.model)
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            self.model.save_pretrained(output_dir, state_dict=state, safe_serialization=True)
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_optimizer_state_dict(self._sharded, self._inner_optimizer(), options=options)
        if self.args.should_save:
            torch.save(state, os.path.join(output_dir, OPTIMIZER))
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        if checkpoint is None:
            return
        state = torch.load(Path(checkpoint) / OPTIMIZER, map_location="cpu", weights_only=True)
        options = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(self._sharded, self._inner_optimizer(), optim_state_dict=state, options=options)
        self.lr_scheduler.load_state_dict(torch.load(Path(checkpoint) / SCHEDULER, weights_only=True))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        from safetensors.torch import load_file

        load_trainable(self.model, load_file(str(Path(resume_from_checkpoint) / ADAPTER)))
        logger.info("loaded the adapter of %s onto the shards", resume_from_checkpoint)


def load_trainable(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Copy an adapter file's tensors (peft's key names) into ``model``'s trainable parameters, sharded or not.

    Every rank read the same file; ``distribute_tensor`` keeps each rank's shard of it.

    Raises:
        KeyError: naming the trainable parameters the file lacks.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    names = saved_names(model)
    missing = sorted(n for key, n in names.items() if key not in saved)
    if missing:
        raise KeyError(f"the adapter file lacks {len(missing)} trainable parameters, e.g. {missing[:3]}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, name in names.items():
            param, value = params[name], saved[key]
            if isinstance(param, DTensor):
                value = distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements)
            param.copy_(value.to(param.device, param.dtype))


def saved_names(model: torch.nn.Module) -> dict[str, str]:
    """``{key in peft's adapter file: parameter name}`` for every trainable parameter of a ``PeftModel``.

    peft renames keys when it saves (the adapter name out, ``modules_to_save`` copies under their module): asking
    it to save placeholders and matching them by identity reads its renaming rather than restating it.
    """
    from peft import get_peft_model_state_dict

    placeholders = {n: torch.empty(0) for n, p in model.named_parameters() if p.requires_grad}
    by_id = {id(t): n for n, t in placeholders.items()}
    saved = get_peft_model_state_dict(model, state_dict=placeholders)
    return {key: by_id[id(t)] for key, t in saved.items() if id(t) in by_id}
