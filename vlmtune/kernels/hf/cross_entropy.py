"""``cross_entropy``: the causal-LM module that owns the head (the top-level model; MiniCPM-V: its ``llm``) computes
the loss from the final hidden states with the fused linear cross-entropy, so the ``(tokens, vocab)`` logits never
exist; it returns ``logits=None``. Without ``labels``, or with ``return_logits=True``, it is the original forward."""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable

import torch
import torch.nn.functional as F

from vlmtune.kernels.hf.common import KERNEL, find_kernel, swap
from vlmtune.patching import swap_of

# Top-level classes whose forward soft-caps the final logits with config.final_logit_softcapping. The
# *ForConditionalGeneration classes of the supported families never do (transformers 5.17 and 5.23; only
# Gemma3ForCausalLM does), so the fused loss applies the cap exactly where the plain forward does.
_SOFTCAPPED_HEADS = frozenset({"Gemma2ForCausalLM", "Gemma3ForCausalLM"})


@dataclasses.dataclass
class _LossData:
    kernel: Callable
    inner: str  # attribute of the inner model (base_model_prefix)
    inner_takes_labels: bool  # Gemma3ForConditionalGeneration hands labels to its inner model; Qwen-VL does not
    softcap: float | None
    output_class: type
    positional: tuple[str, ...]  # forward's parameter names, to name positional arguments


def _loss_module(base: torch.nn.Module) -> tuple[str, torch.nn.Module] | None:
    """The causal-LM module whose forward applies the output embeddings and computes the loss: the model
    itself for transformers' VLMs, the ``llm`` it delegates to for MiniCPM-V's layout."""
    from transformers import PreTrainedModel

    head = base.get_output_embeddings()
    if head is None:
        return None
    for name, module in base.named_modules():
        owns_head = any(child is head for child in module.children())
        if owns_head and isinstance(module, PreTrainedModel):
            inner = getattr(module, module.base_model_prefix, None)
            return (name, module) if isinstance(inner, torch.nn.Module) else None
    return None


def apply(base, language, family, patch) -> None:
    from transformers.modeling_outputs import CausalLMOutputWithPast

    found = _loss_module(base)
    if found is None:
        return
    name, target = found
    inner = getattr(target, target.base_model_prefix)
    softcap = None
    if type(target).__name__ in _SOFTCAPPED_HEADS:
        softcap = getattr(target.config.get_text_config(), "final_logit_softcapping", None)
    original = type(target).forward
    params = list(inspect.signature(original).parameters.values())[1:]  # without self
    positional = tuple(p.name for p in params if p.kind == p.POSITIONAL_OR_KEYWORD)
    data = _LossData(
        kernel=find_kernel("fused_linear_ce", "fused_linear_cross_entropy"),
        inner=target.base_model_prefix,
        inner_takes_labels="labels" in inspect.signature(inner.forward).parameters,
        softcap=softcap,
        output_class=_output_class(original, CausalLMOutputWithPast),
        positional=positional,
    )

    # The swapped forward advertises the original's signature (vlmtune.patching.SwappedForward): Trainer reads it
    # to decide whether to pass num_items_in_batch, and generate() to find logits_to_keep.
    swap(target, _fused_loss_forward, patch, data)
    patch.patched["cross_entropy"].append(name)


def _output_class(forward: Callable, default: type) -> type:
    """The ``ModelOutput`` class in the forward's return annotation (``tuple | Gemma3CausalLMOutputWithPast``)."""
    from transformers.utils import ModelOutput

    annotation = inspect.signature(forward).return_annotation
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, ModelOutput):
            return candidate
    return default


def _active_head_weight(head: torch.nn.Module) -> torch.Tensor | None:
    """The lm_head weight the plain forward would use now, or None when it is not a bias-free plain Linear."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    if isinstance(head, ModulesToSaveWrapper):
        active = head.active_adapters
        if head.disable_adapters or not active or active[0] not in head.modules_to_save:
            head = head.original_module
        else:
            head = head.modules_to_save[active[0]]
    if isinstance(head, BaseTunerLayer) or type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    return head.weight


def _fused_loss_forward(self, *args, **kwargs):
    swapped = swap_of(self, KERNEL)
    data: _LossData = swapped.data
    if len(args) > len(data.positional):
        raise TypeError(f"forward takes {len(data.positional)} positional arguments, {len(args)} were given")
    kwargs.update(zip(data.positional, args, strict=False))
    return_logits = kwargs.pop("return_logits", False)
    labels = kwargs.get("labels")
    logits_to_keep = kwargs.get("logits_to_keep", 0)
    weight = _active_head_weight(self.get_output_embeddings())
    if return_logits or labels is None or weight is None or not _keeps_all(logits_to_keep):
        return swapped.inner(**kwargs)

    # The loss arguments of transformers' ForCausalLMLoss, which the plain forward passes on from **kwargs.
    for key in ("labels", "logits_to_keep"):
        kwargs.pop(key, None)
    num_items_in_batch = kwargs.pop("num_items_in_batch", None)
    ignore_index = kwargs.pop("ignore_index", -100)
    shift_labels = kwargs.pop("shift_labels", None)
    return_dict = kwargs.pop("return_dict", None)

    if data.inner_takes_labels:
        kwargs["labels"] = labels
    outputs = getattr(self, data.inner)(**kwargs, return_dict=True)
    hidden = outputs[0]
    if shift_labels is None:
        # Position t predicts label t + 1; the last position predicts nothing (ForCausalLMLoss pads the same
        # way, which keeps hidden un-sliced: no copy).
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    # Trainer passes num_items_in_batch (the supervised tokens of the whole accumulated batch) when the
    # model accepts loss kwargs: then ForCausalLMLoss sums and divides by it (transformers 5.17 and 5.23).
    reduction = "mean" if num_items_in_batch is None else "sum"
    # Logits in the lm_head weight's dtype, as lm_head(hidden) gives them; autocast off so that holds.
    with torch.autocast(hidden.device.type, enabled=False):
        loss = data.kernel(
            hidden.reshape(-1, hidden.shape[-1]).to(weight.dtype),
            weight,
            shift_labels.reshape(-1).to(hidden.device),
            ignore_index=ignore_index,
            softcap=data.softcap,
            reduction=reduction,
        )
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    fields = {f.name for f in dataclasses.fields(data.output_class)} - {"loss", "logits"}
    result = data.output_class(loss=loss, logits=None, **{f: getattr(outputs, f, None) for f in fields})
    if return_dict is None:
        return_dict = self.config.return_dict
    return result if return_dict else result.to_tuple()


def _keeps_all(logits_to_keep) -> bool:
    return isinstance(logits_to_keep, int) and logits_to_keep == 0
