"""Memory-efficient loading under FSDP2: rank 0 reads the checkpoint, the other ranks start on the meta device.

With ``vlmtune.load(..., empty_on_other_ranks=True)`` under a launcher of several processes, every rank but 0
builds the model from its config on the meta device (no weight is read or allocated); LoRA is applied to it
as usual (its modules are on meta too). :func:`vlmtune.distributed.fsdp.shard` then sees that some rank holds an
empty model, shards every rank's model alike, gives the empty ranks storage for their shards only
(``to_empty``), and scatters rank 0's full state dict onto all shards (``broadcast_from_rank0``): the LoRA
weights rank 0 initialised included, so every rank starts from the same adapter. Buffers outside the state dict
(rotary ``inv_freq``, Gemma's ``embed_scale``) are broadcast from rank 0 afterwards. Tied weights stay tied: the
meta model ties them when it is built, and sharding and ``to_empty`` keep one parameter object for both modules.

Not for 4-bit or 8-bit weights: bitsandbytes keeps a ``Params4bit``'s quantisation state (absmax, code,
nested state) on the tensor, outside the plain state dict that the broadcast carries, so quantised models load
on every rank (:func:`empty_load_refusal` says why, once).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from vlmtune.families.base import Family

logger = logging.getLogger(__name__)


def empty_load_refusal(family: Family, quantised: bool) -> str | None:
    """Why this model must load whole on every rank even when asked not to, or ``None`` when it need not."""
    if quantised:
        return (
            "quantised weights load on every rank: bitsandbytes keeps their quantisation state on the tensor, "
            "outside the state dict that rank 0 would broadcast"
        )
    if family.load_model is not None:
        return f"{family.name} loads through its own loader, which has no meta-device path: every rank loads it"
    return None


def empty_model(path: Path, dtype: torch.dtype, attn_implementation: str) -> torch.nn.Module:
    """The checkpoint's model built from its config on the meta device: the right modules, no weights.

    ``from_config`` ties the tied weights (Gemma's ``lm_head`` to the embedding) as ``from_pretrained`` would.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    return model.eval()  # from_pretrained returns a model in eval mode: dropout off until the Trainer turns it on


def is_empty(model: torch.nn.Module) -> bool:
    """Whether ``model`` holds parameters on the meta device (loaded with ``empty_on_other_ranks``)."""
    return any(p.is_meta for p in model.parameters())


def any_rank_empty(model: torch.nn.Module) -> bool:
    """Whether some rank of the launch holds an empty model (a collective: every rank must call it)."""
    flags: list[bool | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(flags, is_empty(model))
    return any(flags)


def materialise_device(model: torch.nn.Module) -> torch.device:
    """Where this rank's shards live: its parameters' device, or for an empty model this process's own device."""
    device = next((p.device for p in model.parameters() if not p.is_meta), None)
    if device is not None:
        return device
    # Under a launcher transformers' TrainingArguments select this process's GPU (LOCAL_RANK) before sharding.
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def load_from_rank0(root: torch.nn.Module, model: torch.nn.Module, full_state: dict[str, torch.Tensor]) -> None:
    """Fill every rank's shards of ``model`` from rank 0's whole state dict, after ``fully_shard``.

    Args:
        root: the sharded root wrapping ``model`` (its ``to_empty`` reaches every unit).
        model: the tuned model inside it; its keys are those of ``full_state``.
        full_state: on rank 0 ``model.state_dict()`` taken before sharding; on the other ranks ``{}``.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    device = materialise_device(model)
    if is_empty(model):
        root.to_empty(device=device)  # storage for this rank's shards only, filled below
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, full_state, options=options)
    with torch.no_grad():
        # The same buffers in the same order on every rank; persistent ones were loaded already, and broadcasting
        # them again costs little next to the weights.
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, src=0)
    logger.info("FSDP2: rank 0's weights broadcast onto the shards of every rank")


def check_loaded(model: torch.nn.Module, mode: str) -> None:
    """Refuse to train an empty model anywhere but under FSDP2, which fills it from rank 0.

    Raises:
        ValueError: ``model`` is on the meta device and ``mode`` is not ``"fsdp"``, saying the fix.
    """
    if mode != "fsdp" and is_empty(model):
        raise ValueError(
            f"this process's model was loaded empty (vlmtune.load(..., empty_on_other_ranks=True)), which only "
            f"distributed='fsdp' fills from rank 0; the run's mode is {mode!r}: set TrainConfig(distributed='fsdp') "
            "or load with empty_on_other_ranks=False"
        )
