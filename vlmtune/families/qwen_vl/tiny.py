"""Tiny random Qwen2-VL, Qwen2.5-VL and Qwen3-VL checkpoints, built offline (see :mod:`vlmtune.tiny`)."""

from __future__ import annotations

from pathlib import Path

from vlmtune.families.tiny_parts import QWEN_SPECIALS, byte_level_tokenizer, save_model, save_tokenizer

# The Qwen2-VL / Qwen2.5-VL chat format: ChatML turns, a default system turn, images as
# <|vision_start|><|image_pad|><|vision_end|> inside the user turn.
QWEN_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}{{ 'Picture ' + image_count.value | string + ': ' }}{% endif %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _save_qwen_tokenizer(out: Path) -> tuple[int, dict[str, int]]:
    """Write the Qwen-VL tokenizer to ``out``; return its vocabulary size and the special tokens' ids."""
    tok = byte_level_tokenizer(QWEN_SPECIALS)
    save_tokenizer(
        tok,
        out,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=4096,
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )
    return tok.get_vocab_size(), {t: tok.token_to_id(t) for t in QWEN_SPECIALS}


def _qwen_token_ids(ids: dict[str, int]) -> dict[str, int]:
    """The token-id fields every Qwen-VL config carries."""
    return dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )


def _qwen_text_config(vocab_size: int, ids: dict[str, int], **extra) -> dict:
    """A 2-layer, 64-wide Qwen text tower with M-RoPE over head_dim 16 (8 frequencies: 2 + 3 + 3)."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        **extra,
    )


def _save_qwen_processor(processor_class, out: Path) -> None:
    """Qwen2-VL / Qwen2.5-VL processor over the saved tokenizer: images (and videos) of 56-224 px."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    pixels = dict(min_pixels=56 * 56, max_pixels=224 * 224)
    processor = processor_class(
        image_processor=Qwen2VLImageProcessor(**pixels),
        tokenizer=AutoTokenizer.from_pretrained(out),
        video_processor=Qwen2VLVideoProcessor(**pixels),
        chat_template=QWEN_VL_CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)


def build_qwen2_5_vl(out: Path) -> None:
    """Tiny Qwen2.5-VL: 2-layer text tower (hidden 64), 2-block vision tower, images of 56-224 px."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
    )

    vocab_size, ids = _save_qwen_tokenizer(out)
    config = Qwen2_5_VLConfig(
        text_config=_qwen_text_config(vocab_size, ids),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=56,
            fullatt_block_indexes=[1],
        ),
        **_qwen_token_ids(ids),
    )
    save_model(Qwen2_5_VLForConditionalGeneration(config), out)
    _save_qwen_processor(Qwen2_5_VLProcessor, out)


def build_qwen2_vl(out: Path) -> None:
    """Tiny Qwen2-VL: 2-layer text tower (hidden 64), 2-block vision tower (fc1/fc2 MLP), images of 56-224 px."""
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLProcessor,
    )

    vocab_size, ids = _save_qwen_tokenizer(out)
    config = Qwen2VLConfig(
        text_config=_qwen_text_config(vocab_size, ids),
        # Qwen2-VL's vision config names differ from 2.5's: `embed_dim` is the ViT width, `hidden_size` the
        # merger's output (the text width), and the MLP is fc1/fc2 of width embed_dim * mlp_ratio.
        vision_config=dict(
            depth=2,
            embed_dim=32,
            hidden_size=64,
            mlp_ratio=2,
            num_heads=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        **_qwen_token_ids(ids),
    )
    save_model(Qwen2VLForConditionalGeneration(config), out)
    _save_qwen_processor(Qwen2VLProcessor, out)


# The Qwen3-VL (Instruct) chat format: ChatML turns like Qwen2-VL, but no default system turn; a system
# message's text parts are joined.
QWEN3_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' and message['role'] != 'system' %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}{{ 'Picture ' + image_count.value | string + ': ' }}{% endif %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_qwen3_vl(out: Path) -> None:
    """Tiny Qwen3-VL: 2-layer text tower (hidden 64, q/k norms, interleaved M-RoPE), 2-block vision tower with
    one DeepStack merger, 16 px patches, images of 64-256 px."""
    from transformers import (
        AutoTokenizer,
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    vocab_size, ids = _save_qwen_tokenizer(out)
    text = _qwen_text_config(vocab_size, ids, head_dim=16)
    # Interleaved M-RoPE: frequency i goes to T, H, W in turn; the section sizes say how many H and W get.
    text["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": 5e6,
        "mrope_section": [4, 2, 2],
        "mrope_interleaved": True,
    }
    config = Qwen3VLConfig(
        text_config=text,
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0],
        ),
        **_qwen_token_ids(ids),
    )
    save_model(Qwen3VLForConditionalGeneration(config), out)
    # The released Qwen3-VL processors: 16 px patches merged 2x2 (sides multiples of 32), mean/std 0.5.
    pixels = dict(
        size={"shortest_edge": 64 * 64, "longest_edge": 256 * 256},
        patch_size=16,
        merge_size=2,
        temporal_patch_size=2,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels),
        tokenizer=AutoTokenizer.from_pretrained(out),
        video_processor=Qwen3VLVideoProcessor(**pixels),
        chat_template=QWEN3_VL_CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
