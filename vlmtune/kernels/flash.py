"""Flash attention over packed variable-length sequences: aten's kernel, called directly.

``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.10) wraps ``aten._flash_attention_forward`` in Python
custom ops, forward and backward, allocates a device tensor per call, and on torch 2.11 takes no grouped
key/value heads (a caller repeats each key/value head for its query heads). A host-bound step pays for each of
those in every layer and again in the checkpointed recomputation. The aten op has its own autograd formula, so
called directly a layer's attention is one C++ node forward and one backward, and the kernel reads grouped
key/value heads in place. ``tests/kernels/test_flash.py`` runs the call on meta tensors on the installed torch
(its form and its gradients' shapes); the numbers are checked against SDPA on the GPU
(``tests/kernels/test_varlen.py``, ``tests/kernels/test_vision_attention.py``).
"""

from __future__ import annotations

import functools

import torch


def flash_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale=None, causal=False):
    """Attention of ``(T, H, D)`` queries over ``(T_k, H_kv, D)`` keys and values, sequence by sequence.

    Sequence ``i`` is queries ``cu_q[i]:cu_q[i + 1]`` against keys ``cu_k[i]:cu_k[i + 1]`` (``int32``, on the
    device); ``max_q`` / ``max_k`` are the longest of each. ``H`` is a multiple of ``H_kv``. ``scale`` defaults
    to ``D ** -0.5``; ``causal`` masks each query's later keys. Only where :func:`runs_flash` holds.
    """
    dropout, debug_mask = 0.0, False
    out, *_ = torch.ops.aten._flash_attention_forward(
        q, k, v, cu_q, cu_k, max_q, max_k, dropout, causal, debug_mask, scale=scale
    )
    return out


def runs_flash(query: torch.Tensor) -> bool:
    """Whether the flash kernel takes these queries: CUDA, 16-bit, a head size it is built for, sm80 or newer.
    ROCm builds keep the other paths (their varlen flash support differs by build)."""
    return (
        query.is_cuda
        and torch.version.hip is None
        and query.dtype in (torch.float16, torch.bfloat16)
        and query.shape[-1] <= 256
        and query.shape[-1] % 8 == 0
        and _capability(query.device.index if query.device.index is not None else torch.cuda.current_device()) >= (8, 0)
    )


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)
