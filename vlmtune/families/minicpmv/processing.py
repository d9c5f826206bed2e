"""The processor of MiniCPM-V 2.6 / 4.x checkpoints in the released layout, which transformers has no class for.

:class:`MiniCPMVProcessor` is built on the checkpoint's own tokenizer and :mod:`vlmtune.families.minicpmv.image`;
it renders conversations the way the published ``chat()`` does (see the family's docstring).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import BatchFeature, PreTrainedTokenizerFast

from vlmtune.families.base import ImageBatch, pad_to_longest
from vlmtune.families.minicpmv import image as minicpmv_image

IMAGE_TAG = "(<image>./</image>)"
TOKENS = minicpmv_image.MiniCPMVImageTokens()
SLICE_FIELDS = ("max_slice_nums", "scale_resolution", "patch_size", "slice_mode", "use_image_id", "query_num")


class MiniCPMVProcessor:
    """Tokenizer + slicing settings of a MiniCPM-V 2.6-layout checkpoint (the published processor's job).

    Args:
        tokenizer: the checkpoint's tokenizer, with MiniCPM-V's markers and a chat template.
        max_slice_nums / scale_resolution / patch_size: slicing (9 / 448 / 14 in the released checkpoints).
        slice_mode: ``False`` serves every image as one view.
        use_image_id: prefix each placeholder with ``<image_id>N</image_id>`` (N counts images per sample).
        query_num: resampler queries, i.e. tokens per view (64).
    """

    def __init__(
        self,
        tokenizer,
        max_slice_nums: int = 9,
        scale_resolution: int = 448,
        patch_size: int = 14,
        slice_mode: bool = True,
        use_image_id: bool = True,
        query_num: int = 64,
    ):
        vocab = tokenizer.get_vocab()
        missing = [t for t in vars(TOKENS).values() if t not in vocab]
        if missing:
            raise ValueError(f"the tokenizer lacks MiniCPM-V's marker token(s) {missing}; is this a MiniCPM-V folder?")
        self.tokenizer = tokenizer
        self.max_slice_nums, self.scale_resolution, self.patch_size = max_slice_nums, scale_resolution, patch_size
        self.slice_mode, self.use_image_id, self.query_num = slice_mode, use_image_id, query_num
        # The <unk> query filler is what the resampler's outputs replace: the collator never supervises it.
        self.image_token_id = tokenizer.convert_tokens_to_ids(TOKENS.unk)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> MiniCPMVProcessor:
        """Tokenizer from ``path``; slicing from ``config.json``, overridden by ``preprocessor_config.json``."""
        path = Path(path)
        fields: dict[str, Any] = {}
        if (path / "config.json").exists():
            config = json.loads((path / "config.json").read_text())
            fields.update({k: v for k, v in (config.get("slice_config") or {}).items() if k in SLICE_FIELDS})
            fields.update({k: config[k] for k in ("slice_mode", "use_image_id", "query_num") if k in config})
            if "patch_size" in (config.get("vision_config") or {}):
                fields["patch_size"] = config["vision_config"]["patch_size"]
        if (path / "preprocessor_config.json").exists():
            saved = json.loads((path / "preprocessor_config.json").read_text())
            fields.update({k: v for k, v in saved.items() if k in SLICE_FIELDS})
        # Released folders name a remote-code tokenizer class; the fast tokenizer file is all that class wraps.
        return cls(PreTrainedTokenizerFast.from_pretrained(path), **fields)

    def save_pretrained(self, out: str | Path) -> None:
        """Write the tokenizer (with its chat template) and ``preprocessor_config.json`` with the slicing."""
        out = Path(out)
        self.tokenizer.save_pretrained(out)
        fields = {k: getattr(self, k) for k in SLICE_FIELDS}
        (out / "preprocessor_config.json").write_text(json.dumps(fields, indent=2) + "\n")

    def apply_chat_template(self, messages: list[dict], tokenize: bool = False, **kwargs):
        """The published ``chat()`` rendering: parts joined by ``"\\n"``, images as ``(<image>./</image>)``."""
        flat = []
        for message in messages:
            content = message["content"]
            if not isinstance(content, str):
                content = "\n".join(IMAGE_TAG if p.get("type") == "image" else p.get("text") or "" for p in content)
            flat.append({"role": message["role"], "content": content})
        return self.tokenizer.apply_chat_template(flat, tokenize=tokenize, **kwargs)

    def process_image(self, image, index: int, options: dict[str, Any]) -> dict:
        """One image's views, ``tgt_sizes`` and placeholder text (``index``: its number within the sample).

        ``options`` (``max_slice_nums``, ``scale_resolution``, ``slice_mode``, ``use_image_id``) override the
        checkpoint's settings where not ``None``.
        """
        settings = {k: getattr(self, k) for k in SLICE_FIELDS}
        settings.update({k: v for k, v in options.items() if v is not None})
        return minicpmv_image.process_image(
            image,
            max_slice_nums=settings["max_slice_nums"],
            scale_resolution=settings["scale_resolution"],
            patch_size=self.patch_size,
            never_split=not settings["slice_mode"],
            image_idx=index,
            use_image_id=settings["use_image_id"],
            query_num=self.query_num,
            tokens=TOKENS,
        )

    def __call__(self, text: list[str], images: list[list] | None = None, return_tensors: str = "pt", **options):
        """Inputs for generation from chat-rendered prompts (one per sample) and each sample's images, left-padded:
        ``input_ids``, ``attention_mask``, ``pixel_values``, ``tgt_sizes``, ``image_bound``."""
        options.pop("add_special_tokens", None)
        images = images or [[] for _ in text]
        prompts, parts = [], []
        for sample, (prompt, sample_images) in enumerate(zip(text, images, strict=True)):
            pieces = prompt.split(IMAGE_TAG)
            if len(pieces) - 1 != len(sample_images):
                raise ValueError(
                    f"prompt {sample} has {len(pieces) - 1} image tag(s) for {len(sample_images)} image(s)"
                )
            batch = process_images(self, sample_images, options)
            expanded = [pieces[0]]
            for info, rest in zip(batch.infos, pieces[1:], strict=True):
                expanded += [info["placeholder"], rest]
            prompts.append("".join(expanded))
            parts.append(batch)
        self.tokenizer.padding_side = "left"
        encoded = self.tokenizer(prompts, padding=True, add_special_tokens=False, return_tensors=return_tensors)
        data = {**encoded, **ImageBatch.cat(parts).tensors}
        data["image_bound"] = image_bounds(self.tokenizer, data["input_ids"])
        return BatchFeature(data)

    def decode(self, *args, **kwargs) -> str:
        return self.tokenizer.decode(*args, **kwargs)

    def batch_decode(self, *args, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)


def process_images(processor: MiniCPMVProcessor, images: list, options: dict[str, Any]) -> ImageBatch:
    """Slice and normalise one sample's images; strips zero-padded to the longest view."""
    infos, strips, sizes = [], [], []
    for index, image in enumerate(images):
        out = processor.process_image(image, index, options)
        strips += out["pixel_values"]
        sizes.append(out["tgt_sizes"])
        infos.append({"grid": out["grid"], "tgt_sizes": out["tgt_sizes"], "placeholder": out["placeholder"]})
    if not infos:
        return ImageBatch()
    pixel_values = torch.stack(pad_to_longest(strips, -1))
    tensors = {"pixel_values": pixel_values, "tgt_sizes": torch.cat(sizes)}
    return ImageBatch(tensors=tensors, infos=infos, pad_dims={"pixel_values": -1})


def image_bounds(tokenizer, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """One ``(k, 2)`` tensor of ``[start, end)`` ranges between image / slice markers per row of ``input_ids``."""
    starts = tokenizer.convert_tokens_to_ids([TOKENS.image_start, TOKENS.slice_start])
    ends = tokenizer.convert_tokens_to_ids([TOKENS.image_end, TOKENS.slice_end])
    return [minicpmv_image.image_bound(row, starts, ends) for row in input_ids]
