"""Memory options around a tuned model: frozen towers without backward, a CPU-resident embedding, vision
micro-batches, activation offload. Each swaps a forward through :mod:`vlmtune.patching` (undoable, deepcopy-safe).
"""

from __future__ import annotations

import torch

from vlmtune.families.base import Family
from vlmtune.patching import swap_forward, swap_of
from vlmtune.tuning.config import TuningConfig
from vlmtune.tuning.offload import AsyncOffload

NO_GRAD = "_vlmtune_no_grad"
CPU_EMBEDDING = "_vlmtune_cpu_embedding"
MICRO_BATCH = "_vlmtune_micro_batch"
OFFLOAD = "_vlmtune_offload"


def _base(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _no_grad_forward(module, *args, **kwargs):
    with torch.no_grad():
        return swap_of(module, NO_GRAD).inner(*args, **kwargs)


def freeze_vision_forward(model: torch.nn.Module, family: Family, config: TuningConfig) -> bool:
    """Run the vision tower's forward under ``no_grad`` when nothing in it trains; return whether it did."""
    if config.vision != "frozen":
        return False
    prefixes = family.towers["vision"]
    projector = family.towers["projector"]
    nested_projector = any(p.startswith(v + ".") for p in projector for v in prefixes)
    if nested_projector and config.projector != "frozen":
        return False
    base = _base(model)
    for prefix in prefixes:
        module = base.get_submodule(prefix)
        if any(p.requires_grad for p in module.parameters()):
            return False
        if swap_of(module, NO_GRAD) is None:
            swap_forward(module, NO_GRAD, _no_grad_forward)
    return True


def keep_embeddings_on_cpu(model: torch.nn.Module) -> bool:
    """Move a frozen, untied input embedding off the GPU; look its rows up on the CPU (see ``embeddings_on_cpu``).

    Returns whether the embedding now lives on the CPU. When the whole model is moved to the GPU later (``Trainer``
    and accelerate do that for unquantised models), the next forward moves the embedding back to the CPU.
    """
    base = _base(model)
    embedding = base.get_input_embeddings()
    weight = getattr(embedding, "weight", None)
    head = base.get_output_embeddings()
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if (
        weight is None
        or weight.device.type != "cuda"
        or any(p.requires_grad for p in embedding.parameters())
        or (head is not None and head.weight.data_ptr() == weight.data_ptr())  # tied: lm_head needs it
        # model.device is its first parameter's device: it must stay the GPU's.
        or next(base.parameters()) is weight
        or distributed
        or swap_of(embedding, CPU_EMBEDDING) is not None
    ):
        return False
    embedding.to("cpu")
    swap_forward(embedding, CPU_EMBEDDING, _cpu_embedding_forward)
    return True


def _cpu_embedding_forward(module, input_ids, *args, **kwargs):
    inner = swap_of(module, CPU_EMBEDDING).inner
    if next(module.parameters()).device.type != "cpu":
        # The whole model was moved to the GPU since (Trainer and accelerate do for unquantised models).
        module.to("cpu")
    if input_ids.device.type == "cpu":
        return inner(input_ids, *args, **kwargs)
    return inner(input_ids.cpu(), *args, **kwargs).to(input_ids.device)


def micro_batch_vision(model: torch.nn.Module, family: Family, images: int) -> None:
    """Run each vision tower of ``family`` on at most ``images`` images at a time (see ``vision_micro_batch``).

    For towers called as ``tower(pixel_values=(N, C, H, W), ...)`` that treat each image on its own (SigLIP):
    the output's tensor fields are the chunks' outputs concatenated along the image dimension.
    """
    base = _base(model)
    for prefix in family.towers["vision"]:
        module = base.get_submodule(prefix)
        if swap_of(module, MICRO_BATCH) is None:
            swap_forward(module, MICRO_BATCH, _micro_batched_forward, images)


def _micro_batched_forward(module, *args, pixel_values=None, **kwargs):
    swap = swap_of(module, MICRO_BATCH)
    images = swap.data
    if args or pixel_values is None or pixel_values.shape[0] <= images:
        return swap.inner(*args, pixel_values=pixel_values, **kwargs)
    return _concat_outputs([swap.inner(pixel_values=chunk, **kwargs) for chunk in pixel_values.split(images)])


def _concat_outputs(outputs: list):
    """Concatenate per-chunk model outputs field by field along dim 0 (tuples of tensors element-wise)."""
    first = outputs[0]
    for key in list(first.keys()):
        values = [o[key] for o in outputs]
        if isinstance(values[0], torch.Tensor):
            first[key] = torch.cat(values)
        elif isinstance(values[0], tuple):
            first[key] = tuple(torch.cat(parts) for parts in zip(*values, strict=True))
    return first


def enable_activation_offload(model: torch.nn.Module) -> None:
    """Keep tensors saved for backward in (pinned) CPU memory during the model's training forward passes.

    With non-reentrant checkpointing the only tensors saved outside the checkpointed layers are the layers'
    inputs and the few ops between them, so this moves exactly the checkpointed activations off the GPU; the
    recomputation in backward runs outside the context and stays on the GPU. On CUDA the copies run on a side
    stream, the next one back ahead of backward (:class:`vlmtune.tuning.offload.AsyncOffload`).
    """
    if swap_of(model, OFFLOAD) is None:
        swap_forward(model, OFFLOAD, _offloaded_forward)


def _offloaded_forward(model, *args, **kwargs):
    inner = swap_of(model, OFFLOAD).inner
    if not (model.training and torch.is_grad_enabled()):
        return inner(*args, **kwargs)
    on_cuda = any(p.is_cuda for p in model.parameters())
    # On CUDA the copies run beside the compute (vlmtune.tuning.offload); elsewhere there is no device to free.
    with AsyncOffload(model) if on_cuda else torch.autograd.graph.save_on_cpu(pin_memory=False):
        return inner(*args, **kwargs)
