"""Every kernel op as a custom op: schema, fake and autograd registrations (``torch.library.opcheck``), and the
compiled path equal to the eager one with no graph break (``backend="aot_eager"``: no C++ code generation)."""

import bitsandbytes.functional as bnbf
import pytest
import torch

from vlmtune.kernels import ops
from vlmtune.kernels.fc_mlp import FC_MLP, fc_mlp
from vlmtune.kernels.fused_linear_ce import FUSED_LINEAR_CE, fused_linear_cross_entropy
from vlmtune.kernels.gated_mlp import GATED_MLP, geglu_tanh, swiglu
from vlmtune.kernels.layer_norm import LAYER_NORM, layer_norm
from vlmtune.kernels.lora_linear import LORA_LINEAR, lora_linear, nf4_args
from vlmtune.kernels.lora_mlp import LORA_GATED_MLP, LoraProjection, lora_gated_mlp
from vlmtune.kernels.rms_norm import RMS_NORM, rms_norm
from vlmtune.kernels.rope import ROPE, apply_rope
from vlmtune.kernels.vision_attention import VARLEN_ATTENTION, varlen_attention


def _leaf(*shape, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device, dtype).requires_grad_(True)


def _nf4(out_f, in_f, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(out_f, in_f, generator=g) / in_f**0.5).to(device, torch.float32)
    return bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True)


def _opcheck(op: ops.KernelOp, args) -> None:
    torch.library.opcheck(op.forward_op, args)


def test_rms_norm_op(device):
    x, w = _leaf(3, 5, 33, device=device), _leaf(33, device=device, seed=1)
    _opcheck(RMS_NORM, (x, w, 1e-6, 1.0, True))
    _opcheck(RMS_NORM, (x.detach().transpose(0, 1), w, 1e-6, 0.0, False))


def test_rope_op(device):
    q, k = _leaf(2, 3, 5, 8, device=device), _leaf(2, 1, 5, 8, device=device, seed=1)
    cos = torch.randn(1, 1, 5, 8, device=device).expand(1, 2, 5, 8)
    _opcheck(ROPE, (q, k, cos, cos.sin(), 0, 0, q.dtype, k.dtype))


def test_gated_mlp_op(device):
    gate, up = _leaf(3, 7, device=device), _leaf(3, 7, device=device, seed=1)
    _opcheck(GATED_MLP, (gate, up, "gelu_tanh"))
    _opcheck(GATED_MLP, (gate, up.detach(), "silu"))


@pytest.mark.parametrize("nf4", [False, True])
def test_lora_linear_op(device, nf4):
    x, a, b = _leaf(3, 5, 64, device=device), _leaf(4, 64, device=device, seed=1), _leaf(24, 4, device=device, seed=2)
    weight, state = _nf4(24, 64, device) if nf4 else (torch.randn(24, 64, device=device), None)
    bias = None if nf4 else _leaf(24, device=device, seed=3)
    _opcheck(LORA_LINEAR, (x, weight, bias, a, b, 0.5, *nf4_args([state])))


def test_lora_gated_mlp_op(device):
    # NF4 gate and down with LoRA, a dense up projection without: every branch of the op's arguments.
    hidden, inter, rank = 64, 128, 4
    x = _leaf(3, 5, hidden, device=device)
    (wg, qg), (wd, qd) = _nf4(inter, hidden, device), _nf4(hidden, inter, device, seed=2)
    wu = torch.randn(inter, hidden, device=device) / hidden**0.5
    ag, bg = _leaf(rank, hidden, device=device, seed=3), _leaf(inter, rank, device=device, seed=4)
    ad, bd = _leaf(rank, inter, device=device, seed=5), _leaf(hidden, rank, device=device, seed=6)
    nf4_tensors, nf4_ints = nf4_args([qg, None, qd])
    args = (x, ag, bg, None, None, ad, bd, [wg, wu, wd], nf4_tensors, nf4_ints, [2.0, 0.0, 0.5], "silu")
    _opcheck(LORA_GATED_MLP, args)


def test_fused_linear_ce_op(device):
    hidden, weight = _leaf(7, 16, device=device), _leaf(11, 16, device=device, seed=1)
    labels = torch.tensor([1, -100, 3, 10, -100, 0, 5], device=device)
    _opcheck(FUSED_LINEAR_CE, (hidden, weight, labels, -100, 30.0, 4, False, "mean", True, True))
    _opcheck(FUSED_LINEAR_CE, (hidden, weight.detach(), labels, -100, None, None, True, "sum", True, False))


def test_layer_norm_op(device):
    x, w, b = _leaf(3, 5, 33, device=device), _leaf(33, device=device, seed=1), _leaf(33, device=device, seed=2)
    _opcheck(LAYER_NORM, (x, w, b, 1e-6))
    _opcheck(LAYER_NORM, (x.detach().transpose(0, 1), w.detach(), None, 1e-5))


