"""``fc_mlp``: the vision tower's non-gated MLPs (``fc2(act(fc1(x)))``: SigLIP, Qwen2-VL and Qwen3-VL's ViT) run as
one autograd Function (:func:`vlmtune.kernels.fc_mlp.fc_mlp`) when each linear is a LoRA layer the ``lora_linear``
op patched or a frozen linear without LoRA, where the family's ``vision_mlp_kind`` is ``"fc"``. The activation is
read off the module (tanh-GELU, QuickGELU or SiLU); any other MLP keeps its own forward."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import torch

from vlmtune.kernels.hf.common import KERNEL, find_kernel, style, swap
from vlmtune.kernels.hf.mlp import _projection_call
from vlmtune.patching import swap_of

logger = logging.getLogger(__name__)

# vision_mlp_kind -> the (first linear, second linear, activation) attribute names such an MLP may have.
_MLP_LAYOUTS = {
    "fc": (
        ("fc1", "fc2", "activation_fn"),  # SigLIP (Gemma-3, MiniCPM-V)
        ("fc1", "fc2", "act"),  # Qwen2-VL
        ("linear_fc1", "linear_fc2", "act_fn"),  # Qwen3-VL
    )
}


@dataclasses.dataclass
class _FcMlpData:
    fused: Callable  # vlmtune.kernels.fc_mlp.fc_mlp
    projection: type  # its LoraProjection
    names: tuple[str, str]  # the two linears' attribute names
    activation: str  # the activation's name in vlmtune.kernels.fc_mlp


def apply(base, language, family, patch) -> None:
    if family.vision_mlp_kind is None:
        return
    layouts = style(_MLP_LAYOUTS, family.vision_mlp_kind, "vision_mlp_kind", family)
    fused = find_kernel("fc_mlp", "fc_mlp")
    projection = find_kernel("lora_mlp", "LoraProjection")
    references = find_kernel("fc_mlp", "REFERENCE_ACTIVATIONS")
    probe = torch.linspace(-6.0, 6.0, 49)
    for name, module in base.named_modules():
        if family.tower_of(name) != "vision":
            continue
        layout = next((names for names in layouts if all(hasattr(module, a) for a in names)), None)
        if layout is None:
            continue
        # The kernel hard-codes the activation: find the one the module computes.
        act = getattr(module, layout[2])
        activation = next((a for a, ref in references.items() if _computes(act, ref, probe)), None)
        if activation is None:
            logger.warning("%s: activation %s has no fc_mlp kernel; its MLP keeps its own forward", name, act)
            continue
        swap(module, _fc_mlp_forward, patch, _FcMlpData(fused, projection, layout[:2], activation))
        patch.patched["fc_mlp"].append(name)


def _computes(act: Callable, reference: Callable, probe: torch.Tensor) -> bool:
    try:
        return torch.allclose(act(probe), reference(probe), rtol=1e-5, atol=1e-6)
    except (TypeError, RuntimeError):  # not an elementwise function of one tensor
        return False


def _fc_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    swapped = swap_of(self, KERNEL)
    data = swapped.data
    calls = [_projection_call(getattr(self, attr), x) for attr in data.names]
    # Fused when both linears are kernel LoRA layers or frozen linears of one compute dtype; else the module's own
    # forward (a hook on a linear, PEFT's path for a skipped LoRA layer, a trained base weight ...).
    if any(c is None for c in calls) or len({(c.dtype, c.quantized) for c in calls}) != 1:
        return swapped.inner(x)
    fc1, fc2 = (data.projection(c.weight, c.quant_state, c.lora_A, c.lora_B, c.scale) for c in calls)
    out = data.fused(x.to(calls[0].dtype), fc1, calls[0].bias, fc2, calls[1].bias, data.activation)
    return out.to(x.dtype) if calls[0].quantized else out
