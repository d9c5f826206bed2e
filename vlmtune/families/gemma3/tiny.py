"""A tiny random Gemma-3 checkpoint, built offline (see :mod:`vlmtune.tiny`)."""

from __future__ import annotations

from pathlib import Path

import torch

from vlmtune.families.tiny_parts import save_model, save_tokenizer, sentencepiece_style_tokenizer

_GEMMA_SPECIALS = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
]

# The Gemma-3 chat format: <bos>, turns as <start_of_turn>{user|model}\n ... <end_of_turn>\n, a system
# message folded into the first user turn, texts trimmed, images as <start_of_image>.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% if messages[0]['content'] is string %}{% set prefix = messages[0]['content'] + '\\n\\n' %}"
    "{% else %}{% set prefix = messages[0]['content'][0]['text'] + '\\n\\n' %}{% endif %}"
    "{% set loop_messages = messages[1:] %}"
    "{% else %}{% set prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + (prefix if loop.first else '') }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


def build_gemma3(out: Path) -> None:
    """Tiny Gemma-3: 2-layer text tower (sliding + global), 2-layer SigLIP at 64 px, 16 soft tokens per image."""
    from transformers import (
        AutoTokenizer,
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessor,
        Gemma3Processor,
    )

    tok = sentencepiece_style_tokenizer(_GEMMA_SPECIALS, bos="<bos>")
    save_tokenizer(
        tok,
        out,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=4096,
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
    )
    ids = {t: tok.token_to_id(t) for t in _GEMMA_SPECIALS}
    tokens_per_image = 16
    config = Gemma3Config(
        text_config=dict(
            vocab_size=tok.get_vocab_size(),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=32,
            layer_types=["sliding_attention", "full_attention"],
            max_position_embeddings=4096,
            pad_token_id=ids["<pad>"],
            bos_token_id=ids["<bos>"],
            eos_token_id=ids["<eos>"],
        ),
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=64,
            patch_size=8,
            vision_use_head=False,
        ),
        mm_tokens_per_image=tokens_per_image,
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
        pad_token_id=ids["<pad>"],
        bos_token_id=ids["<bos>"],
        eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]],
    )
    model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():
        # transformers zero-initialises the projector matrix, which would cut every gradient to the vision tower.
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.1)
    save_model(model, out)
    image_processor = Gemma3ImageProcessor(
        size={"height": 64, "width": 64}, image_mean=[0.5] * 3, image_std=[0.5] * 3, resample=2
    )
    processor = Gemma3Processor(
        image_processor=image_processor,
        tokenizer=AutoTokenizer.from_pretrained(out),
        chat_template=GEMMA3_CHAT_TEMPLATE,
        image_seq_length=tokens_per_image,
    )
    processor.save_pretrained(out)
