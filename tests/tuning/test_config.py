"""TuningConfig: the flag vocabularies users bring (Unsloth, MiniCPM-V's finetune.py) and validation."""

import pytest

import vlmtune
from vlmtune.tiny import BUILDERS
from vlmtune.tuning import TuningConfig, lora_target_names

FAMILIES = sorted(BUILDERS)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({}, dict(vision="lora", language="lora", attention=True, mlp=True)),
        (dict(finetune_vision_layers=False), dict(vision="frozen", language="lora", attention=True, mlp=True)),
        (dict(finetune_language_layers=False), dict(vision="lora", language="frozen", attention=True, mlp=True)),
        (dict(finetune_mlp_modules=False), dict(vision="lora", language="lora", attention=True, mlp=False)),
        (dict(finetune_attention_modules=False), dict(vision="lora", language="lora", attention=False, mlp=True)),
    ],
)
def test_unsloth_flags_map_onto_tower_modes(flags, expected):
    config = TuningConfig.from_unsloth(**flags, r=8, lora_alpha=32, lora_dropout=0.05)
    assert {k: getattr(config, k) for k in expected} == expected
    assert (config.r, config.alpha, config.dropout, config.projector) == (8, 32, 0.05, "frozen")


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (dict(tune_vision=True, use_lora=True), dict(vision="full", projector="full", language="lora")),
        (dict(tune_vision=False, use_lora=True), dict(vision="frozen", projector="full", language="lora")),
    ],
)
def test_minicpmv_flags_map_onto_tower_modes(flags, expected):
    config = TuningConfig.from_minicpmv(**flags)
    assert {k: getattr(config, k) for k in expected} == expected


def test_minicpmv_full_finetuning_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="use_lora=True"):
        TuningConfig.from_minicpmv(use_lora=False, tune_llm=True)


def test_both_vocabularies_select_the_same_modules(tiny_qwen):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen)
    adapter = vlmtune.detect(model.config)
    unsloth = TuningConfig.from_unsloth(finetune_vision_layers=False)
    native = TuningConfig(vision="frozen", language="lora")
    assert lora_target_names(model, adapter, unsloth) == lora_target_names(model, adapter, native)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(vision="half"), "vision must be one of"),
        (dict(r=0), "r must be >= 1"),
        (dict(dropout=1.0), "dropout must be in"),
        (dict(attention=False, mlp=False), "attention and mlp are both off"),
        (dict(last_n_layers=0), "last_n_layers"),
        (dict(lora_dtype="int4"), "lora_dtype"),
        (dict(vision_lr=-1.0), "vision_lr must be positive"),
        (dict(vision_micro_batch=0), "vision_micro_batch must be >= 1"),
    ],
)
def test_bad_settings_raise_naming_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TuningConfig(**kwargs)
