"""Qwen-VL family: Qwen2-VL, Qwen2.5-VL and Qwen3-VL.

Images are resized by the family's own image processor to multiples of ``patch_size * merge_size`` (28 for
Qwen2/2.5-VL, 32 for Qwen3-VL) between ``min_pixels`` and ``max_pixels`` (aspect ratio capped at 200), cut
into flat patches (14x14x2 or 16x16x2), and described by ``image_grid_thw``. Each image becomes
``grid_thw.prod() / 4`` ``<|image_pad|>`` tokens between ``<|vision_start|>`` and ``<|vision_end|>``. The
language tower uses 3-D M-RoPE positions, which this family computes itself from the padded batch
(transformers 5.x only builds them when ``mm_token_type_ids`` is passed, and silently falls back to 1-D
positions otherwise).

Qwen2-VL and Qwen2.5-VL share one descriptor: they differ only in the vision MLP's names (``fc1``/``fc2`` against
``gate_proj``/``up_proj``/``down_proj``), and both sets are anchored under ``model.visual.blocks``. Qwen3-VL has
its own: its vision MLP is ``linear_fc1``/``linear_fc2``, its projector is the final ``merger`` plus the
DeepStack mergers (``deepstack_merger_list``) that feed intermediate vision features into the first text
layers, and its M-RoPE is interleaved (frequencies cycle T, H, W instead of one block per axis). For images its
position rule equals Qwen2's: ``start + (t, row, col)`` and text resuming at ``start + max(rows, cols)``
(transformers' Qwen3-VL ``get_rope_index`` differs only for videos, which it splits per frame with timestamps).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from vlmtune.data.positions import empty_mask, packed_image_blocks, packed_row_keywords, text_positions
from vlmtune.families.base import Family, ImageBatch, LoraTargets
from vlmtune.families.qwen_vl.tiny import build_qwen2_5_vl, build_qwen2_vl, build_qwen3_vl


def process_images(processor, images: list, options: dict[str, Any]) -> ImageBatch:
    """Run Qwen's image processor; ``options`` may set ``min_pixels`` / ``max_pixels``."""
    kwargs = {}
    if options.get("min_pixels") is not None or options.get("max_pixels") is not None:
        # transformers 5 reads the pixel range from `size` (passing min/max_pixels is deprecated).
        size = dict(processor.image_processor.size)
        if options.get("min_pixels") is not None:
            size["shortest_edge"] = options["min_pixels"]
        if options.get("max_pixels") is not None:
            size["longest_edge"] = options["max_pixels"]
        kwargs["size"] = size
    out = processor.image_processor(images=images, return_tensors="pt", **kwargs)
    grid = out["image_grid_thw"]
    infos = [{"grid_thw": tuple(int(x) for x in g)} for g in grid]
    return ImageBatch(tensors={"pixel_values": out["pixel_values"], "image_grid_thw": grid}, infos=infos)


def num_image_tokens(processor, info: dict[str, Any]) -> int:
    """``grid_t * grid_h * grid_w / merge_size**2`` tokens for one image."""
    t, h, w = info["grid_thw"]
    return t * h * w // processor.image_processor.merge_size**2


def expand_image(processor, images: ImageBatch, index: int) -> str:
    """The chat template writes one ``<|image_pad|>``; the model needs one per merged patch."""
    return processor.image_token * num_image_tokens(processor, images.infos[index])


def mrope_position_ids(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_token_id: int,
    grids: list[tuple[int, int, int]],
    merge_size: int,
) -> torch.Tensor:
    """3-D M-RoPE positions ``(3, B, T)`` for a right-padded batch.

    Text tokens advance all three axes together; an image's tokens take ``start + (t, row, col)`` on the
    merged grid, and text after it resumes at ``start + max(t, rows, cols)`` (the Qwen2-VL paper, section 2.1,
    and transformers' ``get_rope_index``; images have ``t = 1``, so Qwen3-VL's ``max(rows, cols)`` is the same).
    Pad positions get 0.
    """
    batch, length = input_ids.shape
    positions = torch.zeros(3, batch, length, dtype=torch.long)
    grid_iter = iter(grids)
    for b in range(batch):
        ids = input_ids[b, attention_mask[b].bool()].tolist()
        pos = torch.empty(3, len(ids), dtype=torch.long)
        i, current = 0, 0
        while i < len(ids):
            if ids[i] != image_token_id:
                pos[:, i] = current
                current += 1
                i += 1
                continue
            grid = next(grid_iter, None)
            if grid is None:
                raise ValueError(f"sample {b} has more image-token runs than the batch has image grids")
            t, h, w = grid
            h, w = h // merge_size, w // merge_size
            n = t * h * w
            tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
            pos[:, i : i + n] = torch.stack([tt, hh, ww]).reshape(3, -1) + current
            current += max(t, h, w)
            i += n
        positions[:, b, : len(ids)] = pos
    return positions


def batch_extras(batch: dict, images: ImageBatch, processor, model_config) -> dict[str, torch.Tensor]:
    """``mm_token_type_ids`` (1 on image tokens) and explicit M-RoPE ``position_ids``."""
    image_token_id = model_config.image_token_id
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    extras = {"mm_token_type_ids": (input_ids == image_token_id).long()}
    grids = [info["grid_thw"] for info in images.infos]
    merge = model_config.vision_config.spatial_merge_size
    extras["position_ids"] = mrope_position_ids(input_ids, attention_mask, image_token_id, grids, merge)
    return extras


