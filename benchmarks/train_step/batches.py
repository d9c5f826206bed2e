"""What every configuration of ``python -m benchmarks.train_step`` trains on: one batch per step, built once per model,
shape and batch size, and saved with ``torch.save`` for the configurations' processes to load.

The samples of each step are encoded once (vlmtune's :class:`~vlmtune.data.collator.Collator`), then collated
twice: right-padded (every configuration but the packed ones) and, on the real shape, packed into one
padding-free row (:class:`~vlmtune.data.packing.PackedCollator`, the ``*_packed`` configurations). A step's
packed row holds exactly the samples of that step's padded batch, so both train on the same tokens, images and
supervised labels, and differ in the pad tokens alone (see :func:`build_steps`).

Imports no torch at module level (the driver imports ``specs``, not this module, which keeps the rule all the same).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.train_step.specs import ANSWER_TOKENS, MODELS, PROMPT_TOKENS

if TYPE_CHECKING:
    import torch

    from vlmtune.data.collator import Collator, Encoded

PACKED_ATTENTION = ("sdpa", "varlen")
"""The attentions the packed rows are built for: ``"sdpa"``, the one ``vlmtune.load`` gives every configuration
(Gemma-3's packed masks are boolean for SDPA), and ``"varlen"``, what vlmtune's kernels attend packed rows with
(:func:`vlmtune.kernels.hf.rope.packed_attention`; Gemma-3's rows then carry no mask). A configuration trains on
the rows its model asks for, as ``vlmtune.train`` builds them."""
NO_PACKING_REASON = (
    "packing needs the real shape: the fixed shape's samples all have one length, so there is no padding to remove "
    "(run with --shape real)"
)


def _collator(folder: Path) -> Collator:
    from transformers import AutoConfig, AutoProcessor

    from vlmtune.data.collator import Collator
    from vlmtune.families import detect
    from vlmtune.families.minicpmv.modeling import register
    from vlmtune.loading import read_config

    adapter = detect(read_config(folder))
    # vlmtune.load registers its MiniCPM-V 2.6-layout config with the Auto classes on the way; so does this, for
    # AutoConfig to read such a folder (a no-op for every other family).
    register()
    processor = (adapter.load_processor or AutoProcessor.from_pretrained)(folder)
    return Collator(adapter, processor, AutoConfig.from_pretrained(folder), max_length=8192)


def fixed_samples(name: str, collator: Collator, batch: int, seed: int = 0) -> list[list[Encoded]]:
    """One step of ``batch`` fixed-shape samples: per sample one random-noise image, ``PROMPT_TOKENS`` text tokens
    before the answer (the chat template's own tokens included) and ``ANSWER_TOKENS`` supervised answer tokens.

    The prompt is the family's chat template rendering a user turn that holds the image, with the image
    placeholder expanded as the family's processor does; random ordinary token ids fill it up to
    ``PROMPT_TOKENS`` text tokens (MiniCPM-V's view markers alone exceed that at 5 views: then nothing is added),
    and the answer is random ordinary ids, all supervised.
    """
    import torch
    from PIL import Image

    from vlmtune.data.collator import IGNORE_INDEX, Encoded

    adapter, processor = collator.family, collator.processor
    tokenizer = processor.tokenizer
    image_ids = set(collator.image_token_ids())
    specials = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    ordinary = [i for i in range(len(tokenizer)) if i not in specials]
    rng = random.Random(seed)
    height, width = MODELS[name].image_size
    turn = [{"role": "user", "content": [{"type": "image"}]}]
    encoded = []
    for _ in range(batch):
        generator = torch.Generator().manual_seed(rng.getrandbits(31))
        noise = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=generator)
        images = adapter.process_images(processor, [Image.fromarray(noise.numpy())], collator.image_options)
        text = processor.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
        text = text.replace(adapter.image_placeholder, adapter.expand_image(processor, images, 0), 1)
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
        n_text = sum(1 for i in prompt if i not in image_ids)
        prompt += rng.choices(ordinary, k=max(0, PROMPT_TOKENS - n_text))
        answer = rng.choices(ordinary, k=ANSWER_TOKENS)
        labels = [IGNORE_INDEX] * len(prompt) + answer
        encoded.append(Encoded(input_ids=prompt + answer, labels=labels, images=images))
    return [encoded]


def real_samples(collator: Collator, data_dir: Path, batch: int, count: int, seed: int = 0) -> list[list[Encoded]]:
    """``count`` steps of ``batch`` generated LaTeX-OCR rows each, encoded by vlmtune's collator, in row order."""
    from vlmtune.data.latex_ocr import make_latex_ocr
    from vlmtune.data.spec import load_rows

    rows_needed = batch * count
    if not (data_dir / "train.parquet").exists():
        make_latex_ocr(rows_needed, data_dir, seed=seed, test_fraction=0.0)
    rows = load_rows("latex_ocr", split="train", path=data_dir)
    if len(rows) < rows_needed:
        raise ValueError(f"{data_dir} holds {len(rows)} rows, {rows_needed} needed; delete it to regenerate")
    encoded = [collator.encode(rows[i], i) for i in range(rows_needed)]
    return [encoded[b * batch : (b + 1) * batch] for b in range(count)]


def build_steps(name: str, folder: Path, shape: str, batch: int, count: int, cache: Path) -> dict[str, Any]:
    """The steps of one model, shape and batch size, ready for ``torch.save``.

    Returns:
        ``{"batches": [...], "packed": {attention: [...]} | None, "samples": [...], "images": [...]}``: per step
        the right-padded batch, the packed row of the same samples for each of ``PACKED_ATTENTION`` (real shape
        only, else ``None``), and how many
        samples and images the step holds (counted on the encoded samples, so a family whose pixel tensors run
        over views or crops still counts images).

    The packed row of a step holds the step's samples, not a token budget's worth: tokens, images, supervised
    labels and the optimiser steps stay those of the padded configurations, so tokens/s compares like with like
    and the first losses agree (same mean over the same supervised tokens); only the pad tokens go. A budget
    (``TrainConfig(packing=True)``) would regroup samples across steps and change all of those at once.
    """
    collator = _collator(folder)
    if shape == "fixed":
        steps = fixed_samples(name, collator, batch)
    else:
        steps = real_samples(collator, cache / f"latex_ocr_{batch * count}", batch, count)
    batches = [collator.pad(samples) for samples in steps]
    packed = None
    if shape == "real":
        from vlmtune.data.packing import PackedCollator

        packed = {
            attn: [PackedCollator(collator, attn_implementation=attn).pack(samples) for samples in steps]
            for attn in PACKED_ATTENTION
        }
        for step, (padded, row) in enumerate(zip(batches, packed["sdpa"], strict=True)):
            if row["input_ids"].numel() != int(padded["attention_mask"].sum()):
                raise ValueError(
                    f"step {step}: the packed row has {row['input_ids'].numel()} tokens, the padded batch "
                    f"{int(padded['attention_mask'].sum())} non-pad tokens"
                )
    return {
        "batches": batches,
        "packed": packed,
        "samples": [len(samples) for samples in steps],
        "images": [sum(len(e.images.infos) for e in samples) for samples in steps],
    }


def describe(steps: dict[str, Any]) -> dict[str, Any]:
    """Token and image counts of :func:`build_steps`' output (non-pad tokens only)."""
    batches: list[dict[str, torch.Tensor]] = steps["batches"]
    out = {
        "batches": len(batches),
        "batch_size": int(batches[0]["input_ids"].shape[0]),
        "tokens_per_batch": [int(b["attention_mask"].sum()) for b in batches],
        "padded_tokens_per_batch": [int(b["attention_mask"].numel()) for b in batches],
        "supervised_tokens_per_batch": [int((b["labels"] != -100).sum()) for b in batches],
        "images_per_batch": steps["images"],
        "keys": sorted(batches[0]),
    }
    if steps["packed"] is not None:
        out["packed_tokens_per_batch"] = [int(row["input_ids"].numel()) for row in steps["packed"]["sdpa"]]
        out["packed_keys"] = {attn: sorted(rows[0]) for attn, rows in steps["packed"].items()}
    return out
