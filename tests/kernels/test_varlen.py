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
from tests.data.test_packing import MINICPMV4_6_MODE, TEXT_ROW, assert_packed_matches_padded, tuned_model
from tests.kernels.test_packed_batches import IMAGE_OPTIONS, _loss_and_grads
from vlmtune.data.budget import pack_budget
from vlmtune.data.collator import Collator
from vlmtune.data.latex_ocr import make_latex_ocr
from vlmtune.data.packing import PackedCollator
from vlmtune.data.positions import (
    packed_attention_masks,
    packed_image_blocks,
    packed_row_keywords,
    packed_sequence_ids,
    text_positions,
)
from vlmtune.data.spec import DataSpec, load_rows
from vlmtune.kernels.hf import varlen
from vlmtune.kernels.hf.rope import packed_attention
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
    assert varlen.varlen_attention(module, one, one, one, None, fallback=fallback, sliding_window=1, **flash)[0] == (
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


def test_the_reference_reads_grouped_heads_as_the_kernel_does():
    q, k, v = torch.randn(6, 4, 8), torch.randn(6, 2, 8), torch.randn(6, 2, 8)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    got = varlen.reference_varlen(q, k, v, cu, cu, 4, 4, 0.5, True)
    want = varlen.reference_varlen(
        q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1), cu, cu, 4, 4, 0.5, True
    )
    torch.testing.assert_close(got, want)
    # Query heads 0 and 1 read key/value head 0: the second sample's head 1 as plain SDPA on head 0.
    head = torch.nn.functional.scaled_dot_product_attention(
        q[2:, 1][None], k[2:, 0][None], v[2:, 0][None], is_causal=True, scale=0.5
    )
    torch.testing.assert_close(got[2:, 1], head[0])


# Three samples of 7, 5 and 9 tokens: an image at 2-4 in the first, none in the second, two in the third.
GEMMA_LENGTHS = [7, 5, 9]
GEMMA_IMAGES = torch.tensor([0, 0, 1, 1, 1, 0, 0] + [0] * 5 + [0, 1, 1, 1, 0, 1, 1, 1, 0], dtype=torch.bool)


def _gemma_mask(window=None):
    kind = "full_attention" if window is None else "sliding_attention"
    ids, positions = packed_sequence_ids(GEMMA_LENGTHS), text_positions(GEMMA_LENGTHS)
    return packed_attention_masks(ids, positions, GEMMA_IMAGES, window, "sdpa")[kind]


def _gemma_qkv(heads=4, kv_heads=2, dim=8):
    torch.manual_seed(0)
    q = torch.randn(1, heads, sum(GEMMA_LENGTHS), dim)
    k, v = (torch.randn(1, kv_heads, sum(GEMMA_LENGTHS), dim) for _ in range(2))
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = heads // kv_heads, True
    return module, q, k, v


