"""``lora_linear``: PEFT LoRA linears (any tower) over an ``nn.Linear`` or bitsandbytes NF4 ``Linear4bit`` base, with
one active adapter and no dropout, DoRA or other variant, run :func:`vlmtune.kernels.lora_linear.lora_linear`;
the rest keep PEFT's path, listed in ``KernelPatch.skipped`` with the reason."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from typing import Any

import torch

from vlmtune.kernels.hf.common import KERNEL, find_kernel, swap
from vlmtune.patching import swap_of


@dataclasses.dataclass
class _LoraData:
    kernel: Callable
    adapter: str
    quantized: bool


def apply(base, language, family, patch) -> None:
    from peft.tuners.lora import LoraLayer

    kernel = find_kernel("lora_linear", "lora_linear")
    # Every tower's LoRA layers: in the vision tower PEFT's path casts each input to the fp32 LoRA weights and
    # autocast casts it back, keeping an extra copy of every LoRA'd linear's input for backward.
    for name, module in base.named_modules():
        if not isinstance(module, LoraLayer) or family.tower_of(name) is None:
            continue
        reason, adapter_name, quantized = _lora_eligibility(module)
        if reason:
            patch.skipped[name] = reason
            continue
        swap(module, _lora_forward, patch, _LoraData(kernel, adapter_name, quantized))
        patch.patched["lora_linear"].append(name)


def _lora_eligibility(module) -> tuple[str | None, str, bool]:
    """``(why not, adapter name, NF4 base)`` for one PEFT LoRA layer; ``why not`` is None when eligible."""
    from peft.tuners.lora import Linear as LoraLinear

    layer = module.get_base_layer()
    quantized = type(layer).__module__.startswith("bitsandbytes")
    if quantized:
        # Imported only for bitsandbytes models: importing it is slow, and PEFT defines this class only when
        # bitsandbytes is installed.
        import bitsandbytes as bnb
        from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

        if type(module) is not LoraLinear4bit or not isinstance(layer, bnb.nn.Linear4bit):
            return f"{type(module).__name__} over {type(layer).__name__} is not LoRA on NF4 Linear4bit", "", True
        if layer.weight.quant_state.quant_type != "nf4":
            return f"4-bit {layer.weight.quant_state.quant_type}, not nf4", "", True
    elif type(module) is not LoraLinear or type(layer) is not torch.nn.Linear:
        return f"{type(module).__name__} over {type(layer).__name__} is not LoRA on nn.Linear", "", False
    active = list(module.active_adapters)
    if len(active) != 1:
        return f"{len(active)} active adapters", "", quantized
    name = active[0]
    if module.merged:
        return "merged", name, quantized
    if name not in module.lora_A:
        return f"no LoRA weights for adapter {name!r}", name, quantized
    if not isinstance(module.lora_dropout[name], torch.nn.Identity):
        return "lora_dropout > 0", name, quantized
    # DoRA, aLoRA, ... live in lora_variant (PEFT >= 0.15); use_dora is the older flag for DoRA.
    if module.use_dora.get(name, False) or name in getattr(module, "lora_variant", {}):
        return "a LoRA variant (DoRA, ...)", name, quantized
    if getattr(module, "fan_in_fan_out", False) or module.lora_B[name].bias is not None:
        return "fan_in_fan_out or a LoRA bias", name, quantized
    if layer.weight.requires_grad:
        return "the base weight trains", name, quantized
    return None, name, quantized


class LoraCall(typing.NamedTuple):
    """What the lora_linear kernel is called with for one patched LoRA layer, in its compute ``dtype``."""

    weight: torch.Tensor
    quant_state: Any
    bias: torch.Tensor | None
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scale: float
    dtype: torch.dtype
    quantized: bool


def lora_call(module: torch.nn.Module, x: torch.Tensor) -> LoraCall | None:
    """The kernel's inputs for a LoRA layer that :func:`_patch_lora_linear` patched, or None where its own
    forward must run: not patched, or switched by PEFT since (``disable_adapter()``, ``set_adapter``, merge)."""
    swapped = swap_of(module, KERNEL)
    if swapped is None or not isinstance(swapped.data, _LoraData):
        return None
    data = swapped.data
    if module.disable_adapters or module.merged or list(module.active_adapters) != [data.adapter]:
        return None
    layer = module.get_base_layer()
    quant_state = None
    if data.quantized:
        quant_state = layer.weight.quant_state
        # bitsandbytes repacks a weight for its own CPU GEMM at the first eval-mode call on some CPUs; that
        # layout is not NF4's, so such a layer stays on bitsandbytes' path.
        if getattr(quant_state, "packing_format_for_cpu", False):
            return None
        # bitsandbytes runs in its compute dtype and returns the input's dtype.
        dtype = layer.compute_dtype or x.dtype
    else:
        dtype = layer.weight.dtype
    a, b = module.lora_A[data.adapter].weight, module.lora_B[data.adapter].weight
    scale = module.scaling[data.adapter]
    return LoraCall(layer.weight, quant_state, layer.bias, a, b, scale, dtype, data.quantized)


def _lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    swapped = swap_of(self, KERNEL)
    call = None if args or kwargs else lora_call(self, x)
    if call is None:
        return swapped.inner(x, *args, **kwargs)
    out = swapped.data.kernel(
        x.to(call.dtype), call.weight, call.quant_state, call.bias, call.lora_A, call.lora_B, call.scale
    )
    return out.to(x.dtype) if call.quantized else out
