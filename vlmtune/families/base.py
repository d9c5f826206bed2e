"""The family protocol: what vlmtune needs to know about one model family.

A family is data plus a few small functions, not a subclass tree. Each family folder
(``vlmtune/families/<family>/``) builds one or more :class:`Family` descriptors, and ``vlmtune/families/__init__.py``
registers them by ``model_type``. Shared code (collator, packing, tuning, kernels) asks the descriptor and never
names a family.

The data path calls a family in this order for one conversation:

1. ``process_images(processor, images, options)`` → :class:`ImageBatch` (pixel tensors + per-image token
   counts), using the family's own image processor wherever transformers has one;
2. ``expand_image(processor, images, index)`` → the text that replaces the ``image_placeholder`` the chat
   template wrote for image ``index``;
3. after padding, ``batch_extras(batch, images, processor, config)`` → the family's extra batch keys
   (``token_type_ids``, M-RoPE ``position_ids``, ...).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

TOWERS = ("vision", "projector", "language")
KINDS = ("attention", "mlp")


@dataclass
class ImageBatch:
    """The processed images of one sample (or, after :meth:`cat`, of one batch).

    Attributes:
        tensors: model inputs for the images, e.g. ``pixel_values`` and ``image_grid_thw``; by default tensors
            whose first dimension runs over images or patches so that samples concatenate along dim 0.
        infos: one dict per image with what the placeholder expansion needs (grid, number of crops, ...).
        cat_dims: the dimension each tensor concatenates along when samples are batched, where it is not 0
            (MiniCPM-V 4.6 packs every view's patches along the last dimension of one ``(1, C, P, L)`` tensor).
        pad_dims: a dimension along which each tensor is zero-padded at the end to the longest sample's size
            before concatenating (MiniCPM-V 2.6's per-view patch strips differ in length).
    """

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    infos: list[dict[str, Any]] = field(default_factory=list)
    cat_dims: dict[str, int] = field(default_factory=dict)
    pad_dims: dict[str, int] = field(default_factory=dict)

    @staticmethod
    def cat(parts: list[ImageBatch]) -> ImageBatch:
        """Concatenate the images of several samples in order (samples without images contribute nothing)."""
        parts = [p for p in parts if p.infos]
        if not parts:
            return ImageBatch()
        first = parts[0]
        tensors = {}
        for key in first.tensors:
            values = [p.tensors[key] for p in parts]
            if key in first.pad_dims:
                values = pad_to_longest(values, first.pad_dims[key])
            tensors[key] = torch.cat(values, dim=first.cat_dims.get(key, 0))
        infos = [i for p in parts for i in p.infos]
        return ImageBatch(tensors=tensors, infos=infos, cat_dims=dict(first.cat_dims), pad_dims=dict(first.pad_dims))


def pad_to_longest(tensors: list[torch.Tensor], dim: int) -> list[torch.Tensor]:
    """Zero-pad each tensor at the end of ``dim`` to the longest size among them."""
    size = max(t.shape[dim] for t in tensors)
    padded = []
    for tensor in tensors:
        if tensor.shape[dim] == size:
            padded.append(tensor)
            continue
        shape = list(tensor.shape)
        shape[dim] = size
        out = tensor.new_zeros(shape)
        out.narrow(dim, 0, tensor.shape[dim]).copy_(tensor)
        padded.append(out)
    return padded


@dataclass(frozen=True)
class LoraTargets:
    """Regular expressions (``re.fullmatch`` on module names) of the linears LoRA may wrap, per tower and kind.

    ``(\\d+)`` in a pattern captures the layer index; it is what "last N layers" selects on.
    """

    vision_attention: str
    vision_mlp: str
    language_attention: str
    language_mlp: str
    projector: str = ""

    def pattern(self, tower: str, kind: str) -> str:
        """The pattern for ``tower`` in ``("vision", "language")`` and ``kind`` in ``("attention", "mlp")``."""
        return getattr(self, f"{tower}_{kind}")


@dataclass(frozen=True)
class Family:
    """Everything vlmtune knows about one model family.

    Attributes:
        name: family name used in logs (``"qwen2_5_vl"``).
        model_types: the ``config.model_type`` values this family serves.
        towers: module-name prefixes per tower: ``{"vision": (...), "projector": (...), "language": (...)}``.
        lora_targets: where LoRA may go, by tower and kind (see :class:`LoraTargets`).
        image_placeholder: the string the chat template writes for one image.
        end_of_turn: the token that closes an assistant turn (supervised with the answer).
        process_images: ``(processor, images, options) -> ImageBatch``.
        expand_image: ``(processor, image_batch, index) -> str`` replacing one placeholder.
        batch_extras: ``(batch, image_batch, processor, model_config) -> dict`` of extra keys for the model.
        norm_kind / mlp_kind / rope_kind: what the kernels patch in the language tower.
        vision_attention_kind: ``"cu_seqlens"`` where the vision tower's attention runs over sequences
            delimited by ``cu_seqlens`` (Qwen-VL), which the ``vision_attention`` kernel op batches; ``None``
            leaves the vision attention as it is.
        vision_takes_image_batch: the vision tower is called as ``tower(pixel_values=(N, C, H, W))`` and treats
            each image on its own, so it can run a few images at a time (``TuningConfig.vision_micro_batch``).
        image_options: the user-settable image options and their defaults (documented per family).
        load_model: optional ``(path, **from_pretrained_kwargs) -> model`` for a family that needs more than
            ``AutoModelForImageTextToText`` (``None``): a layout transformers has no class for (MiniCPM-V 2.6 /
            4.x) or a forward to install after loading (MiniCPM-V 4.6's per-sample DeltaNet for packed rows).
        load_processor: optional ``(path) -> processor`` for layouts ``AutoProcessor`` cannot read; ``None``
            uses ``AutoProcessor``.
        pack: how attention stays inside each sample of a padding-free packed row (:mod:`vlmtune.data.packing`):
            ``(batch, images, lengths, collator, attn_implementation) -> dict`` of keys replacing or adding to
            those of the concatenated batch (``position_ids``, ``attention_mask`` ...). It must also supply every
            non-tensor key of the per-sample batches (``image_bound``, ``downsample_mode``), which do not
            concatenate. ``attn_implementation`` is the model's, or ``"varlen"`` where the kernels' language
            attention attends per sample from the row's boundaries (:mod:`vlmtune.kernels.hf.varlen`), so masks
            built on the host can be left out. ``None``: the family does not support packing.
        tiny: the builders of the family's tiny random checkpoints, one per ``model_type``
            (``(out_folder) -> None``; see :mod:`vlmtune.tiny`).
        vision_norm_kind: ``"layer_norm"`` where the vision tower (and projector) normalise with ``nn.LayerNorm``
            (SigLIP, Qwen2-VL / Qwen3-VL's ViT), which the ``layer_norm`` kernel op replaces; ``None`` leaves them.
        vision_mlp_kind: ``"fc"`` where the vision tower's MLPs are non-gated ``fc2(act(fc1(x)))`` (SigLIP,
            Qwen2-VL / Qwen3-VL's ViT), which the ``fc_mlp`` kernel op fuses; ``None`` leaves them. One descriptor
            may serve checkpoints of both layouts (Qwen2-VL and Qwen2.5-VL): the op finds MLPs by structure.
        layers: per tower, the pattern of one layer's module name (``model.language_model.layers.(\\d+)``): the
            units FSDP2 shards one at a time (:mod:`vlmtune.distributed.fsdp`) and :mod:`vlmtune.compile` compiles
            one by one (all of a tower's layers then share one graph). A tower left out is neither sharded per
            layer nor compiled (FSDP2 is refused, ``TrainConfig.compile`` warns and keeps it eager).
    """

    name: str
    model_types: tuple[str, ...]
    towers: Mapping[str, tuple[str, ...]]
    lora_targets: LoraTargets
    image_placeholder: str
    end_of_turn: str
    process_images: Callable[..., ImageBatch]
    expand_image: Callable[..., str]
    batch_extras: Callable[..., dict[str, torch.Tensor]]
    norm_kind: str
    mlp_kind: str
    rope_kind: str
    vision_attention_kind: str | None = None
    vision_takes_image_batch: bool = False
    image_options: Mapping[str, Any] = field(default_factory=dict)
    load_model: Callable[..., Any] | None = None
    load_processor: Callable[..., Any] | None = None
    pack: Callable[..., dict[str, Any]] | None = None
    tiny: Mapping[str, Callable[[Path], None]] = field(default_factory=dict)
    vision_norm_kind: str | None = None
    vision_mlp_kind: str | None = None
    layers: Mapping[str, str] = field(default_factory=dict)

    def tower_of(self, name: str) -> str | None:
        """The tower a parameter or module name belongs to, or ``None`` (``lm_head``, top-level norms ...)."""
        # Longest prefix wins: Qwen-VL's projector ``model.visual.merger`` sits inside the vision prefix.
        best, best_len = None, -1
        for tower, prefixes in self.towers.items():
            for prefix in prefixes:
                if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best_len:
                    best, best_len = tower, len(prefix)
        return best

    def lora_module_names(self, module_names: list[str], tower: str, kind: str) -> list[str]:
        """The names in ``module_names`` that the family tags as ``tower`` / ``kind`` LoRA targets."""
        regex = re.compile(self.lora_targets.pattern(tower, kind))
        return [n for n in module_names if regex.fullmatch(n) and self.tower_of(n) == tower]


def validate_image_options(family: Family, options: Mapping[str, Any]) -> dict[str, Any]:
    """Merge the user's image options over the family's defaults; unknown keys raise naming the valid ones."""
    unknown = sorted(set(options) - set(family.image_options))
    if unknown:
        raise ValueError(f"unknown image option(s) {unknown} for {family.name}; valid: {sorted(family.image_options)}")
    merged = dict(family.image_options)
    merged.update({k: v for k, v in options.items() if v is not None})
    return merged
