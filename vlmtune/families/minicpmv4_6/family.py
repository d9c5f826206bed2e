"""MiniCPM-V 4.6, the layout transformers implements natively (``model_type`` ``minicpmv4_6``).

Each image becomes a *source* view (the whole image resized to about ``scale_resolution``² pixels) plus, when it
is larger than that, up to ``max_slice_nums`` slices cut from a grid-aligned resize; every view's side is a
multiple of ``patch_size`` times the merge factor. The family's own image processor does the slicing and packs
all views' 14x14 patches along the last dimension of one ``(1, C, 14, L)`` ``pixel_values`` tensor, with
``target_sizes`` giving each view's patch grid. The chat template writes one ``<|image_pad|>`` per image; the
processor's own ``replace_image_token`` expands it to ``<image_id>N</image_id>`` (optional), ``<image>`` + the
source view's tokens + ``</image>``, and rows of ``<slice>`` ... ``</slice>`` joined by newlines.

``downsample_mode`` picks the visual token budget: ``"16x"`` (default) merges 2x2 patches twice, once inside the
vision tower (``vit_merger``) and once in ``merger``, so a view of ``h x w`` patches costs ``h * w / 16`` tokens;
``"4x"`` skips the in-tower merge (``h * w / 4`` tokens). The vision tower is SigLIP-style (``fc1``/``fc2``
MLP); the language tower is Qwen3.5, whose layers alternate Gated DeltaNet linear attention
(``linear_attn.in_proj_qkv`` / ``in_proj_z`` / ``out_proj``) and full attention (``self_attn.q/k/v/o_proj``).

Packed rows (:mod:`vlmtune.data.packing`, :func:`pack_row`): a DeltaNet layer carries a causal conv window and a
recurrent state along the whole row, which no attention mask can cut. transformers passes the packed boundaries on as
``cu_seq_lens_q``, but its reference PyTorch path ignores them (5.17) or refuses them without
``flash-linear-attention`` (5.23), and even with it the conv window reads across a boundary (``causal_conv1d_fn``
takes no ``cu_seqlens``). So :func:`load_model` gives every DeltaNet layer a forward that, when ``cu_seq_lens_q``
is passed, runs the layer on each sample's slice alone (:func:`keep_packed_samples_apart`); without it the layer
runs as before. The cost is one DeltaNet call per sample (its chunked scan pads each slice to 64 tokens).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from packaging.version import Version

from vlmtune.data.positions import packed_row_keywords, text_positions
from vlmtune.families.base import Family, ImageBatch, LoraTargets
from vlmtune.families.minicpmv4_6.tiny import build_minicpmv4_6
from vlmtune.patching import swap_forward, swap_of

DOWNSAMPLE_MODES = ("16x", "4x")
_PROCESSOR_OPTIONS = ("max_slice_nums", "scale_resolution", "slice_mode", "downsample_mode")


def downsample_mode(processor, options: dict[str, Any]) -> str:
    """The mode the user chose, else the image processor's default."""
    mode = options.get("downsample_mode") or processor.image_processor.downsample_mode
    if mode not in DOWNSAMPLE_MODES:
        raise ValueError(f"downsample_mode must be one of {DOWNSAMPLE_MODES}, got {mode!r}")
    return mode


def process_images(processor, images: list, options: dict[str, Any]) -> ImageBatch:
    """Run MiniCPM-V 4.6's image processor with the user's slicing and downsampling options."""
    mode = downsample_mode(processor, options)
    kwargs = {k: options[k] for k in _PROCESSOR_OPTIONS if options.get(k) is not None}
    kwargs["downsample_mode"] = mode
    out = processor.image_processor(images=images, return_tensors="pt", **kwargs)
    use_image_id = options.get("use_image_id")
    if use_image_id is None:
        use_image_id = processor.image_processor.use_image_id
    infos, start = [], 0
    for grid, views in zip(out["grids"], out["num_patches_per_image"], strict=True):
        infos.append(
            {
                "grid": tuple(int(g) for g in grid),  # (rows, cols) of slices; (0, 0) when not sliced
                "target_sizes": out["target_sizes"][start : start + views],
                "downsample_mode": mode,
                "use_image_id": bool(use_image_id),
            }
        )
        start += views
    tensors = {"pixel_values": out["pixel_values"], "target_sizes": out["target_sizes"]}
    return ImageBatch(tensors=tensors, infos=infos, cat_dims={"pixel_values": -1})


