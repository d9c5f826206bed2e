"""What every family's tiny builder shares: the tokenizer corpus, tokenizer trainers, special tokens, saving.

Tokenizers are trained with the `tokenizers` library on a small built-in corpus that includes LaTeX, and carry
each family's real special tokens; nothing is downloaded. The builders live in each family's ``tiny.py``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

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


def save_tokenizer(tokenizer: Tokenizer, out: Path, **init_kwargs) -> None:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **init_kwargs)
    fast.save_pretrained(out)


def save_model(model: torch.nn.Module, out: Path) -> None:
    # With the default init (std 0.02) a 64-wide head cannot reach logits above ~1, so no adapter on a frozen
    # random model could make a confident prediction; std 0.15 lets the demo's loss fall the way a real one does.
    head = model.get_output_embeddings()
    with torch.no_grad():
        head.weight.normal_(0.0, 0.15)
    model.save_pretrained(out, safe_serialization=True)


# The special tokens of the Qwen2 vocabulary, which Qwen-VL and both MiniCPM-V layouts (their LLMs are Qwen) share.
QWEN_SPECIALS = [
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


# MiniCPM-V's image markers, added to a Qwen vocabulary: each image is <image_id>N</image_id>, the source view
# between <image> and </image>, and one <slice>...</slice> per slice; <unk> is the 2.x layouts' query filler.
MINICPMV_MARKERS = ["<image>", "</image>", "<slice>", "</slice>", "<image_id>", "</image_id>", "<unk>"]
