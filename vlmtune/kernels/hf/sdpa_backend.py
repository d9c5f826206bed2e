"""``sdpa_backend``: the language tower's attention runs ``scaled_dot_product_attention`` without cuDNN.

PyTorch picks cuDNN's fused attention first on Hopper, and cuDNN builds an execution plan for every new input
shape: measured on an H200 (Qwen2.5-VL-7B QLoRA, batch 8 of LaTeX-OCR rows), a step whose sequence length had
not been seen before spent ~150 ms more host time in ``_cudnn_attention_forward`` / ``_backward`` than the same
step again. Real data has a new length almost every step, so the language tower pays that on most steps; with
cuDNN left out SDPA runs flash or memory-efficient attention, which need no plan, and the warm step was no
slower. The vision towers keep the default: their shapes repeat (Gemma-3's 896x896 crops), where cuDNN is the
fastest backend at head dim 72 (``python -m benchmarks.sdpa_backends``).

Each attention module's forward runs inside ``torch.nn.attention.sdpa_kernel``, which ``torch.compile`` traces
without a graph break; the activation-checkpointing recomputation calls the same forward, so forward and
recomputation pick the same backend.
"""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from vlmtune.patching import swap_forward, swap_of

KEY = "_vlmtune_sdpa_backend"
"""The swap's key: a separate one from the kernels', so it stacks on the RoPE op's attention forward."""
BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def apply(base, language, family, patch) -> None:
    for name, module in language:
        if type(module).__name__.endswith("Attention") and isinstance(getattr(module, "q_proj", None), torch.nn.Module):
            patch._restores.append(swap_forward(module, KEY, _attention_forward))
            patch.patched["sdpa_backend"].append(name)


def _attention_forward(self, *args, **kwargs):
    with sdpa_kernel(BACKENDS):
        return swap_of(self, KEY).inner(*args, **kwargs)
