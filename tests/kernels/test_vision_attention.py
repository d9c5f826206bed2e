"""varlen_attention against transformers' loop over cu_seqlens, and the patched Qwen-VL vision towers.

Tolerances: grouped SDPA runs the same per-sequence softmax as the loop, on the same backend, so fp32 agrees to
1e-6 and bf16 to 1e-2 (a few bf16 ulps of values near 1). On CUDA the flash ``varlen_attn`` path is checked
too (bf16, 2e-2: flash accumulates in a different order than the math/efficient SDPA kernels).
"""

import pytest
import torch
import torch.nn.functional as F
from transformers import set_seed

import vlmtune
from vlmtune.data.collator import Collator
from vlmtune.kernels import vision_attention
from vlmtune.kernels.patch import apply_kernels
from vlmtune.kernels.vision_attention import plan_sequences, varlen_attention
from vlmtune.testing import collate, init_lora_b, noise, single

TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 1e-2}


def loop_reference(query, key, value, cu_seqlens):
    """transformers' sdpa path: one attention call per sequence, outputs concatenated."""
    outputs = []
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), strict=True):
        q, k, v = (t[start:end].transpose(0, 1)[None] for t in (query, key, value))
        outputs.append(F.scaled_dot_product_attention(q, k, v)[0].transpose(0, 1))
    return torch.cat(outputs)


def _qkv(cu_seqlens, heads, dim, dtype, device, seed):
    generator = torch.Generator().manual_seed(seed)
    tokens = int(cu_seqlens[-1])
    return [torch.randn(tokens, heads, dim, generator=generator).to(device, dtype).requires_grad_() for _ in "qkv"]


CASES = {
    "uniform": [0, 16, 32, 48, 64],
    "windows": [0, 16, 24, 40, 48, 48, 61],  # edge windows, an empty window, an odd last one
    "single": [0, 37],
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", sorted(CASES))
def test_grouped_matches_the_loop(case, dtype, device, monkeypatch):
    monkeypatch.setattr(vision_attention, "BACKEND", "grouped")
    _check(CASES[case], dtype, device, TOLERANCE[dtype])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash varlen attention needs CUDA")
@pytest.mark.parametrize("case", sorted(CASES))
def test_flash_varlen_matches_the_loop(case, device, monkeypatch):
    monkeypatch.setattr(vision_attention, "BACKEND", "flash")
    _check(CASES[case], torch.bfloat16, device, 2e-2)


def _check(bounds, dtype, device, tol):
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32, device=device)
    heads, dim = 3, 40  # head_dim 80 in Qwen2.5-VL; any multiple of 8 runs on every backend
    got_inputs = _qkv(cu_seqlens, heads, dim, dtype, device, seed=len(bounds))
    want_inputs = [t.detach().clone().requires_grad_() for t in got_inputs]
    got = varlen_attention(*got_inputs, cu_seqlens)
    want = loop_reference(*want_inputs, cu_seqlens)
    assert got.shape == want.shape and got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    grad = torch.randn(got.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    got.backward(grad)
    want.backward(grad)
    for mine, theirs in zip(got_inputs, want_inputs, strict=True):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=tol, atol=tol)


def test_plan_groups_sequences_by_length_and_is_reused():
    cu_seqlens = torch.tensor(CASES["windows"])
    plan = plan_sequences(cu_seqlens)
    assert plan_sequences(cu_seqlens) is plan  # every block of one forward reuses it
    images = torch.tensor([0, 37, 61])  # Qwen2.5-VL's full-attention blocks come between windowed ones
    assert plan_sequences(images) is not plan and plan_sequences(cu_seqlens) is plan
    assert plan.total == 61 and plan.max_len == 16 and plan.uniform is None
    assert [length for length, _ in plan.groups] == [8, 13, 16]
    by_length = {length: index.tolist() for length, index in plan.groups}
    assert by_length[8] == list(range(16, 24)) + list(range(40, 48))
    assert by_length[16] == list(range(0, 16)) + list(range(24, 40))
    assert by_length[13] == list(range(48, 61))
    uniform = plan_sequences(torch.tensor(CASES["uniform"]))
    assert uniform.uniform == (4, 16) and not uniform.groups


def test_cu_seqlens_that_do_not_cover_the_query_raise():
    q = torch.zeros(10, 2, 8)
    with pytest.raises(ValueError, match="covers 12 tokens, the query has 10"):
        varlen_attention(q, q, q, torch.tensor([0, 6, 12]))


@pytest.fixture(params=["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def qwen_family(request, tiny_checkpoint):
    return tiny_checkpoint(request.param)


def test_patched_vision_tower_matches_the_loop(qwen_family):
    set_seed(0)
    model, processor, family = vlmtune.load(qwen_family, dtype="float32")
    model = vlmtune.apply_tuning(model, family, vlmtune.TuningConfig(vision="lora", language="frozen"))
    init_lora_b(model, std=0.05, seed_per_matrix=True)  # every LoRA factor then gets a gradient
    model.train()
    collator = Collator(family, processor, model.config)
    # 112x84 px: 8x6 patches, 4x3 merged; Qwen2.5-VL's 56 px windows cut that into 2x2 and 2x1 windows, so the
    # windowed blocks see sequences of two lengths, and the two images differ in size for the full blocks.
    batch = collate(
        collator, (single("Read it.", "x^{2}"), [noise((112, 84))]), (single("And this.", "y"), [noise((56, 56), 1)])
    )
    batch = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain_loss, plain_grads = loss_and_grads()
    patch = apply_kernels(model, family, ("vision_attention",))
    patched_loss, patched_grads = loss_and_grads()
    patch.revert()

    depth = model.config.vision_config.depth
    assert len(patch.patched["vision_attention"]) == depth
    assert all(
        name.endswith(".attn") and family.tower_of(name) == "vision" for name in patch.patched["vision_attention"]
    )
    torch.testing.assert_close(patched_loss, plain_loss, rtol=1e-6, atol=0)
    assert plain_grads.keys() == patched_grads.keys() and any(".visual." in n for n in plain_grads)
    for name in plain_grads:
        torch.testing.assert_close(patched_grads[name], plain_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    assert not any("_vlmtune_kernel" in m.__dict__ for m in model.modules())
