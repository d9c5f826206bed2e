"""benchmarks/train_step/specs.py: the real-size models match the released configs; the configurations exist."""

import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def specs(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))  # benchmarks is not installed: it imports from the repository root
    return importlib.import_module("benchmarks.train_step.specs")


def test_real_size_qwen2_5_vl_3b_matches_the_release(specs):
    data = specs
    spec = data.MODELS["qwen2_5_vl-3b"]
    # Qwen/Qwen2.5-VL-3B-Instruct config.json
    assert {k: spec.text[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads")} == {
        "hidden_size": 2048,
        "num_hidden_layers": 36,
        "num_attention_heads": 16,
    }
    assert (spec.text["num_key_value_heads"], spec.text["intermediate_size"], spec.text["vocab_size"]) == (
        2,
        11008,
        151936,
    )
    assert spec.top["tie_word_embeddings"] is True
    assert (spec.vision["hidden_size"], spec.vision["depth"], spec.vision["out_hidden_size"]) == (1280, 32, 2048)
    assert {"hf_bf16", "vlmtune_bf16", "vlmtune_bf16_kernels"} <= set(data.CONFIGS)


def test_real_size_minicpmv_specs_match_the_releases(specs):
    data = specs
    old, new = data.MODELS["minicpmv2_6-8b"], data.MODELS["minicpmv4_6-1.3b"]
    # openbmb/MiniCPM-V-2_6: Qwen2-7B + SigLIP-400M, 64 queries per view, the last vision layer kept.
    assert (old.text["hidden_size"], old.text["num_hidden_layers"], old.text["num_key_value_heads"]) == (3584, 28, 4)
    assert (old.text["vocab_size"], old.top["query_num"], old.top["drop_vision_last_layer"]) == (151666, 64, False)
    # openbmb/MiniCPM-V-4.6: Qwen3.5-0.8B (3 DeltaNet layers to 1 full-attention layer) + SigLIP2-400M.
    assert (new.text["hidden_size"], new.text["num_hidden_layers"], new.text["head_dim"]) == (1024, 24, 256)
    assert new.text["layer_types"][:4] == ["linear_attention"] * 3 + ["full_attention"]
    assert new.top["insert_layer_id"] == 6 and new.top["downsample_mode"] == "16x"
    for spec in (old, new):
        assert (spec.vision["hidden_size"], spec.vision["num_hidden_layers"], spec.vision["patch_size"]) == (
            1152,
            27,
            14,
        )
    assert set(old.unsupported) == {"hf", "unsloth"} and not new.unsupported
    assert {"vlmtune_qlora_kernels_packed", "vlmtune_bf16_packed"} <= set(data.CONFIGS)
