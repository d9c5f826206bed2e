"""FSDP2 for a tuned VLM: ``fully_shard`` per layer of both towers, then the whole model as the root unit.

Choices, and why:

- **Units.** One per decoder layer and one per vision block (the family's ``layers`` patterns), then a root unit
  for the rest (embeddings, patch embedding, projector, norms, ``lm_head``). Per layer is what bounds the peak: one
  layer's full weights are live at a time (two with prefetching).
- **A frozen vision tower is sharded too**, not replicated: at 72B its ViT and projector are ~0.7B parameters
  (1.4 GB per GPU in bf16), the size of the 4-bit language shard on 8 GPUs. Sharding it costs one all-gather per
  block in the forward, and only the forward (no backward runs through a frozen tower).
- **Mixed batches.** A sharded block's all-gather is a collective: a rank whose micro-batch has no image would
  skip the vision tower and leave the others waiting. :class:`ShardedModel` runs that rank's vision tower on one
  blank image first and adds its output times zero to the language tower's input embeddings: every rank issues
  the same all-gathers in the same order in the forward, and, since the image features flow into the language
  tower as they do on a rank with images, the same reduce-scatters in the same order in the backward (added to
  the loss instead, autograd is free to run the blank image's backward early, and the ranks deadlock). The
  numbers do not change.
- **Mixed precision.** ``param_dtype`` is the compute dtype and ``reduce_dtype`` fp32; the sharded master copies
  keep their own dtype, so LoRA weights (PEFT makes them fp32) stay fp32 in the optimizer.
- **QLoRA.** ``Params4bit`` shards along dim 0 like any tensor when its storage dtype is a float (the sharder
  cannot hold packed ``uint8`` in a DTensor of the compute dtype's all-gather): load with
  ``quant_storage="auto"``. bitsandbytes' ``Linear4bit`` finds its ``quant_state`` again on the module after the
  all-gather hands it a plain tensor. Nothing is upcast (no ``prepare_model_for_kbit_training``).
- **Activation checkpointing** (non-reentrant, set by :mod:`vlmtune.tuning`) composes: a checkpointed layer's
  recompute goes through the layer's ``__call__``, so its unit all-gathers again in the backward.
- **Memory-efficient loading.** Ranks loaded empty (``vlmtune.load(..., empty_on_other_ranks=True)``) are
  sharded like rank 0, then filled from rank 0's whole state dict (:mod:`vlmtune.distributed.rank0_load`).
"""

from __future__ import annotations

import functools
import logging
import re
from typing import Any

import torch

from vlmtune.distributed.rank0_load import any_rank_empty, load_from_rank0, materialise_device
from vlmtune.families.base import Family

logger = logging.getLogger(__name__)


class ShardedModel(torch.nn.Module):
    """The FSDP2 root: the tuned model, and a blank image through the vision tower on image-less micro-batches.

    ``Trainer`` trains this wrapper; ``module`` is the ``PeftModel`` (its parameters are DTensor shards).
    """

    def __init__(self, model: torch.nn.Module, vision_probe: dict[str, torch.Tensor] | None, language: str):
        super().__init__()
        self.module = model
        self.vision_probe = vision_probe
        self.language = language  # the language tower's module name, whose input embeddings carry the probe

    def forward(self, **inputs: Any):
        if self.vision_probe is None or inputs.get("pixel_values") is not None:
            return self.module(**inputs)
        touch = _vision_touch(self.module, self.vision_probe)
        tower = _base(self.module).get_submodule(self.language)
        handle = tower.register_forward_pre_hook(functools.partial(_add_touch, touch), with_kwargs=True)
        try:
            return self.module(**inputs)
        finally:
            handle.remove()


def _add_touch(touch: torch.Tensor, module, args, kwargs):
    embeds = kwargs.get("inputs_embeds")
    if embeds is None:
        raise RuntimeError(
            f"{type(module).__name__} was called without inputs_embeds: the image-less rank's vision pass cannot "
            "join the language tower's input, and the ranks would deadlock; train this model with DDP"
        )
    return args, {**kwargs, "inputs_embeds": embeds + 0.0 * touch.to(embeds.dtype)}


