import pytest
import torch

from vlmtune.kernels.rms_norm import rms_norm, rms_norm_reference

# The forward repeats Hugging Face's roundings step by step, so it differs from the reference only where
# a last-ulp difference in rstd flips a rounding. The backward runs in fp32 where autograd rounds every
# intermediate to the input dtype, so gradients differ by a few ulps of that dtype (bf16: 2^-8, fp16: 2^-11),
# and the weight gradient, a sum over rows, by a few more.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (3e-2, 2e-2),
    torch.float16: (4e-3, 4e-3),
}

# Hugging Face's defaults: Qwen2 starts its weight at ones, Gemma-3 at zeros around the (1 + w) offset.
FAMILIES = {"llama": (0.0, 1.0), "gemma": (1.0, 0.0)}


def _run(fn, x, w, dy, eps, offset, casting):
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    y = fn(x, w, eps, offset=offset, casting=casting)
    y.backward(dy)
    return y, x.grad, w.grad


def _inputs(shape, hidden, dtype, device, casting, seed=0):
    offset, centre = FAMILIES[casting]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, hidden, generator=g).to(device, dtype)
    w = (centre + 0.1 * torch.randn(hidden, generator=g)).to(device, dtype)
    dy = torch.randn(*shape, hidden, generator=g).to(device, dtype)
    return x, w, dy, offset


def _compare(x, w, dy, offset, casting, dtype, eps=1e-6):
    atol, rtol = TOLERANCES[dtype]
    got = _run(rms_norm, x, w, dy, eps, offset, casting)
    want = _run(rms_norm_reference, x, w, dy, eps, offset, casting)
    for name, a, b in zip(("y", "dx", "dw"), got, want, strict=True):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("casting", ["llama", "gemma"])
@pytest.mark.parametrize("hidden", [48, 96, 160])
@pytest.mark.parametrize("tokens", [1, 7, 33])
def test_rms_norm_fp32(device, casting, hidden, tokens):
    x, w, dy, offset = _inputs((tokens,), hidden, torch.float32, device, casting)
    _compare(x, w, dy, offset, casting, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("casting", ["llama", "gemma"])
@pytest.mark.parametrize("hidden", [48, 160])
def test_rms_norm_half(device, dtype, casting, hidden):
    x, w, dy, offset = _inputs((2, 7), hidden, dtype, device, casting)
    _compare(x, w, dy, offset, casting, dtype)


# Triton's interpreter rounds fp32 -> bf16 toward zero (CUDA rounds to nearest even), so the bitwise check
# runs in bf16 only on a GPU; numpy's fp16 cast rounds to nearest even like CUDA.
HALF_DTYPES_BITWISE = [torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("dtype", HALF_DTYPES_BITWISE)
def test_forward_matches_hf_roundings_llama(device, dtype):
    """Llama casting rounds x_hat to the input dtype before the weight multiply; the kernel rounds there too,
    so only a last-ulp difference in rstd can flip an output."""
    x, w, _, offset = _inputs((5,), 96, dtype, device, "llama")
    got = rms_norm(x, w, 1e-6, offset=offset, casting="llama")
    want = rms_norm_reference(x, w, 1e-6, offset=offset, casting="llama")
    mismatches = (got != want).float().mean().item()
    assert mismatches < 0.02


def test_head_norm_shape_and_frozen_weight(device):
    """Gemma-3's q_norm/k_norm normalise (B, T, heads, head_dim); a frozen weight gets no gradient."""
    x, w, dy, offset = _inputs((2, 3, 4), 32, torch.float32, device, "gemma")
    x.requires_grad_(True)
    y = rms_norm(x, w, 1e-6, offset=offset, casting="gemma")
    y.backward(dy)
    assert y.shape == x.shape and w.grad is None
    torch.testing.assert_close(y, rms_norm_reference(x, w, 1e-6, offset=offset, casting="gemma"))


def test_fp32_weight_with_bf16_input_promotes_like_hf(device):
    x, _, _, _ = _inputs((3,), 48, torch.bfloat16, device, "llama")
    w = torch.ones(48, device=device)
    assert rms_norm(x, w, 1e-6).dtype == torch.float32
    assert rms_norm(x, w, 1e-6, offset=1.0, casting="gemma").dtype == torch.bfloat16


def test_bad_casting_raises(device):
    with pytest.raises(ValueError, match="casting"):
        rms_norm(torch.ones(2, 4, device=device), torch.ones(4, device=device), 1e-6, casting="t5")


def _relative_error(a: torch.Tensor, golden: torch.Tensor) -> float:
    return ((a.double() - golden).norm() / golden.norm()).item()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("casting, hidden", [("llama", 3584), ("gemma", 2560)])
def test_rms_norm_real_size(casting, hidden):
    """At 2048 rows the bf16 reference's weight gradient (a bf16 sum of bf16 products) is itself far off, so
    both are judged against an fp64 run of the reference: the kernel must be no further from it."""
    x, w, dy, offset = _inputs((2048,), hidden, torch.bfloat16, torch.device("cuda"), casting)
    atol, rtol = TOLERANCES[torch.bfloat16]
    got = _run(rms_norm, x, w, dy, 1e-6, offset, casting)
    want = _run(rms_norm_reference, x, w, dy, 1e-6, offset, casting)
    golden = _run(rms_norm_reference, x.double(), w.double(), dy.double(), 1e-6, offset, casting)
    for name, a, b in zip(("y", "dx"), got, want, strict=False):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")
    assert _relative_error(got[2], golden[2]) <= max(1.5 * _relative_error(want[2], golden[2]), 1e-3)
