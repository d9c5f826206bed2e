"""``mlp``: ``down(act(gate(x)) * up(x))`` with the fused SwiGLU / tanh-GeGLU kernel; when each projection is a
LoRA layer ``lora_linear`` patched or a frozen linear without LoRA, the whole MLP runs as one autograd Function
(:mod:`vlmtune.kernels.lora_mlp`)."""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

from vlmtune.kernels.hf.common import KERNEL, find_kernel, style, swap
from vlmtune.kernels.hf.lora_linear import LoraCall, lora_call
from vlmtune.patching import swap_of

logger = logging.getLogger(__name__)

# mlp_kind -> (kernel name in vlmtune.kernels.gated_mlp, the activation the MLP's act_fn must compute).
_MLP_STYLES = {
    "swiglu": ("swiglu", F.silu),
    "geglu_tanh": ("geglu_tanh", functools.partial(F.gelu, approximate="tanh")),
}
# rope_kind -> kernel name in vlmtune.kernels.rope. Qwen-VL's M-RoPE needs no kernel of its own in
# transformers 5.x (read in 5.17 and 5.23): its rotary module merges the mrope sections before returning, so
# gated_mlp kernel name -> the activation's name in vlmtune.kernels.lora_mlp.
_FUSED_ACTIVATIONS = {"swiglu": "silu", "geglu_tanh": "gelu_tanh"}


@dataclasses.dataclass
class _MlpData:
    gated: Callable  # the activation kernel, for the unfused path
    activation: str  # its name in vlmtune.kernels.lora_mlp
    fused: Callable  # lora_gated_mlp
    projection: type  # its LoraProjection


def apply(base, language, family, patch) -> None:
    kernel_name, activation = style(_MLP_STYLES, family.mlp_kind, "mlp_kind", family)
    probe = torch.linspace(-6.0, 6.0, 49)
    data = _MlpData(
        gated=find_kernel("gated_mlp", kernel_name),
        activation=_FUSED_ACTIVATIONS[kernel_name],
        fused=find_kernel("lora_mlp", "lora_gated_mlp"),
        projection=find_kernel("lora_mlp", "LoraProjection"),
    )
    for name, module in language:
        if not all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            continue
        # The kernel hard-codes the activation: check the module computes the one the family promises.
        act = module.act_fn
        if not torch.allclose(act(probe), activation(probe), rtol=1e-5, atol=1e-6):
            logger.warning("%s: act_fn %s is not %s; its MLP keeps its own forward", name, act, kernel_name)
            continue
        swap(module, _mlp_forward, patch, data)
        patch.patched["mlp"].append(name)


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    data = swap_of(self, KERNEL).data
    # When each projection is a LoRA layer the lora_linear op patched, or a frozen linear without LoRA, the whole
    # MLP is one autograd node.
    calls = [_projection_call(proj, x) for proj in (self.gate_proj, self.up_proj, self.down_proj)]
    if all(c is not None and c.bias is None for c in calls) and len({(c.dtype, c.quantized) for c in calls}) == 1:
        projections = [data.projection(c.weight, c.quant_state, c.lora_A, c.lora_B, c.scale) for c in calls]
        out = data.fused(x.to(calls[0].dtype), *projections, data.activation)
        return out.to(x.dtype) if calls[0].quantized else out
    return self.down_proj(data.gated(self.gate_proj(x), self.up_proj(x)))


def _projection_call(module: torch.nn.Module, x: torch.Tensor) -> LoraCall | None:
    """A patched LoRA layer's kernel inputs (:func:`_lora_call`); for a frozen ``nn.Linear`` or NF4 ``Linear4bit``
    without LoRA, the same with no LoRA matrices; None for anything else, or a module with hooks (its own forward
    then runs)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if module._forward_hooks or module._forward_pre_hooks:
        return None  # the fused node calls no module, so a hook would not fire
    if isinstance(module, BaseTunerLayer):
        return lora_call(module, x)
    dense = type(module) is torch.nn.Linear
    if not dense and not type(module).__module__.startswith("bitsandbytes"):
        return None  # a PEFT ModulesToSaveWrapper, a custom linear ...: its own forward
    if module.weight.requires_grad:
        return None
    if dense:
        return LoraCall(module.weight, None, module.bias, None, None, 0.0, module.weight.dtype, False)
    # Imported only for bitsandbytes models: importing it is slow.
    import bitsandbytes as bnb

    quant_state = getattr(module.weight, "quant_state", None)
    if not isinstance(module, bnb.nn.Linear4bit) or quant_state is None or quant_state.quant_type != "nf4":
        return None
    if getattr(quant_state, "packing_format_for_cpu", False):  # see _lora_call
        return None
    dtype = module.compute_dtype or x.dtype
    return LoraCall(module.weight, quant_state, module.bias, None, None, 0.0, dtype, True)
