"""The flash call's form on this torch. The kernel needs an sm80+ GPU; on meta tensors the real aten op runs its
shape function and its autograd formula, which is what the call form and the gradients' shapes depend on. The
numbers are checked against SDPA on the GPU in test_varlen.py and test_vision_attention.py."""

from __future__ import annotations

import pytest
import torch

from vlmtune.kernels.flash import flash_varlen, runs_flash


@pytest.mark.parametrize(
    "heads, kv_heads, dim, causal",
    [(8, 4, 256, True), (8, 4, 256, False), (16, 16, 80, False)],  # Gemma-3-4B's decoder; Qwen2.5-VL's ViT
)
def test_one_aten_node_each_way_with_grouped_heads(heads, kv_heads, dim, causal):
    q = torch.randn(21, heads, dim, device="meta", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(21, kv_heads, dim, device="meta", dtype=torch.bfloat16, requires_grad=True) for _ in "kv")
    cu = torch.tensor([0, 7, 12, 21], dtype=torch.int32, device="meta")
    out = flash_varlen(q, k, v, cu, cu, 9, 9, dim**-0.5, causal)
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    assert type(out.grad_fn).__name__ == "FlashAttentionBackward0"  # aten's own formula, no Python node
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == v.grad.shape == k.shape


def test_the_cpu_and_other_dtypes_do_not_run_it():
    assert not runs_flash(torch.randn(4, 2, 64, dtype=torch.bfloat16))
    assert not runs_flash(torch.randn(4, 2, 64, device="meta"))  # fp32
