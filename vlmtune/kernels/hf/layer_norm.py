"""``layer_norm``: every ``nn.LayerNorm`` with a weight in the vision tower and the projector (SigLIP's encoder
and post-norm, MiniCPM-V's resampler, Qwen2-VL / Qwen3-VL's ViT blocks) runs
:func:`vlmtune.kernels.layer_norm.layer_norm`, where the family's ``vision_norm_kind`` is ``"layer_norm"``."""

from __future__ import annotations

import torch

from vlmtune.kernels.hf.common import KERNEL, find_kernel, style, swap
from vlmtune.patching import swap_of

# vision_norm_kind -> the towers whose nn.LayerNorm modules take the kernel.
_NORM_TOWERS = {"layer_norm": ("vision", "projector")}


def apply(base, language, family, patch) -> None:
    if family.vision_norm_kind is None:
        return
    towers = style(_NORM_TOWERS, family.vision_norm_kind, "vision_norm_kind", family)
    kernel = find_kernel("layer_norm", "layer_norm")
    for name, module in base.named_modules():
        # The exact class: a subclass may compute something else in its forward.
        if type(module) is not torch.nn.LayerNorm or family.tower_of(name) not in towers:
            continue
        if module.weight is None or len(module.normalized_shape) != 1:
            continue  # no affine weight, or normalised over several dims: nn.LayerNorm's own forward
        swap(module, _layer_norm_forward, patch, kernel)
        patch.patched["layer_norm"].append(name)


def _layer_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    kernel = swap_of(self, KERNEL).data
    return kernel(hidden_states, self.weight, self.bias, self.eps)
