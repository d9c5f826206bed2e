"""Packed rows through the per-sample (varlen) attention path: the attention of the dense block-diagonal mask.

The flash kernel needs CUDA; on the CPU :func:`reference_varlen` (its contract, per-sample SDPA) stands in, so
the layout, grouped-query heads, scale and causality of :func:`varlen_attention` are what these tests check.
"""

import functools

import pytest
import torch
from transformers import set_seed
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import vlmtune
from tests.data.test_packing import MINICPMV4_6_MODE
from tests.kernels.test_packed_batches import IMAGE_OPTIONS, _loss_and_grads
from vlmtune.data.budget import pack_budget
from vlmtune.data.collator import Collator
from vlmtune.data.latex_ocr import make_latex_ocr
from vlmtune.data.packing import PackedCollator
from vlmtune.data.positions import packed_row_keywords
from vlmtune.data.spec import DataSpec, load_rows
from vlmtune.kernels.hf import varlen
from vlmtune.kernels.patch import apply_kernels
from vlmtune.testing import init_lora_b


def _block_causal_mask(lengths):
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    causal = torch.ones(len(ids), len(ids), dtype=torch.bool).tril()
    return (causal & (ids[:, None] == ids[None, :]))[None, None]


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])
def test_varlen_equals_the_block_diagonal_mask(heads, kv_heads, monkeypatch):
    monkeypatch.setattr(varlen, "KERNEL", varlen.reference_varlen)
    lengths, dim = [5, 1, 9, 3], 8
    torch.manual_seed(0)
    q = torch.randn(1, heads, sum(lengths), dim)
    k, v = (torch.randn(1, kv_heads, sum(lengths), dim) for _ in range(2))
    module = torch.nn.Module()
    module.num_key_value_groups = heads // kv_heads
    module.is_causal = True
    flash = packed_row_keywords(lengths)
    got, _ = varlen.varlen_attention(module, q, k, v, None, fallback=None, scaling=0.3, **flash)
    want, _ = sdpa_attention_forward(module, q, k, v, _block_causal_mask(lengths), scaling=0.3)
    assert got.shape == (1, sum(lengths), heads, dim)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_anything_but_a_packed_row_goes_to_the_configured_function(monkeypatch):
    monkeypatch.setattr(varlen, "KERNEL", varlen.reference_varlen)
    calls = []

    def fallback(module, q, k, v, mask, **kwargs):
        calls.append(sorted(kwargs))
        return "configured", None

    q = torch.randn(2, 2, 4, 8)
    module = torch.nn.Module()
    assert varlen.varlen_attention(module, q, q, q, None, fallback=fallback)[0] == "configured"  # no boundaries
    flash = packed_row_keywords([2, 2])
    assert varlen.varlen_attention(module, q, q, q, None, fallback=fallback, **flash)[0] == "configured"  # batch 2
    one = q[:1]
    assert varlen.varlen_attention(module, one, one, one, None, fallback=fallback, sliding_window=2, **flash)[0] == (
        "configured"
    )
    assert len(calls) == 3 and "cu_seq_lens_q" in calls[1]


def test_the_cpu_takes_the_mask_path():
    q = torch.randn(1, 2, 4, 8)
    assert varlen.KERNEL is None and not varlen.runs_flash(q)


@pytest.mark.parametrize("fixture", ["tiny_qwen", "tiny_qwen3_vl", "tiny_minicpmv4_6"])
def test_kernels_with_varlen_equal_the_plain_masked_path(fixture, request, tmp_path, monkeypatch):
    calls = []

    def counted(*args):
        calls.append(args[3].tolist())
        return varlen.reference_varlen(*args)

    monkeypatch.setattr(varlen, "KERNEL", counted)
    set_seed(0)
    model, processor, family = vlmtune.load(request.getfixturevalue(fixture), dtype="float32")
    tuning = vlmtune.TuningConfig(vision="frozen", gradient_checkpointing=True)
    model = vlmtune.apply_tuning(model, family, tuning)
    init_lora_b(model, std=0.05, seed_per_matrix=True)
    model.train()
    make_latex_ocr(6, tmp_path, seed=1)
    rows = load_rows(DataSpec(source_type="parquet", path=str(tmp_path)), "train")
    options = {"downsample_mode": MINICPMV4_6_MODE} if family.name == "minicpmv4_6" else IMAGE_OPTIONS["qwen2_5_vl"]
    collator = Collator(family, processor, model.config, image_options=options)
    encoded = [collator.encode(rows[i], i) for i in range(len(rows))]
    lengths = [len(e.input_ids) for e in encoded]
    image_ids = set(collator.image_token_ids())
    images = [sum(t in image_ids for t in e.input_ids) for e in encoded]
    chosen = max(pack_budget(lengths, images, budget=3 * max(lengths)), key=len)
    assert len(chosen) >= 3
    batch = PackedCollator(collator).pack([encoded[i] for i in chosen])
    bounds = batch["cu_seq_lens_q"].tolist()
    assert bounds == [0, *torch.tensor([lengths[i] for i in chosen]).cumsum(0).tolist()]

    plain_loss, plain_grads = _loss_and_grads(model, batch)
    assert not calls
    patch = apply_kernels(model, family)
    try:
        fused_loss, fused_grads = _loss_and_grads(model, batch)
    finally:
        patch.revert()
    text = model.config.get_text_config()
    types = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
    attention_layers = sum(t == "full_attention" for t in types)  # MiniCPM-V 4.6: the others are DeltaNet layers
    # Every attention layer ran per sample, in the forward and again in the checkpointed recomputation.
    assert attention_layers and len(calls) == 2 * attention_layers and all(c == bounds for c in calls)
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-5, atol=0)
    floor = 1e-6 * max(g.abs().max().item() for g in plain_grads.values())
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=floor, msg=name)


def test_the_proxy_keeps_the_registry_readable():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    proxy = varlen.AttentionFunctions(ALL_ATTENTION_FUNCTIONS)
    function = proxy.get_interface("sdpa", None)
    assert isinstance(function, functools.partial) and function.keywords["fallback"] is sdpa_attention_forward
    assert proxy["sdpa"].keywords["fallback"] is sdpa_attention_forward
    assert "sdpa" in proxy.valid_keys()


@pytest.mark.parametrize(
    "version, scale, keywords",
    [
        ("2.11.0+cu130", 0.3, {"window_size": (-1, 0), "scale": 0.3}),
        ("2.10.1", 64**-0.5, {"is_causal": True}),
        ("2.10.1", 0.3, None),  # 2.10's kernel has no scale argument: the mask path serves other scales
    ],
)
def test_the_kernel_is_asked_for_causality_as_its_torch_takes_it(version, scale, keywords, monkeypatch):
    monkeypatch.setattr(torch, "__version__", version)
    assert varlen._flash_keywords(scale, 64) == keywords
