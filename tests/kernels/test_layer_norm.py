import pytest
import torch

from vlmtune.kernels.layer_norm import layer_norm, layer_norm_reference

# The forward computes in fp32 and rounds once, as torch's layer_norm does: outputs differ where a last-ulp
# difference in the mean or rstd flips a rounding. The backward runs in fp32 and rounds once; torch's CPU kernel
# rounds its intermediates to the input dtype, so gradients differ by a few ulps of that dtype (bf16: 2^-8,
# fp16: 2^-11). The weight and bias gradients, sums over rows, are judged against an fp64 run instead.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (3e-2, 2e-2),
    torch.float16: (4e-3, 4e-3),
}


def _inputs(shape, hidden, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    # A mean far from zero: the variance must not come from E[x^2] - E[x]^2.
    x = (3.0 + torch.randn(*shape, hidden, generator=g)).to(device, dtype)
    w = (1.0 + 0.1 * torch.randn(hidden, generator=g)).to(device, dtype)
    b = (0.1 * torch.randn(hidden, generator=g)).to(device, dtype)
    dy = torch.randn(*shape, hidden, generator=g).to(device, dtype)
    return x, w, b, dy


def _run(fn, x, w, b, dy, eps=1e-6, trainable=True):
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(trainable)
    b = None if b is None else b.detach().clone().requires_grad_(trainable)
    y = fn(x, w, b, eps)
    y.backward(dy)
    return {"y": y, "dx": x.grad, "dw": w.grad, "db": None if b is None else b.grad}


def _relative_error(a: torch.Tensor, golden: torch.Tensor) -> float:
    return ((a.double() - golden).norm() / golden.norm()).item()


def _compare(x, w, b, dy, dtype):
    atol, rtol = TOLERANCES[dtype]
    got, want = _run(layer_norm, x, w, b, dy), _run(layer_norm_reference, x, w, b, dy)
    golden = _run(layer_norm_reference, x.double(), w.double(), None if b is None else b.double(), dy.double())
    for name in ("y", "dx"):
        assert got[name].dtype == want[name].dtype == dtype, name
        torch.testing.assert_close(got[name], want[name], atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")
    for name in ("dw", "db"):
        if want[name] is None:
            assert got[name] is None
            continue
        assert got[name].dtype == dtype
        if dtype == torch.float32:
            torch.testing.assert_close(got[name], want[name], atol=1e-4, rtol=1e-5, msg=name)
        else:  # a sum over rows: the kernel's fp32 accumulation must be no further from fp64 than torch's
            assert _relative_error(got[name], golden[name]) <= max(
                1.5 * _relative_error(want[name], golden[name]), 4e-3
            )


@pytest.mark.parametrize("hidden", [72, 100, 1152])  # 1152 (SigLIP): one row per program
@pytest.mark.parametrize("rows", [1, 37])
def test_layer_norm_fp32(device, rows, hidden):
    x, w, b, dy = _inputs((rows,), hidden, torch.float32, device)
    _compare(x, w, b, dy, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden", [72, 100])
def test_layer_norm_half_3d_input(device, dtype, hidden):
    x, w, b, dy = _inputs((2, 19), hidden, dtype, device)
    _compare(x, w, b, dy, dtype)


def test_layer_norm_without_bias(device):
    x, w, _, dy = _inputs((37,), 100, torch.float32, device)
    _compare(x, w, None, dy, torch.float32)


def test_frozen_weight_and_bias_get_no_gradient(device):
    """LoRA on a SigLIP tower: the norms are frozen, only the input's gradient is computed."""
    x, w, b, dy = _inputs((37,), 72, torch.float32, device)
    got = _run(layer_norm, x, w, b, dy, trainable=False)
    want = _run(layer_norm_reference, x, w, b, dy, trainable=False)
    assert got["dw"] is None and got["db"] is None
    torch.testing.assert_close(got["dx"], want["dx"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["y"], want["y"], atol=1e-5, rtol=1e-5)


def test_non_contiguous_input_and_empty_rows(device):
    x, w, b, dy = _inputs((8,), 72, torch.float32, device)
    wide = torch.cat([x, x], dim=-1)[:, :72]  # rows with a stride of 144
    torch.testing.assert_close(layer_norm(wide, w, b, 1e-5), layer_norm_reference(wide, w, b, 1e-5))
    empty = torch.empty(0, 72, device=device, requires_grad=True)
    w = w.clone().requires_grad_(True)
    out = layer_norm(empty, w, b, 1e-5)
    out.sum().backward()
    assert out.shape == (0, 72) and torch.equal(w.grad, torch.zeros_like(w))


def test_bad_weight_shape_raises(device):
    with pytest.raises(ValueError, match="bias of shape"):
        layer_norm(torch.ones(2, 4, device=device), torch.ones(4, device=device), torch.ones(3, device=device), 1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_layer_norm_real_size():
    """SigLIP-so400m (Gemma-3): 8 images x 4096 patches of width 1152."""
    x, w, b, dy = _inputs((8, 4096), 1152, torch.bfloat16, torch.device("cuda"))
    _compare(x, w, b, dy, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA autocast lists layer_norm as an fp32 op, CPU's not")
def test_under_autocast_the_output_stays_in_the_input_dtype():
    """The Trainer's bf16 autocast runs ``F.layer_norm`` in fp32 on CUDA (and every projection then casts its
    output back): the kernel returns bf16 directly, the reference's fp32 values rounded once."""
    x, w, b, _ = _inputs((37,), 72, torch.bfloat16, torch.device("cuda"))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want = layer_norm_reference(x, w, b, 1e-6)
        got = layer_norm(x, w, b, 1e-6)
    assert want.dtype == torch.float32 and got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want.to(torch.bfloat16), atol=2e-2, rtol=1e-2)
