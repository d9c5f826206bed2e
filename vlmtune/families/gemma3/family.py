"""Gemma-3 family.

Images are resized by the family's image processor to a square (896 px on the released models), normalised
with mean/std 0.5, and optionally cut into pan-and-scan crops. Each image (and each crop) becomes
``\\n\\n<start_of_image>`` + ``mm_tokens_per_image`` (256) ``<image_soft_token>`` + ``<end_of_image>\\n\\n``;
with crops the processor prefixes the original with a fixed sentence. ``token_type_ids`` mark image tokens: the
model needs them in training for its bidirectional attention inside each image.
"""

from __future__ import annotations

from typing import Any

import torch

from vlmtune.data.positions import (
    packed_attention_masks,
    packed_image_blocks,
    packed_row_keywords,
    packed_sequence_ids,
    text_positions,
)
from vlmtune.families.base import Family, ImageBatch, LoraTargets
from vlmtune.families.gemma3.tiny import build_gemma3


def process_images(processor, images: list, options: dict[str, Any]) -> ImageBatch:
    """Run Gemma-3's image processor; ``options`` may switch pan-and-scan on and tune its limits."""
    kwargs = {k: v for k, v in options.items() if v is not None}
    out = processor.image_processor(images=images, return_tensors="pt", **kwargs)
    num_crops = out.get("num_crops")
    crops = [int(c) for c in num_crops] if num_crops is not None else [0] * len(images)
    return ImageBatch(tensors={"pixel_values": out["pixel_values"]}, infos=[{"num_crops": c} for c in crops])


def full_image_sequence(processor) -> str:
    """One image's (or crop's) tokens: blank lines, boi, the soft tokens, eoi, blank lines."""
    tok = processor.tokenizer
    return f"\n\n{tok.boi_token}{tok.image_token * processor.image_seq_length}{tok.eoi_token}\n\n"


def expand_image(processor, images: ImageBatch, index: int) -> str:
    """The template's ``<start_of_image>`` becomes the full sequence, per crop with pan-and-scan."""
    sequence = full_image_sequence(processor)
    crops = images.infos[index]["num_crops"]
    if not crops:
        return sequence
    # The wording Gemma3Processor uses when pan-and-scan produced crops (transformers >= 4.50).
    return f"Here is the original image {sequence} and here are some crops to help you see better " + " ".join(
        [sequence] * crops
    )


def batch_extras(batch: dict, images: ImageBatch, processor, model_config) -> dict[str, torch.Tensor]:
    """``token_type_ids``: 1 on image soft tokens, 0 elsewhere."""
    return {"token_type_ids": (batch["input_ids"] == model_config.image_token_index).long()}


def pack_row(batch: dict, images: ImageBatch, lengths: list[int], collator, attn_implementation: str) -> dict:
    """Packed rows: ``attention_mask`` is a dict ``{"full_attention": ..., "sliding_attention": ...}``, which
    ``Gemma3Model.forward`` passes through unchanged ("may already have been prepared").

    For ``"sdpa"`` and ``"eager"`` it holds 4-D masks built here. transformers' own packed path is wrong for the
    sliding layers: it composes ``blockwise_overlay(block_sequence_ids)`` as an ``or_mask_function``, and the
    packed remap then feeds that overlay per-sample positions instead of row indices, so image bidirectionality
    lands on the wrong tokens (checked in 5.23's ``create_masks_for_vision_model``). The masks cost ``T * T``
    booleans (``float32`` for eager) per layer type: 1.2 GB each at T = 34,560 in bool.

    For ``"varlen"`` (the kernels' language attention, :mod:`vlmtune.kernels.hf.varlen`) no mask is built: the
    row carries its sample boundaries and its images' blocks (:func:`packed_image_blocks`), and every layer
    attends per sample from them.
    """
    if attn_implementation not in ("sdpa", "eager", "varlen"):
        raise ValueError(f"packing Gemma-3 needs attn_implementation 'sdpa' or 'eager', got {attn_implementation!r}")
    positions = text_positions(lengths)
    text_config = collator.model_config.get_text_config()
    image_tokens = batch["token_type_ids"][0].bool()
    if attn_implementation == "varlen":
        types = getattr(text_config, "layer_types", None) or ["full_attention", "sliding_attention"]
        return {
            "position_ids": positions[None],
            "attention_mask": dict.fromkeys(types),
            **packed_row_keywords(lengths),
            "packed_image_blocks": packed_image_blocks(lengths, image_tokens),
        }
    masks = packed_attention_masks(
        packed_sequence_ids(lengths),
        positions,
        image_tokens,
        getattr(text_config, "sliding_window", None),
        attn_implementation,
    )
    return {"position_ids": positions[None], "attention_mask": masks}


_LANGUAGE = r"model\.language_model\.layers\.(\d+)"
# transformers < 5.x nests SigLIP's encoder one level deeper (vision_tower.vision_model.encoder).
_VISION = r"model\.vision_tower\.(?:vision_model\.)?encoder\.layers\.(\d+)"

GEMMA3 = Family(
    name="gemma3",
    model_types=("gemma3",),
    towers={
        "vision": ("model.vision_tower",),
        "projector": ("model.multi_modal_projector",),
        "language": ("model.language_model", "lm_head"),
    },
    lora_targets=LoraTargets(
        vision_attention=_VISION + r"\.self_attn\.(q_proj|k_proj|v_proj|out_proj)",
        vision_mlp=_VISION + r"\.mlp\.(fc1|fc2)",
        language_attention=_LANGUAGE + r"\.self_attn\.(q_proj|k_proj|v_proj|o_proj)",
        language_mlp=_LANGUAGE + r"\.mlp\.(gate_proj|up_proj|down_proj)",
        # The projector is a bare weight matrix (mm_input_projection_weight), not a Linear: no LoRA target.
        projector="",
    ),
    image_placeholder="<start_of_image>",
    end_of_turn="<end_of_turn>",
    process_images=process_images,
    expand_image=expand_image,
    batch_extras=batch_extras,
    norm_kind="rms_gemma",
    mlp_kind="geglu_tanh",
    rope_kind="standard",
    vision_takes_image_batch=True,
    image_options={
        "do_pan_and_scan": None,
        "pan_and_scan_min_crop_size": None,
        "pan_and_scan_max_num_crops": None,
        "pan_and_scan_min_ratio_to_activate": None,
    },
    pack=pack_row,
    tiny={"gemma3": build_gemma3},
    # SigLIP: nn.LayerNorm and fc1 -> gelu_pytorch_tanh -> fc2.
    vision_norm_kind="layer_norm",
    vision_mlp_kind="fc",
    layers={"vision": _VISION, "language": _LANGUAGE},
)