def pack_row(batch: dict, images: ImageBatch, lengths: list[int], collator, attn_implementation: str) -> dict:
    """Packed rows: no ``attention_mask``, and ``position_ids`` ``(4, 1, T)``: the text positions restarting per
    sample, then each sample's M-RoPE positions computed on that sample alone.

    ``Qwen2_5_VLTextModel.forward`` (and Qwen2-VL's and Qwen3-VL's) reads a 4-row tensor as "packed, text positions
    first" and hands row 0 to ``create_causal_mask``, whose ``find_packed_sequence_indices`` turns each restart
    into a new sequence (transformers >= 4.54). The sample boundaries also go under transformers' flash-attention
    names, from which the kernels' language attention runs per sample (:mod:`vlmtune.kernels.hf.varlen`); for
    ``"varlen"`` rows Qwen2-VL and Qwen2.5-VL get a dict of no masks instead, and Qwen3-VL a 4-D mask of no size
    (:func:`~vlmtune.data.positions.empty_mask`), so none is built.
    """
    text = text_positions(lengths).view(1, 1, -1)
    flash = packed_row_keywords(lengths)
    row = {"position_ids": torch.cat([text, batch["position_ids"]], dim=0), "attention_mask": None, **flash}
    if attn_implementation == "varlen":
        # No dense (1, 1, T, T) mask for the layers to ignore (0.9 GB at 30k tokens): the text model takes a
        # prepared dict of masks (Qwen2-VL, Qwen2.5-VL) or passes a 4-D one through (Qwen3-VL), and a layer the
        # varlen kernel cannot take builds the row's mask on the device from the boundaries (no image blocks:
        # Qwen-VL's image tokens attend causally).
        if collator.model_config.model_type in _TAKES_MASK_DICT:
            types = getattr(collator.model_config.get_text_config(), "layer_types", None) or ["full_attention"]
            mask = dict.fromkeys(types)
        else:
            mask = empty_mask()
        causal = torch.zeros(sum(lengths), dtype=torch.bool)
        row.update(attention_mask=mask, packed_image_blocks=packed_image_blocks(lengths, causal))
    return row


# The model types whose text model passes a dict ``attention_mask`` through as prepared masks (transformers 5.17 to
# 5.25); Qwen3-VL's always calls create_causal_mask, which passes a 4-D mask through.
_TAKES_MASK_DICT = ("qwen2_vl", "qwen2_5_vl")


_LANGUAGE = r"model\.language_model\.layers\.(\d+)"
_VISION = r"model\.visual\.blocks\.(\d+)"

QWEN2_5_VL = Family(
    name="qwen2_5_vl",
    model_types=("qwen2_vl", "qwen2_5_vl"),
    towers={
        "vision": ("model.visual",),
        "projector": ("model.visual.merger",),
        "language": ("model.language_model", "lm_head"),
    },
    lora_targets=LoraTargets(
        vision_attention=_VISION + r"\.attn\.(qkv|proj)",
        # Qwen-VL's vision MLP reuses gate_proj/up_proj/down_proj (2.5) or fc1/fc2 (2): the anchored prefix
        # keeps a language-only choice off them.
        vision_mlp=_VISION + r"\.mlp\.(gate_proj|up_proj|down_proj|fc1|fc2)",
        language_attention=_LANGUAGE + r"\.self_attn\.(q_proj|k_proj|v_proj|o_proj)",
        language_mlp=_LANGUAGE + r"\.mlp\.(gate_proj|up_proj|down_proj)",
        projector=r"model\.visual\.merger\.mlp\.(0|2)",
    ),
    image_placeholder="<|image_pad|>",
    end_of_turn="<|im_end|>",
    process_images=process_images,
    expand_image=expand_image,
    batch_extras=batch_extras,
    norm_kind="rms",
    mlp_kind="swiglu",
    rope_kind="mrope",
    vision_attention_kind="cu_seqlens",
    image_options={"min_pixels": None, "max_pixels": None},
    pack=pack_row,
    tiny={"qwen2_vl": build_qwen2_vl, "qwen2_5_vl": build_qwen2_5_vl},
    # Qwen2-VL's ViT (and Qwen3-VL's): nn.LayerNorm and fc1 -> QuickGELU (tanh-GELU) -> fc2. Qwen2.5-VL's has
    # RMSNorm and a gated SiLU MLP with biases, which these ops find nothing of (see vlmtune.kernels.patch).
    vision_norm_kind="layer_norm",
    vision_mlp_kind="fc",
    layers={"vision": _VISION, "language": _LANGUAGE},
)

# Qwen3-VL is Qwen2.5-VL's descriptor with its own names (the data and image path are the same).
QWEN3_VL = dataclasses.replace(
    QWEN2_5_VL,
    name="qwen3_vl",
    model_types=("qwen3_vl",),
    towers={
        "vision": ("model.visual",),
        # DeepStack mergers project intermediate vision features into the text width, like the final merger.
        # Named one by one: PEFT's modules_to_save cannot wrap their ModuleList. Every released Qwen3-VL has
        # three (deepstack_visual_indexes of length 3); prefixes a model lacks match nothing.
        "projector": ("model.visual.merger", *(f"model.visual.deepstack_merger_list.{i}" for i in range(3))),
        "language": ("model.language_model", "lm_head"),
    },
    lora_targets=dataclasses.replace(
        QWEN2_5_VL.lora_targets,
        vision_mlp=_VISION + r"\.mlp\.(linear_fc1|linear_fc2)",
        projector=r"model\.visual\.(merger|deepstack_merger_list\.\d+)\.(linear_fc1|linear_fc2)",
    ),
    # Qwen3-VL interleaves the T/H/W frequencies (rope_parameters["mrope_interleaved"]) where Qwen2 stacks them
    # in sections; either way its rotary module resolves the layout and attention rotates with plain cos/sin, so
    # rope_kind stays "mrope".
    tiny={"qwen3_vl": build_qwen3_vl},
)
