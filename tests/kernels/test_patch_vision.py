"""The vision ops of apply_kernels (``layer_norm``, ``fc_mlp``) on the tiny models: kernels on ≡ off for the vision
tower's loss and LoRA gradients, exactly which modules change, and SigLIP's attention staying on a mask-free SDPA.

Vision LoRA under a frozen language tower (the language ops are test_patch.py's): with LoRA on the vision MLPs
(the fused node over two LoRA linears) on every family with such a tower, and on the attention only (fc1 / fc2
frozen: the fused node without LoRA still passes gradients back). Tolerances as in test_patch.py (fp32).
"""

import importlib

import pytest
import torch
from transformers import set_seed

import vlmtune
from vlmtune.data.collator import Collator
from vlmtune.data.latex_ocr import make_latex_ocr
from vlmtune.data.spec import DataSpec, load_rows
from vlmtune.kernels.patch import apply_kernels
from vlmtune.testing import init_lora_b

# The module: vlmtune.kernels re-exports its function under the same name.
fc_mlp_kernels = importlib.import_module("vlmtune.kernels.fc_mlp")
LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-4
VISION_OPS = ("lora_linear", "layer_norm", "fc_mlp")
# Per tiny model: (encoder layers' LayerNorms + the tower's other LayerNorms, vision MLPs). Gemma-3 and Qwen: two
# per layer and the post-norm (Qwen2-VL's merger ln_q; Qwen3-VL's merger norm); MiniCPM-V: the post-norm and
# the resampler's three.
EXPECTED = {"gemma3": (2 * 2 + 1, 2), "minicpmv": (2 * 2 + 4, 2), "qwen2_vl": (2 * 2 + 1, 2)}


@pytest.fixture(scope="module")
def latex_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("latex_ocr_vision")
    make_latex_ocr(4, out, seed=0)
    return load_rows(DataSpec(source_type="parquet", path=str(out)), "train")


def _tuned(path, **tuning):
    set_seed(0)
    model, processor, family = vlmtune.load(path, dtype="float32")
    model = vlmtune.apply_tuning(model, family, vlmtune.TuningConfig(**tuning))
    init_lora_b(model, std=0.05, seed_per_matrix=True)  # every LoRA factor then gets a gradient to check
    return model.train(), processor, family


def _batch(model, processor, family, rows):
    batch = Collator(family, processor, model.config)([{"index": i, "row": rows[i]} for i in range(2)])
    device = next(p.device for p in model.parameters())
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    params = model.get_base_model().named_parameters()  # names as family.tower_of reads them
    return loss.detach(), {n: p.grad.detach().clone() for n, p in params if p.requires_grad}


def _count_fused(monkeypatch) -> list:
    """One entry per backward of the fused vision MLP."""
    calls = []
    real = fc_mlp_kernels.bias_act_backward
    monkeypatch.setattr(fc_mlp_kernels, "bias_act_backward", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _check(model, processor, family, rows, monkeypatch):
    batch = _batch(model, processor, family, rows)
    fused = _count_fused(monkeypatch)
    plain_loss, plain_grads = _loss_and_grads(model, batch)
    patch = apply_kernels(model, family, VISION_OPS)
    loss, grads = _loss_and_grads(model, batch)
    patch.revert()
    assert not any("_vlmtune_kernel" in m.__dict__ for m in model.modules())
    torch.testing.assert_close(loss, plain_loss, rtol=LOSS_RTOL, atol=0)
    assert grads.keys() == plain_grads.keys() and any(family.tower_of(n) == "vision" for n in grads)
    floor = 1e-6 * max(g.abs().max().item() for g in plain_grads.values())
    for name in plain_grads:
        torch.testing.assert_close(grads[name], plain_grads[name], rtol=GRAD_RTOL, atol=floor, msg=name)
    return patch, fused


@pytest.mark.parametrize("name", ["gemma3", "minicpmv", "qwen2_vl"])
def test_vision_kernels_on_equal_off(name, tiny_checkpoint, latex_rows, monkeypatch):
    model, processor, family = _tuned(tiny_checkpoint(name), vision="lora", language="frozen")
    patch, fused = _check(model, processor, family, latex_rows, monkeypatch)
    n_norms, n_mlps = EXPECTED[name]
    assert len(patch.patched["layer_norm"]) == n_norms and len(patch.patched["fc_mlp"]) == n_mlps
    assert len(fused) == n_mlps  # both linears LoRA layers the lora_linear op patched: every MLP ran fused
    assert all(family.tower_of(n) in ("vision", "projector") for n in patch.patched["layer_norm"])
    assert all(family.tower_of(n) == "vision" and n.endswith(".mlp") for n in patch.patched["fc_mlp"])


def test_frozen_vision_mlps_pass_gradients_to_the_attention_lora(tiny_gemma, latex_rows, monkeypatch):
    model, processor, family = _tuned(tiny_gemma, vision="lora", language="frozen", mlp=False)
    _, fused = _check(model, processor, family, latex_rows, monkeypatch)
    assert len(fused) == EXPECTED["gemma3"][1]


def test_qwen2_5_vl_vision_tower_has_nothing_for_these_ops(tiny_qwen):
    """Qwen2.5-VL's ViT (RMSNorm, gated SiLU MLP with biases) shares Qwen2-VL's descriptor: the ops find nothing."""
    model, _, family = vlmtune.load(tiny_qwen, dtype="float32")
    patch = apply_kernels(model, family, ("layer_norm", "fc_mlp"))
    assert patch.patched == {"layer_norm": [], "fc_mlp": []}
    patch.revert()


def test_siglip_attention_runs_sdpa_without_a_mask(tiny_gemma, monkeypatch):
    """Gemma-3's SigLIP attention reaches SDPA with no mask and is_causal=False, so flash / memory-efficient
    kernels may take it (see vlmtune.kernels.vision_attention for the backend at head dim 72)."""
    model, processor, family = vlmtune.load(tiny_gemma, dtype="float32")
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        seen.append((query.shape[-1], attn_mask is None, is_causal, dropout_p))
        return real(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    vision = model.model.vision_tower
    pixels = torch.zeros(2, 3, model.config.vision_config.image_size, model.config.vision_config.image_size)
    with torch.no_grad():
        vision(pixel_values=pixels.to(model.device))
    head_dim = model.config.vision_config.hidden_size // model.config.vision_config.num_attention_heads
    assert seen == [(head_dim, True, False, 0.0)] * model.config.vision_config.num_hidden_layers
