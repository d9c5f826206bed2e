"""A tiny random MiniCPM-V 4.6 checkpoint, built offline (see :mod:`vlmtune.tiny`)."""

from __future__ import annotations

from pathlib import Path

from vlmtune.families.tiny_parts import (
    MINICPMV_MARKERS,
    QWEN_SPECIALS,
    byte_level_tokenizer,
    save_model,
    save_tokenizer,
)

# MiniCPM-V 4.6 speaks ChatML (its LLM is Qwen3.5) with no default system turn; each image is one <|image_pad|>,
# which its processor expands into the id tag, the source view and the slices.
MINICPMV4_6_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<|image_pad|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_minicpmv4_6(out: Path) -> None:
    """Tiny MiniCPM-V 4.6: SigLIP-style 2-layer vision tower (patch 14) with its window-attention merger after
    layer 0, a 2x2 merger MLP, and a 2-layer Qwen3.5 text tower (one linear-attention and one full-attention
    layer, hidden 64); views of about 112x112 px, so 4 tokens per view at 16x and 16 at 4x."""
    from transformers import (
        AutoTokenizer,
        MiniCPMV4_6Config,
        MiniCPMV4_6ForConditionalGeneration,
        MiniCPMV4_6ImageProcessor,
        MiniCPMV4_6Processor,
        MiniCPMV4_6VideoProcessor,
    )

    specials = QWEN_SPECIALS + MINICPMV_MARKERS
    tok = byte_level_tokenizer(specials)
    save_tokenizer(
        tok,
        out,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        model_max_length=4096,
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "image_start_token": "<image>",
            "image_end_token": "</image>",
            "slice_start_token": "<slice>",
            "slice_end_token": "</slice>",
            "image_id_start_token": "<image_id>",
            "image_id_end_token": "</image_id>",
        },
    )
    ids = {t: tok.token_to_id(t) for t in specials}
    config = MiniCPMV4_6Config(
        text_config=dict(
            model_type="qwen3_5_text",
            vocab_size=tok.get_vocab_size(),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            layer_types=["linear_attention", "full_attention"],
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=16,
            linear_value_head_dim=16,
            max_position_embeddings=4096,
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=56,
            patch_size=14,
        ),
        insert_layer_id=0,
        image_size=112,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        downsample_mode="16x",
    )
    save_model(MiniCPMV4_6ForConditionalGeneration(config), out)
    views = dict(scale_resolution=112, patch_size=14, max_slice_nums=9, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = MiniCPMV4_6Processor(
        image_processor=MiniCPMV4_6ImageProcessor(**views),
        video_processor=MiniCPMV4_6VideoProcessor(**views),
        tokenizer=AutoTokenizer.from_pretrained(out),
        chat_template=MINICPMV4_6_CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
