"""``rms_norm``: every ``*RMSNorm`` of the language tower with a ``weight`` (Gemma-3's ``q_norm`` / ``k_norm``
included) runs :func:`vlmtune.kernels.rms_norm.rms_norm`."""

from __future__ import annotations

import torch

from vlmtune.kernels.hf.common import KERNEL, find_kernel, style, swap
from vlmtune.patching import swap_of

# norm_kind -> (offset, casting) of vlmtune.kernels.rms_norm: Gemma scales by (1 + w) and casts once at the end.
_NORM_STYLES = {"rms": (0.0, "llama"), "rms_gemma": (1.0, "gemma")}


def apply(base, language, family, patch) -> None:
    offset, casting = style(_NORM_STYLES, family.norm_kind, "norm_kind", family)
    kernel = find_kernel("rms_norm", "rms_norm")
    for name, module in language:
        if not type(module).__name__.endswith("RMSNorm"):
            continue
        weight = getattr(module, "weight", None)
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        if not isinstance(weight, torch.nn.Parameter) or weight.dim() != 1 or eps is None:
            continue
        swap(module, _rms_norm_forward, patch, (kernel, float(eps), offset, casting))
        patch.patched["rms_norm"].append(name)


def _rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    kernel, eps, offset, casting = swap_of(self, KERNEL).data
    return kernel(hidden_states, self.weight, eps, offset=offset, casting=casting)
