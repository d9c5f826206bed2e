import bitsandbytes.functional as bnbf
import pytest
import torch

from vlmtune.kernels.fc_mlp import bias_act_backward, bias_act_forward, fc_mlp, fc_mlp_reference
from vlmtune.kernels.lora_mlp import LoraProjection

# fp32: both sides run the same GEMMs in another order, so they agree to reassociation.
FP32_TOLERANCE = (2e-5, 2e-4)
# Half precision: two LoRA linears and an activation round at different places (the fused path adds fc1's bias
# after its GEMM and accumulates the LoRA terms in GEMM epilogues; the reference adds the bias in the GEMM and
# rounds each term), so both are compared with the reference computed in fp32 from the same inputs: the fused
# error may be at most the reference's own times the ratio below, plus a floor for outputs the reference gets
# exactly. The same bound as the gated MLP's (tests/kernels/test_lora_mlp.py), for the same reasons: the CPU
# interpreter rounds fp32 -> bf16 toward zero where CUDA rounds to nearest.
HALF_ERROR_RATIO = {torch.float16: 2.5, torch.bfloat16: 3.0 if torch.cuda.is_available() else 4.0}
HALF_ERROR_FLOOR = 1e-3
ACTIVATIONS = ["gelu_tanh", "quick_gelu", "silu"]


def _mlp(hidden, inter, rank, dtype, device, nf4=False, lora=(True, True), bias=True, lora_dtype=None, seed=0):
    """``(fc1, bias1, fc2, bias2)``: SigLIP's shape, fc2 back to ``hidden``."""
    g = torch.Generator().manual_seed(seed)
    lora_dtype = lora_dtype or dtype
    parts = []
    for (out_f, in_f, scale), with_lora in zip(((inter, hidden, 2.0), (hidden, inter, 0.5)), lora, strict=True):
        w = (torch.randn(out_f, in_f, generator=g) / in_f**0.5).to(device, dtype)
        state = None
        if nf4:
            w, state = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
        p = LoraProjection(w, state)
        if with_lora:
            a = (torch.randn(rank, in_f, generator=g) / in_f**0.5).to(device, lora_dtype)
            b = (torch.randn(out_f, rank, generator=g) / rank**0.5).to(device, lora_dtype)
            p = LoraProjection(w, state, a, b, scale)
        parts += [p, (0.5 * torch.randn(out_f, generator=g)).to(device, dtype) if bias else None]
    return parts


def _run(fn, x, parts, activation, dy, trainable_bias=False):
    """Output and gradients by name: y, dx, dA_/dB_ of each linear with LoRA, dbias_ of each trainable bias."""
    x = x.detach().clone().requires_grad_(True)
    leaves, fresh = {"dx": x}, []
    for name, p, bias in (("fc1", parts[0], parts[1]), ("fc2", parts[2], parts[3])):
        if p.lora_A is not None:
            p = p._replace(lora_A=p.lora_A.detach().clone().requires_grad_(True))
            p = p._replace(lora_B=p.lora_B.detach().clone().requires_grad_(True))
            leaves.update({f"dA_{name}": p.lora_A, f"dB_{name}": p.lora_B})
        if bias is not None and trainable_bias:
            bias = bias.detach().clone().requires_grad_(True)
            leaves[f"dbias_{name}"] = bias
        fresh += [p, bias]
    y = fn(x, *fresh, activation)
    y.backward(dy)
    return {"y": y, **{name: t.grad for name, t in leaves.items()}}


def _upcast(parts):
    """LoRA matrices, dense weights and biases in fp32; NF4 weights dequantise to the same values in fp32."""
    out = []
    for p in parts:
        if isinstance(p, LoraProjection):
            if p.lora_A is not None:
                p = p._replace(lora_A=p.lora_A.float(), lora_B=p.lora_B.float())
            p = p if p.quant_state is not None else p._replace(weight=p.weight.float())
        elif p is not None:
            p = p.float()
        out.append(p)
    return out


def _compare(x, parts, activation, dy, dtype, trainable_bias=False):
    got = _run(fc_mlp, x, parts, activation, dy, trainable_bias)
    want = _run(fc_mlp_reference, x, parts, activation, dy, trainable_bias)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, name
    if dtype == torch.float32:
        for name in want:
            tol = {"atol": FP32_TOLERANCE[0], "rtol": FP32_TOLERANCE[1]}
            torch.testing.assert_close(got[name], want[name], **tol, msg=name)
        return
    exact = _run(fc_mlp_reference, x.float(), _upcast(parts), activation, dy.float(), trainable_bias)
    for name, e in exact.items():
        fused_error = (got[name].float() - e).abs().max().item()
        reference_error = (want[name].float() - e).abs().max().item()
        floor = HALF_ERROR_FLOOR * e.abs().max().item()
        assert fused_error <= HALF_ERROR_RATIO[dtype] * reference_error + floor, (
            f"{name}: fused error {fused_error:.3g} vs the {dtype} reference's {reference_error:.3g}"
        )


