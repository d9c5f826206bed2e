"""The checkpoints ``python -m benchmarks.train_step`` loads: ``vlmtune.tiny``'s for the ``tiny-*`` models, and for the
real-size ones a random model built from the family's released config (``specs.MODELS``) with the tiny
checkpoint's tokenizer and chat template and the family's image processor at its real settings. One builder per
family returns ``(model class, config, processor)``; :func:`build_checkpoint` draws the weights and saves.
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.train_step.specs import MODELS, ModelSpec


def _real_qwen(spec: ModelSpec, tiny: Path):
    from transformers import (
        AutoConfig,
        AutoProcessor,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    small = AutoConfig.from_pretrained(tiny)
    ids = {k: getattr(small.text_config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    config = Qwen2_5_VLConfig(
        text_config=dict(spec.text, **ids),
        vision_config=spec.vision,
        image_token_id=small.image_token_id,
        video_token_id=small.video_token_id,
        vision_start_token_id=small.vision_start_token_id,
        vision_end_token_id=small.vision_end_token_id,
        **spec.top,
    )
    tiny_processor = AutoProcessor.from_pretrained(tiny)
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**spec.image_processor),
        tokenizer=tiny_processor.tokenizer,
        video_processor=Qwen2VLVideoProcessor(**spec.image_processor),
        chat_template=tiny_processor.chat_template,
    )
    return Qwen2_5_VLForConditionalGeneration, config, processor


def _real_gemma(spec: ModelSpec, tiny: Path):
    from transformers import (
        AutoConfig,
        AutoProcessor,
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessor,
        Gemma3Processor,
    )

    small = AutoConfig.from_pretrained(tiny)
    ids = {k: getattr(small.text_config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    config = Gemma3Config(
        text_config=dict(spec.text, **ids),
        vision_config=spec.vision,
        boi_token_index=small.boi_token_index,
        eoi_token_index=small.eoi_token_index,
        image_token_index=small.image_token_index,
        pad_token_id=small.pad_token_id,
        bos_token_id=small.bos_token_id,
        eos_token_id=small.eos_token_id,
        **spec.top,
    )
    tiny_processor = AutoProcessor.from_pretrained(tiny)
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessor(**spec.image_processor, resample=2),
        tokenizer=tiny_processor.tokenizer,
        chat_template=tiny_processor.chat_template,
        image_seq_length=spec.top["mm_tokens_per_image"],
    )
    return Gemma3ForConditionalGeneration, config, processor


def _real_minicpmv(spec: ModelSpec, tiny: Path):
    from transformers import PreTrainedTokenizerFast

    from vlmtune.families.minicpmv.configuration import MiniCPMVConfig
    from vlmtune.families.minicpmv.modeling import MiniCPMV
    from vlmtune.families.minicpmv.processing import MiniCPMVProcessor
    from vlmtune.loading import read_config

    small = read_config(tiny)
    ids = {k: getattr(small, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    config = MiniCPMVConfig(**spec.text, **ids, vision_config=spec.vision, **spec.top)
    processor = MiniCPMVProcessor(PreTrainedTokenizerFast.from_pretrained(tiny), **spec.image_processor)
    return MiniCPMV, config, processor


def _real_minicpmv4_6(spec: ModelSpec, tiny: Path):
    from transformers import (
        AutoConfig,
        AutoProcessor,
        MiniCPMV4_6Config,
        MiniCPMV4_6ForConditionalGeneration,
        MiniCPMV4_6ImageProcessor,
        MiniCPMV4_6Processor,
        MiniCPMV4_6VideoProcessor,
    )

    small = AutoConfig.from_pretrained(tiny)
    ids = {k: getattr(small.text_config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    config = MiniCPMV4_6Config(
        text_config=dict(spec.text, **ids),
        vision_config=spec.vision,
        image_token_id=small.image_token_id,
        video_token_id=small.video_token_id,
        **spec.top,
    )
    tiny_processor = AutoProcessor.from_pretrained(tiny)
    processor = MiniCPMV4_6Processor(
        image_processor=MiniCPMV4_6ImageProcessor(**spec.image_processor),
        video_processor=MiniCPMV4_6VideoProcessor(**spec.image_processor),
        tokenizer=tiny_processor.tokenizer,
        chat_template=tiny_processor.chat_template,
    )
    return MiniCPMV4_6ForConditionalGeneration, config, processor


REAL_BUILDERS = {
    "qwen2_5_vl": _real_qwen,
    "gemma3": _real_gemma,
    "minicpmv": _real_minicpmv,
    "minicpmv4_6": _real_minicpmv4_6,
}


def build_checkpoint(name: str, folder: Path, device: str) -> Path:
    """Write model ``name`` (a key of :data:`MODELS`) to ``folder`` once; later calls reuse it.

    Real-size weights are drawn on ``device`` in bf16 (drawing 8 B parameters on the CPU takes minutes).
    """
    import torch

    from vlmtune.tiny import build

    spec = MODELS[name]
    done = folder / "benchmark-checkpoint.json"
    if done.exists():
        return folder
    if not spec.real:
        build(spec.family, folder)
    else:
        model_class, config, processor = REAL_BUILDERS[spec.family](spec, build(spec.family, folder / "tiny"))
        torch.manual_seed(0)
        with torch.device(device):
            model = model_class._from_config(config, dtype=torch.bfloat16 if device != "cpu" else torch.float32)
        model.save_pretrained(folder, safe_serialization=True)
        processor.save_pretrained(folder)
        del model
    done.write_text(json.dumps({"model": name}) + "\n")
    return folder
