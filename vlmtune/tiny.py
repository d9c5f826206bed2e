"""Tiny random checkpoints of every supported family, built offline.

Each builder writes a real checkpoint folder (config, safetensors, tokenizer, processor, chat template) that
`transformers.AutoModelForImageTextToText.from_pretrained` and `AutoProcessor.from_pretrained` load. Tokenizers
are trained with the `tokenizers` library on a small built-in corpus that includes LaTeX, and carry each family's
real special tokens; chat templates follow the family's real chat format; processors are the real
`transformers` processor classes with small image sizes. Nothing is downloaded.

    python -c "import vlmtune.tiny as t; print(t.build('qwen2_5_vl', 'tiny/qwen2_5_vl'))"
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

logger = logging.getLogger(__name__)

# Written here for the tiny tokenizers: a little prose in the style of chat turns, plus LaTeX in the style of
# the OCR targets, so that commands like \frac and \alpha become single tokens as in real vocabularies.
_PROSE = [
    "system user assistant model",
    "You are a helpful assistant.",
    "Write the LaTeX representation for this image.",
    "Describe the image in one sentence.",
    "What is written in the picture? Answer with the formula only.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "A vision language model reads pixels and writes text, one token at a time.",
    "Fine-tuning with low rank adapters trains a few million parameters instead of billions.",
    "Here is the original image and here are some crops to help you see better.",
    "Picture 1: an equation typeset in a serif font on a white background.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14 -1 +1 = < > ( ) [ ] { } | , . ; : ! ?",
]
_LATEX_WORDS = (
    r"\frac \sqrt \sum \int \prod \lim \infty \partial \alpha \beta \gamma \delta \epsilon \theta \lambda \mu"
    r" \pi \sigma \phi \omega \Gamma \Delta \Omega \hat \bar \vec \dot \tilde \sin \cos \tan \log \exp \cdot"
    r" \times \leq \geq \neq \pm \left( \right) \left[ \right] \mathrm \mathbf \binom \to \in \mathbb"
).split()
_LATEX_LINES = [
    r"\frac{a}{b}+\sqrt{x^{2}+y^{2}}",
    r"\sum_{i=1}^{n} i^{2}=\frac{n(n+1)(2n+1)}{6}",
    r"\int_{0}^{\infty} e^{-x^{2}} dx=\frac{\sqrt{\pi}}{2}",
    r"\prod_{k=1}^{N} \left( 1+\frac{1}{k} \right)",
    r"\lim_{x \to 0} \frac{\sin x}{x}=1",
    r"\alpha_{1} \beta^{2}+\gamma_{i j} \leq \delta",
    r"\hat{x} \cdot \vec{v} \times \bar{y} \neq \tilde{z}",
    r"\sqrt[3]{\theta} \pm \log_{2} \lambda_{k}",
    r"\partial_{t} u=\Delta u+f(x, t)",
    r"\binom{n}{k} \omega^{k} \left[ \Gamma(z) \right]",
]


def corpus() -> list[str]:
    """The built-in training corpus of the tiny tokenizers (prose, LaTeX lines and LaTeX commands)."""
    words = " ".join(_LATEX_WORDS)
    return _PROSE * 4 + _LATEX_LINES * 4 + [words] * 4 + [w + "{x}" for w in _LATEX_WORDS]


def _train_bpe(tokenizer: Tokenizer, special_tokens: list[str], vocab_size: int) -> Tokenizer:
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    return tokenizer


# Qwen2's pre-tokenizer pattern (letters, single digits, punctuation runs, newlines), written out so the
# tiny tokenizer splits text the way the family's real one does.
_QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)


def byte_level_tokenizer(special_tokens: list[str], vocab_size: int = 1200) -> Tokenizer:
    """A Qwen-style byte-level BPE tokenizer trained on :func:`corpus`, specials first in the vocabulary."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return _train_bpe(tokenizer, special_tokens, vocab_size)


def sentencepiece_style_tokenizer(special_tokens: list[str], bos: str, vocab_size: int = 1200) -> Tokenizer:
    """A Gemma-style BPE tokenizer (spaces as '▁', byte fallback, BOS prepended) trained on :func:`corpus`."""
    tokenizer = Tokenizer(models.BPE(byte_fallback=True, fuse_unk=True, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"▁?[^▁]+|▁"), behavior="isolated")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens + [f"<0x{i:02X}>" for i in range(256)],
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    bos_id = tokenizer.token_to_id(bos)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
    )
    return tokenizer