def _base(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _vision_touch(model: torch.nn.Module, probe: dict[str, torch.Tensor]) -> torch.Tensor:
    base = _base(model)
    dtype = next(p.dtype for p in base.parameters() if p.is_floating_point())
    device = next(base.parameters()).device
    inputs = {k: v.to(device, dtype if v.is_floating_point() else v.dtype) for k, v in probe.items()}
    return _sum_floats(base.get_image_features(**inputs))


def _sum_floats(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.float().sum() if value.is_floating_point() else torch.zeros(())
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else []
    total = torch.zeros(())
    for item in items:
        part = _sum_floats(item)
        total = total.to(part.device) + part
    return total


def vision_probe(family: Family, processor, image_options: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Model inputs of one small blank image, the way the collator would make them (see :class:`ShardedModel`)."""
    from PIL import Image

    from vlmtune.families.base import validate_image_options

    options = validate_image_options(family, image_options)
    return family.process_images(processor, [Image.new("RGB", (56, 56), (127, 127, 127))], options).tensors


def check_shardable(model: torch.nn.Module, family: Family) -> None:
    """Refuse what FSDP2 cannot shard, before anything is touched.

    Raises:
        ValueError: int8 weights, 4-bit weights in a storage dtype that is not a float, or a family without
            ``layers`` patterns; each message says the fix.
    """
    if not family.layers:
        raise ValueError(f"{family.name} names no sharding layers (Family.layers): train it with DDP instead")
    for name, param in model.named_parameters():
        kind = type(param).__name__
        if kind == "Int8Params":
            raise ValueError(
                f"{name} is an 8-bit bitsandbytes weight, which FSDP2 cannot shard (its scales live outside the "
                "tensor): load with quant='nf4' (QLoRA) or quant='none', or train with distributed='ddp'"
            )
        if kind == "Params4bit" and not param.dtype.is_floating_point:
            raise ValueError(
                f"{name} is a 4-bit weight stored as {param.dtype}, which FSDP2 cannot shard: load with "
                "vlmtune.load(..., quant_storage='auto') (the compute dtype, bf16 on a GPU), or train with "
                "distributed='ddp'"
            )


def shard_units(model: torch.nn.Module, family: Family) -> list[tuple[str, torch.nn.Module]]:
    """The modules that become their own FSDP2 unit: every layer the family's ``layers`` patterns match."""
    patterns = [re.compile(p) for p in family.layers.values()]
    units = []
    for name, module in model.named_modules():
        plain = name.removeprefix("base_model.model.")
        if any(p.fullmatch(plain) for p in patterns):
            units.append((plain, module))
    return units


def shard(
    model: torch.nn.Module, family: Family, probe: dict[str, torch.Tensor] | None, reshard_after_forward: bool = True
) -> ShardedModel:
    """Shard ``model`` in place with FSDP2 over every process of the launch, and return the root to train.

    Args:
        model: the tuned model (:func:`vlmtune.tuning.apply_tuning`), on this rank's device.
        family: its family (the sharding units come from ``family.layers``).
        probe: inputs of one blank image (:func:`vision_probe`), or ``None`` when no rank can skip the vision tower.
        reshard_after_forward: free each layer's full weights after its forward (ZeRO-3); ``False`` keeps them
            until the backward (ZeRO-2-like: less communication, more memory).

    Raises:
        ValueError: see :func:`check_shardable`.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    check_shardable(model, family)
    empty = any_rank_empty(model)  # loaded with empty_on_other_ranks: filled from rank 0 once sharded
    # Rank 0's whole weights, kept by reference while sharding replaces its parameters by shards.
    full_state = model.state_dict() if empty and torch.distributed.get_rank() == 0 else {}
    device = materialise_device(model)
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point() and not p.requires_grad)
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    units = shard_units(model, family)
    if not units:
        raise ValueError(f"no module of the model matches {family.name}'s sharding layers {dict(family.layers)}")
    for _, module in units:
        fully_shard(module, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    root = ShardedModel(model, probe, family.towers["language"][0])
    fully_shard(root, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    if empty:
        load_from_rank0(root, model, full_state)
    logger.info(
        "FSDP2: %d layer units + root over %d processes (param %s, reduce fp32)", len(units), mesh.size(), dtype
    )
    return root
