"""The kernels on a packed budget row: loss and every LoRA gradient as the plain path gives them.

On the CPU the kernels run in Triton's interpreter (``tests/kernels/conftest.py``), so the row is two short samples.
"""

import pytest
import torch
from transformers import set_seed

import vlmtune
from vlmtune.data.budget import pack_budget
from vlmtune.data.collator import Collator
from vlmtune.data.latex_ocr import make_latex_ocr
from vlmtune.data.packing import PackedCollator
from vlmtune.data.spec import DataSpec, load_rows
from vlmtune.kernels.patch import apply_kernels
from vlmtune.testing import init_lora_b

# The tolerances of tests/kernels/test_patch.py: fp32, the kernels reorder reductions only.
LOSS_RTOL, GRAD_RTOL = 1e-5, 1e-4
IMAGE_OPTIONS = {"qwen2_5_vl": {"max_pixels": 56 * 56}, "gemma3": {}}


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("latex_ocr_packed_kernels")
    make_latex_ocr(6, out, seed=1)
    return load_rows(DataSpec(source_type="parquet", path=str(out)), "train")


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# Gemma-3's 256 image tokens per image make its interpreted row slow (~80 s on 2 cores): behind -m slow.
@pytest.mark.parametrize("family_name", ["qwen2_5_vl", pytest.param("gemma3", marks=pytest.mark.slow)])
def test_kernels_on_equal_off_on_a_packed_row(family_name, tiny_qwen, tiny_gemma, rows):
    set_seed(0)
    path = {"qwen2_5_vl": tiny_qwen, "gemma3": tiny_gemma}[family_name]
    model, processor, family = vlmtune.load(path, dtype="float32")
    tuning = vlmtune.TuningConfig(vision="frozen", gradient_checkpointing=False)
    model = vlmtune.apply_tuning(model, family, tuning)
    init_lora_b(model, std=0.05, seed_per_matrix=True)
    model.train()
    collator = Collator(family, processor, model.config, image_options=IMAGE_OPTIONS[family_name])
    encoded = [collator.encode(rows[i], i) for i in range(len(rows))]
    lengths = [len(e.input_ids) for e in encoded]
    image_ids = set(collator.image_token_ids())
    images = [sum(t in image_ids for t in e.input_ids) for e in encoded]
    first = max(pack_budget(lengths, images, budget=2 * max(lengths)), key=len)  # the fullest budget row
    assert len(first) >= 2
    attn = getattr(model.config, "_attn_implementation", None) or "sdpa"
    batch = PackedCollator(collator, attn_implementation=attn).pack([encoded[i] for i in first])

    plain_loss, plain_grads = _loss_and_grads(model, batch)
    patch = apply_kernels(model, family)
    try:
        fused_loss, fused_grads = _loss_and_grads(model, batch)
    finally:
        patch.revert()
    torch.testing.assert_close(fused_loss, plain_loss, rtol=LOSS_RTOL, atol=0)
    assert fused_grads.keys() == plain_grads.keys() and plain_grads
    floor = 1e-6 * max(g.abs().max().item() for g in plain_grads.values())
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=GRAD_RTOL, atol=floor, msg=name)
