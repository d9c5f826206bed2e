"""Useful FLOPs of a step, hand-derived on a toy spec (see benchmarks/train_step/flops.py for what counts)."""

import pytest

from benchmarks.train_step.flops import step_flops, utilisation
from benchmarks.train_step.specs import MODELS, ModelSpec

TOY = ModelSpec(
    family="gemma3",
    text=dict(hidden_size=4, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
              head_dim=2, vocab_size=10),
    vision=dict(hidden_size=4, intermediate_size=6, patch_size=2, num_hidden_layers=1),
    image_size=(4, 4),
)  # fmt: skip


def test_step_flops_by_hand():
    flops = step_flops(TOY, tokens=6, samples=2, images=2, supervised=3)
    # Language: q, o 2*4*2*2 + k, v 2*4*1*2 + MLP 3*4*8 = 144 weights a token: 2*144*6 = 1728 forward;
    # causal attention 2 * 3 * 3 * (2 heads * 2) * 2 sequences = 144; gradients: linear x1, attention x2.
    assert flops["language"] == 2 * 1728 + 3 * 144
    assert flops["head"] == 2 * (2 * 4 * 10 * 3)  # the LM head on the 3 supervised tokens, forward + gradient
    # Vision: 4 patches an image; 4*16 + 2*4*6 = 112 weights a patch: 2*112*4*2 images = 1792; full attention
    # 4 * 4 * 4 * 4 (width) * 2 images = 512.
    assert flops["vision"] == 2 * 1792 + 3 * 512
    assert flops["total"] == flops["language"] + flops["head"] + flops["vision"] == 9488


def test_utilisation_of_a_record():
    record = {
        "meta": {
            "model": "gemma3-4b",
            "data": {
                "tokens_per_batch": [3264],
                "batch_size": 8,
                "images_per_batch": [8],
                "supervised_tokens_per_batch": [1024],
            },
        },
        "results": [{"config": "a", "step_s": 1.0}, {"config": "failed", "status": "n/a"}],
    }
    (row,) = utilisation(record, peak=1e15)
    expected = step_flops(MODELS["gemma3-4b"], tokens=3264, samples=8, images=8, supervised=1024)["total"]
    assert row["config"] == "a" and row["useful_tflop"] == pytest.approx(expected / 1e12)
    assert row["utilisation"] == pytest.approx(expected / 1e15)
    assert 140 < row["useful_tflop"] < 160  # Gemma-3-4B, batch 8: the vision tower is most of it
    assert row["vision_tflop"] > 2 * row["language_tflop"]
