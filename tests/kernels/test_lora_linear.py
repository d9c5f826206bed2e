import importlib

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import pytest
import torch

from vlmtune.kernels.lora_linear import NF4_LEVELS, dequantize_nf4, lora_linear, lora_linear_reference


def test_dequantize_nf4_into_given_out_and_refuses_a_wrong_one(device):
    w = torch.randn(96, 128, generator=torch.Generator().manual_seed(2)).to(device, torch.bfloat16)
    packed, state = _quantize(w)
    want = bnbf.dequantize_4bit(packed, state)
    backing = torch.empty(1 + 96 * 128, dtype=torch.bfloat16, device=device)
    # An odd start: 2-byte aligned only, so the kernel takes its per-value stores.
    shifted = backing[1:].view(96, 128)
    got = dequantize_nf4(packed, state, shifted)
    assert got is shifted
    _assert_bit_exact(got, want)
    fp32 = dequantize_nf4(packed, state, torch.empty(96, 128, device=device))
    torch.testing.assert_close(fp32, bnbf.dequantize_4bit(packed, state).float(), atol=0, rtol=2**-7)
    with pytest.raises(ValueError, match="contiguous"):
        dequantize_nf4(packed, state, torch.empty(128, 96, dtype=torch.bfloat16, device=device).t())
    with pytest.raises(ValueError, match=r"\(96, 128\)"):
        dequantize_nf4(packed, state, torch.empty(96, 64, dtype=torch.bfloat16, device=device))


# The package exports the function lora_linear, which shadows the module of the same name as an attribute.
lora_module = importlib.import_module("vlmtune.kernels.lora_linear")

# Both sides run the same GEMMs; they differ in where the output is rounded (the kernel accumulates the LoRA
# product into the base output with addmm_, the reference rounds base and LoRA terms apart and adds) and in
# where the scale is applied, so outputs of size ~1 differ by about one ulp of the dtype (bf16 2^-8,
# fp16 2^-11) and fp32 by reassociation. The weights are scaled by 1/sqrt(in) to keep outputs ~1.
TOLERANCES = {
    torch.float32: (1e-5, 1e-4),
    torch.bfloat16: (3e-2, 2e-2),
    torch.float16: (4e-3, 4e-3),
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _quantize(w: torch.Tensor, nested: bool = True):
    return bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=nested)


def _flat_dequantize(packed: torch.Tensor, quant_state) -> torch.Tensor:
    """bitsandbytes' layout written out in torch: flat row-major blocks of 64, high nibble first."""
    absmax = quant_state.absmax
    if quant_state.nested:
        absmax = bnbf.dequantize_blockwise(absmax, quant_state.state2) + quant_state.offset
    b = packed.reshape(-1)
    codes = torch.stack([b >> 4, b & 15], dim=-1).reshape(-1).long()
    levels = torch.tensor(NF4_LEVELS, device=packed.device)
    n = quant_state.shape.numel()
    values = levels[codes][:n] * absmax.repeat_interleave(quant_state.blocksize)[:n]
    return values.to(quant_state.dtype).reshape(quant_state.shape)


def test_nf4_levels_are_bitsandbytes_levels():
    assert torch.equal(torch.tensor(NF4_LEVELS), bnbf.get_4bit_type("nf4", device="cpu"))


def _assert_bit_exact(got: torch.Tensor, want: torch.Tensor) -> None:
    if got.dtype == torch.bfloat16 and not got.is_cuda:
        # Triton's CPU interpreter rounds fp32 -> bf16 toward zero where CUDA rounds to nearest even:
        # one ulp (2^-8 relative) is all it can promise there. On CUDA bf16 is checked bit for bit.
        torch.testing.assert_close(got, want, atol=0, rtol=2**-7)
    else:
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(96, 128), (33, 64), (160, 192)])
@pytest.mark.parametrize("nested", [True, False])
def test_dequantize_nf4_bit_exact_against_bitsandbytes(device, dtype, shape, nested):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    packed, state = _quantize(w, nested)
    _assert_bit_exact(dequantize_nf4(packed, state), bnbf.dequantize_4bit(packed, state))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("blocksize", [128, 256, 4096])