def num_image_tokens(info: dict[str, Any]) -> int:
    """Image tokens of one image: every view's ``rows * cols`` patches over 4 or 16."""
    divisor = 4 if info["downsample_mode"] == "4x" else 16
    return int((info["target_sizes"].prod(-1) // divisor).sum())


def expand_image(processor, images: ImageBatch, index: int) -> str:
    """The processor's own expansion of image ``index`` of a sample, with its per-sample id tag."""
    info = images.infos[index]
    one_image = {
        "grids": [list(info["grid"])],
        "num_patches_per_image": [len(info["target_sizes"])],
        "target_sizes": info["target_sizes"],
    }
    divisor = 4 if info["downsample_mode"] == "4x" else 16
    text = processor.replace_image_token(one_image, 0, image_token_divisor=divisor)
    if info["use_image_id"]:
        # MiniCPMV4_6Processor numbers images per sample, starting at 0.
        text = f"{processor.image_id_start_token}{index}{processor.image_id_end_token}" + text
    return text


def batch_extras(batch: dict, images: ImageBatch, processor, model_config) -> dict[str, Any]:
    """``downsample_mode`` when it differs from the model config's (the model reads it from the config otherwise).

    The value is a string, not a tensor: ``Trainer`` passes it through to ``forward`` unchanged.
    """
    modes = {info["downsample_mode"] for info in images.infos}
    if not modes:
        return {}
    if len(modes) > 1:
        raise ValueError(f"one batch mixes downsample modes {sorted(modes)}; use one mode per run")
    mode = modes.pop()
    sizes = {tuple(size) for size in images.tensors["target_sizes"].tolist()}
    if mode == "16x" and len(sizes) > 1 and Version(transformers.__version__) < Version("5.19"):
        # Before 5.19 the in-tower window merger reshapes all views as if they shared the first one's grid.
        raise ValueError(
            f"transformers {transformers.__version__} runs MiniCPM-V 4.6's 16x merger only on views of one size, "
            f"and this batch has {sorted(sizes)} patches; upgrade to transformers>=5.19 or set the image option "
            "downsample_mode='4x' (which skips that merger)"
        )
    return {} if mode == model_config.downsample_mode else {"downsample_mode": mode}


_PACKED = "_vlmtune_packed"


def _per_sample_forward(self, hidden_states: torch.Tensor, attention_mask=None, **kwargs):
    """The layer's own forward, run once per packed sample when ``cu_seq_lens_q`` ``(n + 1,)`` marks them.

    The cache travels in ``kwargs`` under the name the decoder layer used (``cache``, or ``cache_params`` in older
    transformers): naming the other one too makes transformers 5.24 warn that both are set.
    """
    inner = swap_of(self, _PACKED).inner
    bounds = kwargs.pop("cu_seq_lens_q", None)
    if bounds is None:
        return inner(hidden_states, attention_mask=attention_mask, **kwargs)
    cached = any(kwargs.get(name) is not None for name in ("cache", "cache_params"))
    if cached or hidden_states.shape[0] != 1:
        raise ValueError(
            f"packed sequences (cu_seq_lens_q) need a single row and no cache; got {hidden_states.shape[0]} rows "
            f"and a cache: {cached} (pass use_cache=False)"
        )
    for key in ("cu_seq_lens_k", "max_length_q", "max_length_k"):
        kwargs.pop(key, None)
    bounds = bounds.tolist()
    pieces = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        mask = None if attention_mask is None else attention_mask[:, start:end]
        pieces.append(inner(hidden_states[:, start:end], attention_mask=mask, **kwargs))
    return torch.cat(pieces, dim=1)


def keep_packed_samples_apart(model: torch.nn.Module) -> Callable[[], None]:
    """Make every Gated DeltaNet layer (``*.linear_attn``) of the language tower run packed samples one by one.

    Returns:
        A function restoring the forwards the layers had before (the same objects).
    """
    undos = []
    for name, module in model.named_modules():
        if name.endswith(".linear_attn") and MINICPMV4_6.tower_of(name) == "language" and not swap_of(module, _PACKED):
            undos.append(swap_forward(module, _PACKED, _per_sample_forward))

    def restore() -> None:
        while undos:
            undos.pop()()

    return restore


def load_model(path: str | Path, **kwargs):
    """``AutoModelForImageTextToText.from_pretrained(path, **kwargs)`` with :func:`keep_packed_samples_apart`."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    keep_packed_samples_apart(model)
    return model


def load_processor(path: str | Path):
    """``AutoProcessor.from_pretrained(path)``: transformers reads this layout natively."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(path)


def pack_row(batch: dict, images: ImageBatch, lengths: list[int], collator, attn_implementation: str) -> dict:
    """Packed rows: no ``attention_mask``; ``position_ids`` ``(1, T)`` restarting per sample (the text row of
    Qwen3.5's 4-row positions, for its full-attention layers), and the sample boundaries under transformers'
    flash-attention names (``cu_seq_lens_q`` ...), which the DeltaNet layers need (see the module docstring) and
    ``flash_attention_2`` takes its varlen path from.

    :func:`batch_extras` runs on the packed row: on transformers < 5.19 in ``16x`` mode the whole row's views must
    share one size.
    """
    extras = batch_extras(batch, images, collator.processor, collator.model_config)
    flash = packed_row_keywords(lengths)
    return {**extras, "position_ids": text_positions(lengths)[None], "attention_mask": None, **flash}


_VISION = r"model\.vision_tower\.encoder\.layers\.(\d+)"
_LANGUAGE = r"model\.language_model\.layers\.(\d+)"

MINICPMV4_6 = Family(
    name="minicpmv4_6",
    model_types=("minicpmv4_6",),
    towers={
        "vision": ("model.vision_tower",),
        # The window-attention merger inside the vision tower is a learned 2x2 downsampler, the same role as the
        # final merger MLP: both are projector modules (frozen by default, trained with projector="full").
        "projector": ("model.merger", "model.vision_tower.vit_merger"),
        "language": ("model.language_model", "lm_head"),
    },
    lora_targets=LoraTargets(
        vision_attention=_VISION + r"\.self_attn\.(q_proj|k_proj|v_proj|out_proj)",
        vision_mlp=_VISION + r"\.mlp\.(fc1|fc2)",
        # Full-attention layers and Gated DeltaNet layers alike; DeltaNet's in_proj_a / in_proj_b (one output
        # per head, the decay and write-strength gates) are left out: a rank-16 update of a 16-wide output is
        # no low-rank adapter.
        language_attention=_LANGUAGE
        + r"\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|linear_attn\.(in_proj_qkv|in_proj_z|out_proj))",
        language_mlp=_LANGUAGE + r"\.mlp\.(gate_proj|up_proj|down_proj)",
        projector=r"model\.merger\.mlp\.\d+\.(linear_1|linear_2)"
        r"|model\.vision_tower\.vit_merger\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|linear_1|linear_2)",
    ),
    image_placeholder="<|image_pad|>",
    end_of_turn="<|im_end|>",
    process_images=process_images,
    expand_image=expand_image,
    batch_extras=batch_extras,
    # Qwen3.5: RMSNorm scales by (1 + w) like Gemma's; M-RoPE (interleaved, resolved by its rotary module; the
    # positions are text-only here) on a quarter of each head; DeltaNet layers have no RoPE.
    norm_kind="rms_gemma",
    mlp_kind="swiglu",
    rope_kind="mrope",
    image_options={
        "max_slice_nums": None,
        "scale_resolution": None,
        "slice_mode": None,
        "downsample_mode": None,
        "use_image_id": None,
    },
    load_model=load_model,
    load_processor=load_processor,
    pack=pack_row,
    tiny={"minicpmv4_6": build_minicpmv4_6},
)