@pytest.mark.parametrize("window", [None, 9, 16])  # a window no shorter than the longest sample changes nothing
def test_image_blocks_attend_as_gemma3s_mask(window, monkeypatch):
    calls = []

    def counted(*args):
        calls.append(args[-1])  # causal or not
        return varlen.reference_varlen(*args)

    monkeypatch.setattr(varlen, "KERNEL", counted)
    module, q, k, v = _gemma_qkv()
    blocks = packed_image_blocks(GEMMA_LENGTHS, GEMMA_IMAGES)
    keywords = {**packed_row_keywords(GEMMA_LENGTHS), varlen.IMAGE_BLOCKS: blocks, "sliding_window": window}
    got, _ = varlen.varlen_attention(module, q, k, v, None, fallback=None, scaling=0.3, **keywords)
    want, _ = sdpa_attention_forward(module, q, k, v, _gemma_mask(), scaling=0.3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert calls == [True, False]  # the samples causally, then the image blocks whole


def test_a_row_without_a_mask_gets_its_mask_built_where_varlen_cannot_run(monkeypatch):
    # A window shorter than a sample (and the CPU without a kernel): the configured function, with the mask the
    # host would have built, made once per row and window.
    module, q, k, v = _gemma_qkv()
    blocks = packed_image_blocks(GEMMA_LENGTHS, GEMMA_IMAGES)
    keywords = {**packed_row_keywords(GEMMA_LENGTHS), varlen.IMAGE_BLOCKS: blocks}
    masks = []

    def fallback(module, q, k, v, mask, **kwargs):
        masks.append(mask)
        assert varlen.IMAGE_BLOCKS not in kwargs
        return sdpa_attention_forward(module, q, k, v, mask, **kwargs)

    for window in (4, 4, None):
        monkeypatch.setattr(varlen, "KERNEL", varlen.reference_varlen if window else None)
        got, _ = varlen.varlen_attention(
            module, q, k, v, None, fallback=fallback, scaling=0.3, sliding_window=window, **keywords
        )
        want, _ = sdpa_attention_forward(module, q, k, v, _gemma_mask(window), scaling=0.3)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(masks[0], _gemma_mask(4)) and masks[1] is masks[0]  # the row's mask, built once
    assert torch.equal(masks[2], _gemma_mask())


def test_image_blocks_by_hand():
    blocks = packed_image_blocks(GEMMA_LENGTHS, GEMMA_IMAGES)
    assert blocks["queries"].tolist() == [2, 3, 4, 13, 14, 15, 17, 18, 19]
    # Each image's keys: its sample from the start up to the image's end.
    assert blocks["keys"].tolist() == [0, 1, 2, 3, 4, *range(12, 16), *range(12, 20)]
    assert blocks["cu_q"].tolist() == [0, 3, 6, 9] and blocks["cu_k"].tolist() == [0, 5, 9, 17]
    assert (blocks["max_q"], blocks["max_k"]) == (3, 8)
    none = packed_image_blocks([3], torch.zeros(3, dtype=torch.bool))
    assert none["queries"].numel() == 0 and none["cu_q"].tolist() == [0] and none["max_q"] == 0


def _kernel_calls(kernel: str, monkeypatch) -> list[bool]:
    """``"reference varlen"``: the reference kernel, each call's causality logged in the returned list; else no
    kernel (the CPU's mask path)."""
    calls = []

    def counted(*args):
        calls.append(args[-1])
        return varlen.reference_varlen(*args)

    monkeypatch.setattr(varlen, "KERNEL", counted if kernel == "reference varlen" else None)
    return calls


@pytest.mark.parametrize("kernel", ["reference varlen", "masks built on the device"])
def test_gemma3_rows_without_masks_match_padded_samples(kernel, tiny_gemma, latex_data, monkeypatch):
    calls = _kernel_calls(kernel, monkeypatch)
    rows = vlmtune.load_rows("latex_ocr", split="train", path=latex_data)
    model, collator = tuned_model(tiny_gemma, "sdpa")
    assert packed_attention(model, collator.family) == "sdpa"
    patch = apply_kernels(model, collator.family, ops=("rope",))  # the language attention's forward
    try:
        assert packed_attention(model, collator.family) == "varlen"
        assert packed_attention(model, collator.family, compiled=True) == "sdpa"
        chosen = [collator.encode(TEXT_ROW, 99), collator.encode(rows[0], 0), collator.encode(rows[1], 1)]
        packed = PackedCollator(collator, attn_implementation="varlen").pack(chosen)
        assert packed["attention_mask"] == {"sliding_attention": None, "full_attention": None}
        assert packed[varlen.IMAGE_BLOCKS]["cu_q"].numel() == 3  # two images
        assert_packed_matches_padded(model, collator, chosen, "varlen")
    finally:
        patch.revert()
    longest, window = max(len(e.input_ids) for e in chosen), model.config.get_text_config().sliding_window
    assert longest > window  # the tiny model's sliding layer keeps the (device-built) mask
    # The full-attention layer ran per sample: the samples, then the images, once for the packed row.
    assert calls == ([True, False] if kernel == "reference varlen" else [])


QWEN_CASES = [
    ("tiny_qwen", "none", "reference varlen"),
    ("tiny_qwen", "none", "masks built on the device"),
    ("tiny_qwen2_vl", "none", "reference varlen"),
    ("tiny_qwen3_vl", "empty", "reference varlen"),
    ("tiny_qwen3_vl", "empty", "masks built on the device"),
]


@pytest.mark.parametrize("fixture, mask, kernel", QWEN_CASES)
def test_qwen_rows_for_varlen_match_padded_samples(fixture, mask, kernel, request, latex_data, monkeypatch):
    # Qwen2-VL and Qwen2.5-VL rows built for varlen carry no mask (their text model takes a dict of none); Qwen3-VL's
    # a 4-D mask of no size, which its text model passes through instead of building the row's (T, T) mask.
    calls = _kernel_calls(kernel, monkeypatch)
    rows = vlmtune.load_rows("latex_ocr", split="train", path=latex_data)
    model, collator = tuned_model(request.getfixturevalue(fixture), "sdpa")
    patch = apply_kernels(model, collator.family, ops=("rope",))
    try:
        assert packed_attention(model, collator.family) == "varlen"
        chosen = [collator.encode(TEXT_ROW, 99), collator.encode(rows[0], 0), collator.encode(rows[1], 1)]
        packed = PackedCollator(collator, attn_implementation="varlen").pack(chosen)
        if mask == "none":
            assert packed["attention_mask"] == {"full_attention": None}
        else:
            assert packed["attention_mask"].shape == (1, 1, 0, 0)
        assert packed[varlen.IMAGE_BLOCKS]["max_q"] == 0  # no bidirectional blocks
        assert_packed_matches_padded(model, collator, chosen, "varlen")
    finally:
        patch.revert()
    layers = model.config.get_text_config().num_hidden_layers
    assert calls == ([True] * layers if kernel == "reference varlen" else [])  # the packed forward, per sample


@pytest.mark.gpu
@pytest.mark.parametrize("dim, scale", [(256, 256**-0.5), (128, 0.1)])  # Gemma-3-4B's heads; another scale
def test_flash_image_blocks_match_the_mask_on_cuda(dim, scale):
    torch.manual_seed(0)
    lengths = [300, 41, 517, 97]
    images = torch.zeros(sum(lengths), dtype=torch.bool)
    images[5:261] = True  # a 256-token image after the first sample's prompt
    images[341 + 10 : 341 + 266] = images[341 + 270 : 341 + 300] = True  # two in the third sample
    q = torch.randn(1, 8, sum(lengths), dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, 4, sum(lengths), dim, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "kv")
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 2, True
    cuda = {
        key: value.cuda() if torch.is_tensor(value) else value for key, value in packed_row_keywords(lengths).items()
    }
    blocks = {
        key: value.cuda() if torch.is_tensor(value) else value
        for key, value in packed_image_blocks(lengths, images).items()
    }
    assert varlen.runs_flash(q)
    got, _ = varlen.varlen_attention(
        module, q, k, v, None, fallback=None, scaling=scale, **cuda, packed_image_blocks=blocks
    )
    mask = packed_attention_masks(packed_sequence_ids(lengths), text_positions(lengths), images, None, "sdpa")
    want, _ = sdpa_attention_forward(module, q, k, v, mask["full_attention"].cuda(), scaling=scale)
    grads = torch.autograd.grad(got.float().square().sum(), (q, k, v))
    want_grads = torch.autograd.grad(want.float().square().sum(), (q, k, v))
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    for grad, want_grad in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(grad, want_grad, rtol=5e-2, atol=5e-2 * want_grad.abs().max().item())


def test_a_compiled_layer_goes_straight_to_the_configured_function(monkeypatch):
    # Inside a trace nothing of the host-side path runs (torch 2.11's dynamo failed on its version check).
    def unreachable(*args, **kwargs):
        raise AssertionError("traced the varlen path")

    monkeypatch.setattr(varlen, "runs_flash", unreachable)
    monkeypatch.setattr(varlen, "row_mask", unreachable)
    module, q, k, v = _gemma_qkv()
    keywords = packed_row_keywords(GEMMA_LENGTHS)

    @torch.compile(backend="eager", fullgraph=True)
    def attend(q, k, v, mask):
        return varlen.varlen_attention(module, q, k, v, mask, fallback=sdpa_attention_forward, scaling=0.3, **keywords)[
            0
        ]

    got = attend(q, k, v, _gemma_mask())
    want, _ = sdpa_attention_forward(module, q, k, v, _gemma_mask(), scaling=0.3)
    torch.testing.assert_close(got, want)
