"""A tiny random MiniCPM-V 2.6 checkpoint in the released layout, built offline (see :mod:`vlmtune.tiny`)."""

from __future__ import annotations

from pathlib import Path

from vlmtune.families.minicpmv.configuration import MiniCPMVConfig
from vlmtune.families.tiny_parts import (
    MINICPMV_MARKERS,
    QWEN_SPECIALS,
    byte_level_tokenizer,
    save_model,
    save_tokenizer,
)

# The Qwen2 chat format of MiniCPM-V 2.6's tokenizer: string contents only (its chat() joins a message's parts
# with newlines, images written as "(<image>./</image>)"), and a default system turn.
MINICPMV_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_minicpmv(out: Path) -> None:
    """Tiny MiniCPM-V 2.6 in the released layout (``vpm`` / ``resampler`` / ``llm``, flat config): 2-layer
    SigLIP (32 wide, patch 14), 64-query resampler, 2-layer Qwen2 (64 wide); views of about 112x112 px."""
    from transformers import PreTrainedTokenizerFast

    from vlmtune.families.minicpmv.modeling import MiniCPMV
    from vlmtune.families.minicpmv.processing import MiniCPMVProcessor

    specials = QWEN_SPECIALS + MINICPMV_MARKERS
    tok = byte_level_tokenizer(specials)
    save_tokenizer(
        tok,
        out,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        model_max_length=4096,
        chat_template=MINICPMV_CHAT_TEMPLATE,
    )
    ids = {t: tok.token_to_id(t) for t in specials}
    slicing = {"max_slice_nums": 9, "scale_resolution": 112, "patch_size": 14}
    config = tiny_minicpmv_config(
        tok.get_vocab_size(),
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        version=2.6,
        slice_config=slicing,
    )
    save_model(MiniCPMV(config), out)
    MiniCPMVProcessor(PreTrainedTokenizerFast.from_pretrained(out), **slicing).save_pretrained(out)


def tiny_minicpmv_config(
    vocab_size: int,
    bos_token_id: int | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    version: float = 2.6,
    **overrides,
) -> MiniCPMVConfig:
    """A random-weight-sized MiniCPM-V config for tests and the demo: vision 32 wide × 2 layers on a 56-px
    (4×4-patch) position table, LLM 64 wide × 2 layers (Qwen2 for 2.6, Qwen3 for 4.5), 64 queries per view.

    `overrides` replace any field (e.g. `slice_config={"scale_resolution": 56}` for smaller views).
    """
    fields = {
        "version": version,
        "vocab_size": vocab_size,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 8192,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "query_num": 64,
        "drop_vision_last_layer": False,
        "vision_config": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 56,
            "patch_size": 14,
        },
        "slice_config": {"max_slice_nums": 9, "scale_resolution": 448},
        "architectures": ["MiniCPMV"],
    }
    fields.update(overrides)
    return MiniCPMVConfig(**fields)
