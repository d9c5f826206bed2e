import pytest
import torch

from vlmtune.kernels.gated_mlp import geglu_tanh, geglu_tanh_reference, swiglu, swiglu_reference

# The kernel rounds act(gate) to the input dtype before the product, as eager torch does, so outputs differ
# only where Triton's exp and torch's differ in the last fp32 bit and that flips a rounding: 1 ulp of the
# dtype (bf16 2^-8, fp16 2^-11); Triton's CPU interpreter also rounds to bf16 toward zero (another ulp).
# fp32 sees exp's few-ulp differences, amplified a little in the derivative.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (2e-3, 2e-3),
}

OPS = {"swiglu": (swiglu, swiglu_reference), "geglu_tanh": (geglu_tanh, geglu_tanh_reference)}


def _run(fn, gate, up, dy):
    gate = gate.detach().clone().requires_grad_(True)
    up = up.detach().clone().requires_grad_(True)
    y = fn(gate, up)
    y.backward(dy)
    return y, gate.grad, up.grad


def _compare(op, shape, dtype, device):
    g = torch.Generator().manual_seed(0)
    # 3x wider than randn so the activation's tails (gate << 0, gate >> 0) are exercised.
    gate = (3 * torch.randn(*shape, generator=g)).to(device, dtype)
    up = torch.randn(*shape, generator=g).to(device, dtype)
    dy = torch.randn(*shape, generator=g).to(device, dtype)
    kernel, reference = OPS[op]
    atol, rtol = TOLERANCES[dtype]
    for name, a, b in zip(
        ("y", "dgate", "dup"), _run(kernel, gate, up, dy), _run(reference, gate, up, dy), strict=True
    ):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("tokens", [1, 7, 33])
@pytest.mark.parametrize("intermediate", [48, 96, 160])
def test_gated_fp32(device, op, tokens, intermediate):
    _compare(op, (tokens, intermediate), torch.float32, device)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gated_half(device, op, dtype):
    _compare(op, (2, 7, 160), dtype, device)


def test_non_contiguous_halves_of_a_fused_projection(device):
    """A fused gate_up projection split with chunk() hands over strided views."""
    gate_up = torch.randn(7, 2 * 96, device=device)
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(swiglu(gate, up), swiglu_reference(gate, up), atol=1e-5, rtol=1e-5)


def test_shape_mismatch_raises(device):
    with pytest.raises(ValueError, match="same shape"):
        swiglu(torch.ones(2, 3, device=device), torch.ones(2, 4, device=device))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("op, intermediate", [("swiglu", 18944), ("geglu_tanh", 10240)])
def test_gated_real_size(op, intermediate):
    _compare(op, (2048, intermediate), torch.bfloat16, torch.device("cuda"))
