import pytest
import torch

import vlmtune.kernels.fused_linear_ce as ce_module
from vlmtune.kernels.fused_linear_ce import fused_linear_cross_entropy, fused_linear_cross_entropy_reference

# Logits come from the same GEMM in the same dtype on both sides, and both compute the loss in fp32, so the
# loss differs only by summation order (fp32: ~1e-6 relative). Gradients are formed in fp32 and rounded once
# to the activation dtype on both sides before the GEMMs (bf16 2^-8, fp16 2^-11); the kernel's weight gradient
# is also summed across chunks in that dtype, a few ulps more. softcap's tanh is computed from exp, which
# is within ~1e-7 absolute of torch.tanh.
TOLERANCES = {
    torch.float32: (1e-5, 1e-4),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (2e-3, 2e-3),
}
GEMMA_SOFTCAP = 30.0


def _inputs(n, hidden, vocab, dtype, device, ignored=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g).to(device, dtype)
    # Logits of std ~ 20, so Gemma's cap at 30 bends a good share of them.
    w = (20 * torch.randn(vocab, hidden, generator=g) / hidden**0.5).to(device, dtype)
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[torch.rand(n, generator=g) < ignored] = -100
    return h, w, labels.to(device)


def _run(fn, h, w, labels, weight_grad=True, **kwargs):
    h = h.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(weight_grad)
    loss = fn(h, w, labels, **kwargs)
    (2.5 * loss).backward()  # a grad_output other than 1 checks that backward scales the stored gradients
    return [loss, h.grad] + ([w.grad] if weight_grad else [])


def _compare(got, want, dtype):
    atol, rtol = TOLERANCES[dtype]
    assert len(got) == len(want)
    for name, a, b in zip(("loss", "dhidden", "dweight"), got, want, strict=False):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("n", [1, 7, 33])
@pytest.mark.parametrize("hidden, vocab", [(48, 100), (96, 257)])
@pytest.mark.parametrize("softcap", [None, GEMMA_SOFTCAP])
def test_fused_ce_fp32(device, n, hidden, vocab, softcap):
    h, w, labels = _inputs(n, hidden, vocab, torch.float32, device)
    labels[0] = 3  # at least one supervised row
    kwargs = {"softcap": softcap, "chunk_size": 4}
    got = _run(fused_linear_cross_entropy, h, w, labels, **kwargs)
    want = _run(fused_linear_cross_entropy_reference, h, w, labels, **kwargs)
    _compare(got, want, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("softcap", [None, GEMMA_SOFTCAP])
def test_fused_ce_half(device, dtype, softcap):
    h, w, labels = _inputs(33, 96, 160, dtype, device)
    got = _run(fused_linear_cross_entropy, h, w, labels, softcap=softcap)
    want = _run(fused_linear_cross_entropy_reference, h, w, labels, softcap=softcap)
    _compare(got, want, dtype)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_vocab_larger_than_one_block_frozen_weight(device, monkeypatch, reduction):
    """The online logsumexp across vocab blocks; a frozen lm_head (the LoRA case) gets no gradient."""
    monkeypatch.setattr(ce_module, "_MAX_BLOCK_V", 64)
    h, w, labels = _inputs(7, 48, 300, torch.float32, device)
    labels[0] = 299  # the target in the ragged last block
    kwargs = {"softcap": GEMMA_SOFTCAP, "reduction": reduction, "chunk_size": 3}
    got = _run(fused_linear_cross_entropy, h, w, labels, weight_grad=False, **kwargs)
    want = _run(fused_linear_cross_entropy_reference, h, w, labels, weight_grad=False, **kwargs)
    _compare(got, want, torch.float32)


@pytest.mark.parametrize("softcap", [None, GEMMA_SOFTCAP])
def test_return_logits(device, softcap):
    h, w, labels = _inputs(7, 48, 100, torch.float32, device)
    labels[0] = 1
    loss, logits = fused_linear_cross_entropy(h, w, labels, softcap=softcap, return_logits=True, chunk_size=2)
    want_loss, want_logits = fused_linear_cross_entropy_reference(h, w, labels, softcap=softcap, return_logits=True)
    atol, rtol = TOLERANCES[torch.float32]
    torch.testing.assert_close(loss, want_loss, atol=atol, rtol=rtol)
    torch.testing.assert_close(logits, want_logits, atol=atol, rtol=rtol)


def test_no_supervised_rows_gives_zero_loss_and_zero_grads(device):
    h, w, labels = _inputs(5, 48, 100, torch.float32, device, ignored=1.0)
    got = _run(fused_linear_cross_entropy, h, w, labels)
    assert got[0].item() == 0.0 and not got[1].any() and not got[2].any()


def test_bad_arguments_raise(device):
    h, w, labels = _inputs(3, 48, 100, torch.float32, device)
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_cross_entropy(h, w, labels, reduction="none")
    with pytest.raises(ValueError, match="lm_head_weight is"):
        fused_linear_cross_entropy(h, w.double(), labels)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "hidden, vocab, softcap", [(3584, 152064, None), (2560, 262208, GEMMA_SOFTCAP)], ids=["qwen", "gemma"]
)
def test_fused_ce_real_size(hidden, vocab, softcap):
    h, w, labels = _inputs(2048, hidden, vocab, torch.bfloat16, torch.device("cuda"), ignored=0.5)
    got = _run(fused_linear_cross_entropy, h, w, labels, weight_grad=False, softcap=softcap)
    want = _run(fused_linear_cross_entropy_reference, h, w, labels, weight_grad=False, softcap=softcap)
    _compare(got, want, torch.bfloat16)
