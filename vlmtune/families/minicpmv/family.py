"""MiniCPM-V 2.6 / 4.x in the released remote-code layout (``model_type`` ``minicpmv``: ``vpm`` / ``resampler`` /
``llm``), served by vlmtune's native model class, so no ``trust_remote_code``.

transformers has no processor for this layout, so the family carries a small one
(:class:`~vlmtune.families.minicpmv.processing.MiniCPMVProcessor`) built on the checkpoint's own tokenizer and
:mod:`vlmtune.families.minicpmv.image`. It renders conversations the
way the published ``chat()`` does: a message's parts are joined by newlines, each image part written as
``(<image>./</image>)``, and the result goes through the tokenizer's chat template (Qwen2 ChatML for 2.6). Each
tag then becomes the image's placeholder: ``<image_id>N</image_id>`` (optional), ``<image>`` + 64 ``<unk>`` +
``</image>``, and for a sliced image rows of ``<slice>`` + 64 ``<unk>`` + ``</slice>`` joined by newlines.

Images are sliced into a source view plus up to ``max_slice_nums`` (9) cells of about ``scale_resolution``²
(448²) pixels, patch 14, normalised with mean/std 0.5. The batch carries ``pixel_values`` (every view's patch
strip, zero-padded to the longest: ``(N, 3, 14, L_max * 14)``), ``tgt_sizes`` (``(N, 2)`` patch grids) and
``image_bound`` (one ``(k, 2)`` tensor of ``[start, end)`` placeholder ranges per sample, computed after padding).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlmtune.data.positions import text_positions
from vlmtune.families.base import Family, ImageBatch, LoraTargets
from vlmtune.families.minicpmv.processing import IMAGE_TAG, MiniCPMVProcessor, image_bounds, process_images
from vlmtune.families.minicpmv.tiny import build_minicpmv


def expand_image(processor: MiniCPMVProcessor, images: ImageBatch, index: int) -> str:
    """The placeholder written for image ``index`` of the sample (its id is that index)."""
    return images.infos[index]["placeholder"]


def batch_extras(batch: dict, images: ImageBatch, processor, model_config) -> dict[str, Any]:
    """``image_bound`` from the padded ``input_ids`` (right padding leaves every range where it was)."""
    return {"image_bound": image_bounds(processor.tokenizer, batch["input_ids"])}


def load_model(path: str | Path, **kwargs):
    """vlmtune's native :class:`~vlmtune.families.minicpmv.modeling.MiniCPMV` for the released layout, registered
    with the Auto classes on the way (so ``AutoConfig`` reads such folders afterwards); ``kwargs`` go to
    ``from_pretrained``."""
    # Imported here, not at the top: the model module pulls in transformers' modeling stack (and with it
    # triton), which `import vlmtune` should not do.
    from vlmtune.families.minicpmv.modeling import MiniCPMV, register

    register()
    return MiniCPMV.from_pretrained(path, **kwargs)


def pack_row(batch: dict, images: ImageBatch, lengths: list[int], collator, attn_implementation: str) -> dict:
    """Packed rows: no ``attention_mask``; ``position_ids`` ``(1, T)`` restarting per sample, and ``image_bound``
    recomputed on the packed row, so each view's range follows its sample's offset.

    ``MiniCPMV.forward`` hands both to its transformers LLM (Qwen2, Qwen3 or Llama), whose ``create_causal_mask``
    finds the restarts as for Qwen-VL (same code in 5.17 and 5.23).
    """
    extras = batch_extras(batch, images, collator.processor, collator.model_config)
    return {**extras, "position_ids": text_positions(lengths)[None], "attention_mask": None}


_VISION = r"vpm\.encoder\.layers\.(\d+)"
_LANGUAGE = r"llm\.model\.layers\.(\d+)"

MINICPMV = Family(
    name="minicpmv",
    model_types=("minicpmv",),
    towers={"vision": ("vpm",), "projector": ("resampler",), "language": ("llm",)},
    lora_targets=LoraTargets(
        vision_attention=_VISION + r"\.self_attn\.(q_proj|k_proj|v_proj|out_proj)",
        vision_mlp=_VISION + r"\.mlp\.(fc1|fc2)",
        language_attention=_LANGUAGE + r"\.self_attn\.(q_proj|k_proj|v_proj|o_proj)",
        language_mlp=_LANGUAGE + r"\.mlp\.(gate_proj|up_proj|down_proj)",
        # The resampler's q/k/v projection is one fused in_proj_weight (not a Linear); its Linears are these.
        projector=r"resampler\.(kv_proj|attn\.out_proj)",
    ),
    image_placeholder=IMAGE_TAG,
    end_of_turn="<|im_end|>",
    process_images=process_images,
    expand_image=expand_image,
    batch_extras=batch_extras,
    # The LLM inside: Qwen2 (2.6) and Qwen3 (4.5) both use RMSNorm, SwiGLU and standard RoPE.
    norm_kind="rms",
    mlp_kind="swiglu",
    rope_kind="standard",
    image_options={"max_slice_nums": None, "scale_resolution": None, "slice_mode": None, "use_image_id": None},
    load_model=load_model,
    load_processor=MiniCPMVProcessor.from_pretrained,
    pack=pack_row,
    tiny={"minicpmv": build_minicpmv},
    # The SigLIP encoder (vpm) and the resampler: nn.LayerNorm; vpm's MLPs fc1 -> gelu_pytorch_tanh -> fc2.
    vision_norm_kind="layer_norm",
    vision_mlp_kind="fc",
)