def test_fc_mlp_op(device):
    # LoRA over an NF4 fc1 and a dense fc2 with biases, then a dense fc1 without LoRA over an NF4 fc2 with it.
    hidden, inter, rank = 64, 128, 4
    x = _leaf(3, 5, hidden, device=device)
    (w1, q1), (w2, q2) = _nf4(inter, hidden, device), _nf4(hidden, inter, device, seed=2)
    d1, d2 = torch.randn(inter, hidden, device=device) / 8, torch.randn(hidden, inter, device=device) / 11
    a1, b1 = _leaf(rank, hidden, device=device, seed=3), _leaf(inter, rank, device=device, seed=4)
    a2, b2 = _leaf(rank, inter, device=device, seed=5), _leaf(hidden, rank, device=device, seed=6)
    bias1, bias2 = _leaf(inter, device=device, seed=7), _leaf(hidden, device=device, seed=8)
    tensors, ints = nf4_args([q1, None])
    _opcheck(FC_MLP, (x, a1, b1, a2, b2, bias1, bias2, [w1, d2], tensors, ints, [2.0, 0.5], "gelu_tanh"))
    tensors, ints = nf4_args([None, q2])
    _opcheck(FC_MLP, (x, None, None, a2, b2, None, bias2, [d1, w2], tensors, ints, [0.0, 0.5], "quick_gelu"))


def test_varlen_attention_op(device):
    q, k, v = (_leaf(9, 2, 8, device=device, seed=s) for s in range(3))
    _opcheck(VARLEN_ATTENTION, (q, k, v, torch.tensor([0, 4, 4, 9], device=device)))


def _public_calls(device):
    """name -> (function of leaf tensors returning one tensor, its leaves): each public kernel function once."""
    x, w = _leaf(3, 5, 64, device=device), _leaf(64, device=device, seed=1)
    q, k = _leaf(2, 3, 5, 8, device=device, seed=2), _leaf(2, 1, 5, 8, device=device, seed=3)
    cos = torch.randn(1, 5, 8, device=device)
    a, b = _leaf(4, 64, device=device, seed=4), _leaf(24, 4, device=device, seed=5)
    weight, state = _nf4(24, 64, device)
    wd, qd = _nf4(64, 24, device, seed=6)
    ad, bd = _leaf(4, 24, device=device, seed=7), _leaf(64, 4, device=device, seed=8)
    head = _leaf(11, 64, device=device, seed=9)
    labels = torch.tensor([1, -100, 3, 10, -100, 0, 5, 2, 2, 9, 1, -100, 4, 4, 7], device=device)
    v = _leaf(9, 2, 8, device=device, seed=10)
    cu = torch.tensor([0, 4, 9], device=device)

    def mlp(x, a, b, ad, bd):
        gate = LoraProjection(weight, state, a, b, 2.0)
        return lora_gated_mlp(x, gate, LoraProjection(weight, state), LoraProjection(wd, qd, ad, bd, 0.5), "silu")

    w1, q1 = _nf4(128, 64, device, seed=11)
    fc2 = torch.randn(64, 128, device=device) / 11
    bias = _leaf(64, device=device, seed=12)

    def fc(x, a, b, bias):
        return fc_mlp(x, LoraProjection(w1, q1), None, LoraProjection(fc2, None, a, b, 0.5), bias, "silu")

    return {
        "rms_norm": (lambda x, w: rms_norm(x, w, 1e-6, 1.0, "gemma"), (x, w)),
        "layer_norm": (lambda x, w: layer_norm(x, w * 0.5, w, 1e-6), (x, w)),
        "fc_mlp": (fc, (x, _leaf(4, 128, device=device, seed=13), _leaf(64, 4, device=device, seed=14), bias)),
        "rope": (lambda q, k: sum(t.sum() for t in apply_rope(q, k, cos, cos.sin())), (q, k)),
        "gated_mlp": (lambda x, w: geglu_tanh(x, x * w) + swiglu(x, x), (x, w)),
        "lora_linear": (lambda x, a, b: lora_linear(x, weight, state, None, a, b, 0.5), (x, a, b)),
        "lora_gated_mlp": (mlp, (x, a, b, ad, bd)),
        "fused_linear_ce": (
            lambda x, h: fused_linear_cross_entropy(x.reshape(-1, 64), h, labels, softcap=30.0),
            (x, head),
        ),
        "varlen_attention": (lambda q, v: varlen_attention(q, v, v, cu), (v * 0.5, v)),
    }


@pytest.mark.parametrize(
    "name",
    [
        "rms_norm",
        "layer_norm",
        "rope",
        "gated_mlp",
        "lora_linear",
        "lora_gated_mlp",
        "fc_mlp",
        "fused_linear_ce",
        "varlen_attention",
    ],
)
def test_compiled_equals_eager_in_one_graph(device, name):
    """fullgraph=True: a graph break anywhere (a Triton launch traced, a host read) fails the compile."""
    fn, leaves = _public_calls(device)[name]
    leaves = [t.detach().requires_grad_(True) for t in leaves]
    want = fn(*leaves)
    want_grads = torch.autograd.grad(want.sum(), leaves)
    torch._dynamo.reset()
    got = torch.compile(fn, backend="aot_eager", fullgraph=True)(*leaves)
    got_grads = torch.autograd.grad(got.sum(), leaves)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