def _save_tokenizer(tokenizer: Tokenizer, out: Path, **init_kwargs) -> None:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **init_kwargs)
    fast.save_pretrained(out)


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)


def _save_model(model: torch.nn.Module, out: Path) -> None:
    # With the default init (std 0.02) a 64-wide head cannot reach logits above ~1, so no adapter on a frozen
    # random model could make a confident prediction; std 0.15 lets the demo's loss fall the way a real one does.
    head = model.get_output_embeddings()
    with torch.no_grad():
        head.weight.normal_(0.0, 0.15)
    model.save_pretrained(out, safe_serialization=True)


def build(family: str, out: str | Path, seed: int = 0) -> Path:
    """Write the tiny checkpoint of ``family`` to ``out`` and return the folder.

    Args:
        family: a key of :data:`BUILDERS` (``"qwen2_5_vl"``, ``"gemma3"``, ...).
        out: target folder; created if missing, files in it are overwritten.
        seed: seed of the random weights.
    """
    if family not in BUILDERS:
        raise ValueError(f"unknown tiny family {family!r}; choose one of {sorted(BUILDERS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _seeded(seed)
    BUILDERS[family](out)
    logger.info("wrote tiny %s checkpoint to %s", family, out)
    return out


# ----------------------------------------------------------------------------------------------- Qwen-VL

_QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

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
    tok = byte_level_tokenizer(_QWEN_SPECIALS)
    _save_tokenizer(
        tok,
        out,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=4096,
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )
    return tok.get_vocab_size(), {t: tok.token_to_id(t) for t in _QWEN_SPECIALS}


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
    _save_model(Qwen2_5_VLForConditionalGeneration(config), out)
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
    _save_model(Qwen2VLForConditionalGeneration(config), out)
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
    _save_model(Qwen3VLForConditionalGeneration(config), out)
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


# ----------------------------------------------------------------------------------------------- Gemma-3

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
    _save_tokenizer(
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
    _save_model(model, out)
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


# ------------------------------------------------------------------------------------- MiniCPM-V 4.6 (native)

# MiniCPM-V's image markers, added to a Qwen vocabulary: each image is <image_id>N</image_id>, the source view
# between <image> and </image>, and one <slice>...</slice> per slice; <unk> is the 2.x layouts' query filler.
_MINICPMV_MARKERS = ["<image>", "</image>", "<slice>", "</slice>", "<image_id>", "</image_id>", "<unk>"]

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

    specials = _QWEN_SPECIALS + _MINICPMV_MARKERS
    tok = byte_level_tokenizer(specials)
    _save_tokenizer(
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
    _save_model(MiniCPMV4_6ForConditionalGeneration(config), out)
    views = dict(scale_resolution=112, patch_size=14, max_slice_nums=9, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = MiniCPMV4_6Processor(
        image_processor=MiniCPMV4_6ImageProcessor(**views),
        video_processor=MiniCPMV4_6VideoProcessor(**views),
        tokenizer=AutoTokenizer.from_pretrained(out),
        chat_template=MINICPMV4_6_CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)


# ------------------------------------------------------------------------------- MiniCPM-V 2.6 (remote layout)

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
    from vlmtune.adapters.minicpmv import MiniCPMVProcessor
    from vlmtune.models.minicpmv import MiniCPMV, tiny_minicpmv_config

    specials = _QWEN_SPECIALS + _MINICPMV_MARKERS
    tok = byte_level_tokenizer(specials)
    _save_tokenizer(
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
    _save_model(MiniCPMV(config), out)
    from transformers import PreTrainedTokenizerFast

    MiniCPMVProcessor(PreTrainedTokenizerFast.from_pretrained(out), **slicing).save_pretrained(out)


BUILDERS: dict[str, Callable[[Path], None]] = {
    "qwen2_vl": build_qwen2_vl,
    "qwen2_5_vl": build_qwen2_5_vl,
    "qwen3_vl": build_qwen3_vl,
    "gemma3": build_gemma3,
    "minicpmv4_6": build_minicpmv4_6,
    "minicpmv": build_minicpmv,
}