@pytest.mark.parametrize("nested", [True, False])
def test_dequantize_nf4_other_blocksizes(device, dtype, blocksize, nested):
    """A tile holds 2048 // (blocksize // 2) absmax blocks: one of 4096 values is a tile on its own, and 96 x 128
    ends in a partial tile for the smaller ones."""
    w = torch.randn(96, 128, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    packed, state = bnbf.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=nested)
    _assert_bit_exact(dequantize_nf4(packed, state), _flat_dequantize(packed, state))


# (7, 5): an odd count (one value per byte at the end); (6, 5): an even count in rows of odd length.
@pytest.mark.parametrize("shape", [(96, 48), (160, 96), (7, 5), (6, 5)])
def test_dequantize_nf4_rows_not_multiple_of_64(device, shape):
    """bitsandbytes 0.50's native CPU kernel counts blocks per row here, disagreeing with its own quantiser
    (its CUDA kernel and Python fallback do not), so compare with the flat layout written out in torch."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device, torch.float16)
    packed, state = _quantize(w)
    _assert_bit_exact(dequantize_nf4(packed, state), _flat_dequantize(packed, state))


def _lora_inputs(tokens, in_f, out_f, rank, dtype, device, lora_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, in_f, generator=g).to(device, dtype)
    w = (torch.randn(out_f, in_f, generator=g) / in_f**0.5).to(device, dtype)
    bias = (0.1 * torch.randn(out_f, generator=g)).to(device, dtype)
    lora_dtype = lora_dtype or dtype
    a = (torch.randn(rank, in_f, generator=g) / in_f**0.5).to(device, lora_dtype)
    b = (torch.randn(out_f, rank, generator=g) / rank**0.5).to(device, lora_dtype)
    dy = torch.randn(tokens, out_f, generator=g).to(device, dtype)
    return x, w, bias, a, b, dy


def _run(fn, x, weight, state, bias, a, b, dy, scale, bias_grad=False):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, a, b)]
    bias = None if bias is None else bias.detach().clone().requires_grad_(bias_grad)
    y = fn(leaves[0], weight, state, bias, leaves[1], leaves[2], scale)
    y.backward(dy)
    grads = [t.grad for t in leaves] + ([bias.grad] if bias_grad else [])
    return [y, *grads]


def _compare(got, want, dtype, names=("y", "dx", "dA", "dB", "dbias")):
    atol, rtol = TOLERANCES[dtype]
    for name, a, b in zip(names, got, want, strict=False):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("tokens", [1, 7, 33])
@pytest.mark.parametrize("in_f, out_f", [(48, 96), (160, 48)])
def test_lora_linear_dense_fp32(device, tokens, in_f, out_f):
    x, w, bias, a, b, dy = _lora_inputs(tokens, in_f, out_f, 8, torch.float32, device)
    got = _run(lora_linear, x, w, None, bias, a, b, dy, 2.0, bias_grad=True)
    want = _run(lora_linear_reference, x, w, None, bias, a, b, dy, 2.0, bias_grad=True)
    _compare(got, want, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lora_linear_dense_half_3d_input(device, dtype):
    x, w, bias, a, b, dy = _lora_inputs(14, 96, 160, 4, dtype, device)
    x, dy = x.reshape(2, 7, 96), dy.reshape(2, 7, 160)
    got = _run(lora_linear, x, w, None, bias, a, b, dy, 0.5)
    want = _run(lora_linear_reference, x, w, None, bias, a, b, dy, 0.5)
    _compare(got, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 33])
def test_lora_linear_nf4(device, dtype, tokens):
    x, w, _, a, b, dy = _lora_inputs(tokens, 128, 96, 8, dtype, device)
    packed, state = _quantize(w)
    got = _run(lora_linear, x, packed, state, None, a, b, dy, 2.0)
    want = _run(lora_linear_reference, x, packed, state, None, a, b, dy, 2.0)
    _compare(got, want, dtype)


def test_lora_linear_params4bit_with_fp32_adapters(device):
    """PEFT may keep A/B in fp32 over a bf16 model: the LoRA path runs in bf16, gradients come back fp32."""
    x, w, bias, a, b, dy = _lora_inputs(7, 192, 64, 8, torch.bfloat16, device, lora_dtype=torch.float32)
    param = bnb.nn.Params4bit(w.cpu(), requires_grad=False, quant_type="nf4", compress_statistics=True)
    param = param.to(device)
    got = _run(lora_linear, x, param, param.quant_state, bias, a, b, dy, 2.0)
    want = _run(lora_linear_reference, x, param, param.quant_state, bias, a, b, dy, 2.0)
    assert got[2].dtype == got[3].dtype == torch.float32
    _compare(got, want, torch.bfloat16)


def test_shared_buffer_two_layers_same_shape(device):
    """Two NF4 layers of one shape share the dequantisation buffer; backward must re-dequantise each."""
    x, w1, _, a1, b1, dy = _lora_inputs(7, 64, 64, 4, torch.float32, device, seed=1)
    _, w2, _, a2, b2, _ = _lora_inputs(7, 64, 64, 4, torch.float32, device, seed=2)
    (p1, s1), (p2, s2) = _quantize(w1), _quantize(w2)

    def two_layers(fn, x, a1, b1, a2, b2):
        return fn(fn(x, p1, s1, None, a1, b1, 2.0), p2, s2, None, a2, b2, 2.0)

    results = []
    for fn in (lora_linear, lora_linear_reference):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, a1, b1, a2, b2)]
        y = two_layers(fn, *leaves)
        y.backward(dy)
        results.append([y] + [t.grad for t in leaves])
    _compare(results[0], results[1], torch.float32, names=("y", "dx", "dA1", "dB1", "dA2", "dB2"))
    assert sum(1 for key in lora_module._BUFFERS if key[0] == (64, 64)) == 1


def test_frozen_base_weight_required(device):
    x, w, _, a, b, _ = _lora_inputs(3, 48, 48, 4, torch.float32, device)
    with pytest.raises(ValueError, match="frozen"):
        lora_linear(x, w.requires_grad_(True), None, None, a, b, 1.0)
    with pytest.raises(ValueError, match="LoRA shapes"):
        lora_linear(x, w.detach(), None, None, a.t(), b, 1.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("in_f, out_f", [(3584, 18944), (2560, 10240)])
def test_lora_linear_nf4_real_size(in_f, out_f):
    x, w, _, a, b, dy = _lora_inputs(2048, in_f, out_f, 16, torch.bfloat16, torch.device("cuda"))
    packed, state = _quantize(w)
    _assert_bit_exact(dequantize_nf4(packed, state), bnbf.dequantize_4bit(packed, state))
    got = _run(lora_linear, x, packed, state, None, a, b, dy, 2.0)
    want = _run(lora_linear_reference, x, packed, state, None, a, b, dy, 2.0)
    _compare(got, want, torch.bfloat16)


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_lora_factor_grad_is_the_scaled_product_in_the_factor_dtype(device, half):
    g = torch.Generator().manual_seed(3)
    left = torch.randn(40, 8, generator=g).to(device, half).t()  # as backward passes it: a transposed view
    right = torch.randn(40, 24, generator=g).to(device, half)
    like = torch.empty(8, 24, dtype=half, device=device)
    exact = 0.5 * (left.double() @ right.double())
    fp32 = lora_module.lora_factor_grad(like, left, right, 0.5, torch.float32)
    same = lora_module.lora_factor_grad(like, left, right, 0.5, half)
    assert fp32.dtype == torch.float32 and same.dtype == half and fp32.shape == same.shape == (8, 24)
    # The half result is one rounding of the product; fp32 is that or better (exact accumulation on CUDA).
    ulp = {torch.bfloat16: 2**-8, torch.float16: 2**-11}[half]
    scale = exact.abs().max().item()
    assert (same.double() - exact).abs().max().item() <= 2 * ulp * scale
    assert (fp32.double() - exact).abs().max().item() <= 2 * ulp * scale


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_lora_factor_grad_in_fp32_straight_from_the_gemm_on_cuda():
    """On CUDA a half-precision product wanted in fp32 is written in fp32 by the GEMM: no rounding to bf16."""
    g = torch.Generator().manual_seed(4)
    left = torch.randn(2048, 16, generator=g).to("cuda", torch.bfloat16).t()
    right = torch.randn(2048, 3584, generator=g).to("cuda", torch.bfloat16)
    like = torch.empty(16, 3584, dtype=torch.bfloat16, device="cuda")
    got = lora_module.lora_factor_grad(like, left, right, 2.0, torch.float32)
    exact = 2.0 * (left.double() @ right.double())
    # bf16 rounding alone would leave up to 2^-9 of the largest value; fp32 accumulation leaves ~1e-6.
    assert (got.double() - exact).abs().max().item() <= 1e-5 * exact.abs().max().item()
