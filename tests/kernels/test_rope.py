import pytest
import torch
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding

from vlmtune.kernels.rope import (
    apply_mrope,
    apply_mrope_reference,
    apply_rope,
    apply_rope_reference,
    merge_mrope_sections,
)

# The kernel rounds each product to the output dtype before adding, like the eager expression, with FMA
# contraction off, so on CUDA every dtype agrees bit for bit (the bitwise tests check it). The tolerances are
# for Triton's CPU interpreter, which rounds fp32 -> bf16 toward zero instead of to nearest: bf16 is off by
# up to 2 ulps (2^-7 relative) there; fp32 and fp16 (numpy casts) match to the last bit or nearly.
TOLERANCES = {
    torch.float32: (1e-6, 1e-5),
    torch.bfloat16: (2e-2, 1e-2),
    torch.float16: (1e-3, 1e-3),
}


def _cos_sin(positions: torch.Tensor, head_dim: int, base: float, dtype: torch.dtype):
    """Hugging Face's default rotary embedding: halves repeat the same frequencies."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _qk(batch, n_q, n_k, seq, head_dim, dtype, device, transposed=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    if transposed:  # what attention hands over: (B, T, H, D) projections viewed as (B, H, T, D)
        q = torch.randn(batch, seq, n_q, head_dim, generator=g).to(device, dtype).transpose(1, 2)
        k = torch.randn(batch, seq, n_k, head_dim, generator=g).to(device, dtype).transpose(1, 2)
    else:
        q = torch.randn(batch, n_q, seq, head_dim, generator=g).to(device, dtype)
        k = torch.randn(batch, n_k, seq, head_dim, generator=g).to(device, dtype)
    dq = torch.randn(q.shape, generator=g).to(device, dtype)
    dk = torch.randn(k.shape, generator=g).to(device, dtype)
    return q, k, dq, dk


def _fwd_bwd(fn, q, k, dq, dk, *args):
    q = q.detach().clone().requires_grad_(True)
    k = k.detach().clone().requires_grad_(True)
    q_out, k_out = fn(q, k, *args)
    torch.autograd.backward((q_out, k_out), (dq, dk))
    return q_out, k_out, q.grad, k.grad


def _assert_all_close(got, want, dtype):
    atol, rtol = TOLERANCES[dtype]
    for name, a, b in zip(("q_embed", "k_embed", "dq", "dk"), got, want, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("seq", [1, 7, 33])
@pytest.mark.parametrize("head_dim", [16, 48])
@pytest.mark.parametrize("heads", [(4, 2), (3, 1)])
def test_rope_fp32(device, seq, head_dim, heads):
    q, k, dq, dk = _qk(2, *heads, seq, head_dim, torch.float32, device)
    positions = torch.arange(seq).expand(2, seq) + torch.tensor([[0], [5]])
    cos, sin = (t.to(device) for t in _cos_sin(positions, head_dim, 10_000.0, torch.float32))
    got = _fwd_bwd(apply_rope, q, k, dq, dk, cos, sin)
    want = _fwd_bwd(apply_rope_reference, q, k, dq, dk, cos, sin)
    _assert_all_close(got, want, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("base", [10_000.0, 1_000_000.0], ids=["gemma_local", "gemma_global"])
def test_rope_half_gemma_bases_transposed_views(device, dtype, base):
    """Gemma-3's sliding and global layers differ only in the base; q/k arrive as transposed views and
    cos/sin with a batch of 1 (position ids shared across the batch)."""
    q, k, dq, dk = _qk(2, 4, 2, 7, 32, dtype, device, transposed=True)
    cos, sin = (t.to(device) for t in _cos_sin(torch.arange(7)[None] + 100, 32, base, dtype))
    got = _fwd_bwd(apply_rope, q, k, dq, dk, cos, sin)
    want = _fwd_bwd(apply_rope_reference, q, k, dq, dk, cos, sin)
    _assert_all_close(got, want, dtype)
    assert got[0].stride() == q.stride(), "output keeps the (B, T, H, D) layout of its input"


BITWISE_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("dtype", BITWISE_DTYPES)
def test_rope_bitwise_like_eager(device, dtype):
    q, k, dq, dk = _qk(1, 4, 2, 9, 64, dtype, device)
    cos, sin = (t.to(device) for t in _cos_sin(torch.arange(9)[None] * 37, 64, 10_000.0, dtype))
    got = _fwd_bwd(apply_rope, q, k, dq, dk, cos, sin)
    want = _fwd_bwd(apply_rope_reference, q, k, dq, dk, cos, sin)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def _mrope_positions(batch: int, seq: int) -> torch.Tensor:
    """Random (3, B, T) time/height/width ids: the three axes disagree, as they do over an image."""
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 64, (3, batch, seq), generator=g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seq", [1, 33])
def test_mrope_matches_reference(device, dtype, seq):
    head_dim, section = 32, [4, 6, 6]
    q, k, dq, dk = _qk(2, 4, 2, seq, head_dim, dtype, device)
    cos, sin = (t.to(device) for t in _cos_sin(_mrope_positions(2, seq), head_dim, 10_000.0, dtype))
    got = _fwd_bwd(apply_mrope, q, k, dq, dk, cos, sin, section)
    want = _fwd_bwd(apply_mrope_reference, q, k, dq, dk, cos, sin, section)
    _assert_all_close(got, want, dtype)


def test_mrope_equals_rope_on_transformers_merged_cos(device):
    """transformers 5.x merges the sections inside Qwen2_5_VLRotaryEmbedding; merging our per-axis cos/sin
    the 4.x way must give the same tensors, and apply_mrope the same result as apply_rope on them."""
    head_dim, section, seq = 32, [4, 6, 6], 7
    config = Qwen2_5_VLTextConfig(
        hidden_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0, "mrope_section": section},
    )
    positions = _mrope_positions(2, seq)
    hf_cos, hf_sin = Qwen2_5_VLRotaryEmbedding(config)(torch.zeros(1), positions)
    cos, sin = _cos_sin(positions, head_dim, 10_000.0, torch.float32)
    torch.testing.assert_close(merge_mrope_sections(cos, section), hf_cos, atol=0, rtol=0)
    torch.testing.assert_close(merge_mrope_sections(sin, section), hf_sin, atol=0, rtol=0)

    q, k, dq, dk = _qk(2, 4, 2, seq, head_dim, torch.float32, device)
    got = _fwd_bwd(apply_mrope, q, k, dq, dk, cos.to(device), sin.to(device), section)
    want = _fwd_bwd(apply_rope, q, k, dq, dk, hf_cos.to(device), hf_sin.to(device))
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def test_rope_rejects_bad_sections(device):
    q, k, _, _ = _qk(1, 2, 1, 3, 16, torch.float32, device)
    cos = torch.ones(3, 1, 3, 16, device=device)
    with pytest.raises(ValueError, match="mrope_section"):
        apply_mrope(q, k, cos, cos, [2, 3, 4])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_rope_real_size_qwen2_5_vl_7b():
    """Qwen2.5-VL-7B: 28 query heads, 4 KV heads, head_dim 128, M-RoPE sections [16, 24, 24]."""
    dtype, device = torch.bfloat16, torch.device("cuda")
    q, k, dq, dk = _qk(1, 28, 4, 2048, 128, dtype, device, transposed=True)
    cos, sin = (t.to(device) for t in _cos_sin(_mrope_positions(1, 2048), 128, 1_000_000.0, dtype))
    got = _fwd_bwd(apply_mrope, q, k, dq, dk, cos, sin, [16, 24, 24])
    want = _fwd_bwd(apply_mrope_reference, q, k, dq, dk, cos, sin, [16, 24, 24])
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("base", [10_000.0, 1_000_000.0], ids=["local", "global"])
def test_rope_real_size_gemma3_4b(base):
    """Gemma-3-4B: 8 query heads, 4 KV heads, head_dim 256; sliding layers base 1e4, global layers 1e6."""
    dtype, device = torch.bfloat16, torch.device("cuda")
    q, k, dq, dk = _qk(1, 8, 4, 2048, 256, dtype, device, transposed=True)
    cos, sin = (t.to(device) for t in _cos_sin(torch.arange(2048)[None], 256, base, dtype))
    got = _fwd_bwd(apply_rope, q, k, dq, dk, cos, sin)
    want = _fwd_bwd(apply_rope_reference, q, k, dq, dk, cos, sin)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