def _inputs(tokens, hidden, dtype, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, hidden, generator=g).to(device, dtype), torch.randn(tokens, hidden, generator=g).to(
        device, dtype
    )


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("tokens, hidden, inter", [(1, 48, 96), (37, 72, 130), (37, 100, 130)])
def test_dense_fp32(device, activation, tokens, hidden, inter):
    x, dy = _inputs(tokens, hidden, torch.float32, device)
    _compare(x, _mlp(hidden, inter, 8, torch.float32, device), activation, dy, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dense_half_3d_input(device, dtype):
    x, dy = _inputs(2 * 19, 72, dtype, device)
    _compare(x.reshape(2, 19, 72), _mlp(72, 130, 4, dtype, device), "gelu_tanh", dy.reshape(2, 19, 72), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4(device, dtype):
    """NF4 bases, dequantised per use (rows a multiple of 64: bitsandbytes' CPU dequantiser disagrees with its own
    layout otherwise, see test_lora_linear.test_dequantize_nf4_rows_not_multiple_of_64)."""
    x, dy = _inputs(9, 128, dtype, device)
    _compare(x, _mlp(128, 192, 8, dtype, device, nf4=True), "gelu_tanh", dy, dtype)


@pytest.mark.parametrize("lora", [(True, False), (False, True), (False, False)])
def test_linears_without_lora(device, lora):
    """LoRA on the attention only, or a frozen tower passing gradients back: some or none of the linears have LoRA."""
    x, dy = _inputs(37, 72, torch.float32, device)
    _compare(x, _mlp(72, 130, 4, torch.float32, device, lora=lora), "gelu_tanh", dy, torch.float32)


def test_no_biases_and_trainable_biases(device):
    x, dy = _inputs(37, 72, torch.float32, device)
    _compare(x, _mlp(72, 130, 4, torch.float32, device, bias=False), "quick_gelu", dy, torch.float32)
    _compare(x, _mlp(72, 130, 4, torch.float32, device), "gelu_tanh", dy, torch.float32, trainable_bias=True)


def test_fp32_adapters_over_bf16_keep_fp32_gradients(device):
    x, dy = _inputs(5, 64, torch.bfloat16, device)
    parts = _mlp(64, 128, 4, torch.bfloat16, device, lora_dtype=torch.float32)
    grads = _run(fc_mlp, x, parts, "gelu_tanh", dy)
    assert grads["y"].dtype == grads["dx"].dtype == torch.bfloat16
    assert all(g.dtype == torch.float32 for name, g in grads.items() if name.startswith("d") and name != "dx")
    _compare(x, parts, "gelu_tanh", dy, torch.bfloat16)


def test_only_the_inputs_that_ask_get_gradients(device):
    """x frozen (the first layer's input) and only the A matrices trainable: their gradients match the reference's."""
    x, dy = _inputs(5, 48, torch.float32, device)
    grads = []
    for fn in (fc_mlp, fc_mlp_reference):
        parts = _mlp(48, 96, 4, torch.float32, device)
        for p in parts[::2]:
            p.lora_A.requires_grad_(True)
        fn(x, *parts, "gelu_tanh").backward(dy)
        assert x.grad is None and all(p.lora_B.grad is None for p in parts[::2])
        grads.append([p.lora_A.grad for p in parts[::2]])
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, atol=FP32_TOLERANCE[0], rtol=FP32_TOLERANCE[1])


def test_epilogue_adds_the_bias_in_place_and_backward_recomputes_the_activation(device):
    g = torch.Generator().manual_seed(3)
    pre, bias, dout = torch.randn(5, 33, generator=g), torch.randn(33, generator=g), torch.randn(5, 33, generator=g)
    pre, bias, dout = pre.to(device), bias.to(device), dout.to(device)
    leaf = (pre + bias).requires_grad_(True)
    want = torch.nn.functional.gelu(leaf, approximate="tanh")
    want.backward(dout)
    buffer = pre.clone()
    out = bias_act_forward(buffer, bias, "gelu_tanh")
    torch.testing.assert_close(buffer, pre + bias)
    torch.testing.assert_close(out, want.detach(), atol=1e-5, rtol=1e-5)
    recomputed, d = torch.empty_like(out), dout.clone()
    dpre = bias_act_backward(d, buffer, "gelu_tanh", out=recomputed)
    assert dpre.data_ptr() == d.data_ptr()
    torch.testing.assert_close(recomputed, out)
    torch.testing.assert_close(dpre, leaf.grad, atol=1e-5, rtol=1e-5)


def test_bad_shapes_and_trainable_base_raise(device):
    x, _ = _inputs(3, 48, torch.float32, device)
    fc1, b1, fc2, b2 = _mlp(48, 96, 4, torch.float32, device)
    with pytest.raises(ValueError, match="not an MLP"):
        fc_mlp(x, fc2, b2, fc2, b2, "gelu_tanh")
    with pytest.raises(ValueError, match="fc1: LoRA shapes"):
        fc_mlp(x, fc1._replace(lora_A=fc1.lora_A.t()), b1, fc2, b2, "gelu_tanh")
    with pytest.raises(ValueError, match="frozen"):
        fc_mlp(x, fc1, b1, fc2._replace(weight=fc2.weight.clone().requires_grad_(True)), b2, "gelu_tanh")
    with pytest.raises(ValueError, match="fc2: bias of shape"):
        fc_mlp(x, fc1, b1, fc2, b1, "gelu_tanh")
    with pytest.raises(ValueError, match="activation 'relu'"):
        fc_mlp(x, fc1, b1, fc2, b2, "relu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("nf4", [False, True])
def test_siglip_real_size(nf4):
    """Gemma-3's SigLIP-so400m MLP (1152 -> 4304 -> 1152) over two images of 4096 patches, r16."""
    device = torch.device("cuda")
    x, dy = _inputs(8192, 1152, torch.bfloat16, device)
    parts = _mlp(1152, 4304, 16, torch.bfloat16, device, nf4=nf4, lora_dtype=torch.float32)
    _compare(x, parts, "gelu_tanh", dy, torch.bfloat16)
