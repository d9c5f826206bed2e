"""What ``benchmarks/train_step.py`` measures: the models (random checkpoints of real size), the configurations
(how each stack sets a model up) and the batches (fixed and real shapes). Imports no torch at module level, so
the driver stays light; the work happens in its child processes.

A real-size checkpoint is a random model built from the family's published config (dimensions below), saved
once per machine with a processor, so every configuration loads it the way a user loads a download
(``from_pretrained``, with a bitsandbytes config for QLoRA). The tokenizer and chat template are
``vlmtune.tiny``'s (the family's real special tokens, a small BPE vocabulary): token ids only matter for
shapes, and the model's embedding keeps the real vocabulary size, so the embedding, ``lm_head`` and loss cost
what they cost on the released model. The image processor is the family's real one at its real settings.

Batches are made once, before any configuration runs, and every configuration trains on the same tensors.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

PROMPT_TOKENS = 24
"""Fixed shape: text tokens before the answer (chat template included), image tokens not counted."""
ANSWER_TOKENS = 128
"""Fixed shape: supervised answer tokens per sample."""
HF_PROCESSOR_KEYS = frozenset(
    {"input_ids", "attention_mask", "labels", "pixel_values", "image_grid_thw", "mm_token_type_ids", "token_type_ids"}
)
"""The batch keys the family's transformers processor produces (plus labels): what the baseline and Unsloth
get. vlmtune's collator adds ``position_ids`` for Qwen-VL (M-RoPE positions computed on the host, in the data
loader) and vlmtune configurations get them."""


@dataclass(frozen=True)
class ModelSpec:
    """One benchmark model.

    Attributes:
        family: the ``vlmtune.tiny`` family whose tokenizer, chat template and token ids are reused.
        text: text-config keyword arguments of the real model (``None``: the tiny checkpoint as it is).
        vision: vision-config keyword arguments of the real model.
        top: top-level config keyword arguments (tying, tokens per image).
        image_size: (height, width) of the fixed shape's images.
        image_processor: keyword arguments of the family's image processor at its real settings.
        lora_suffixes: the public recipes' suffix list for LoRA on attention + MLP of both towers.
        language_only_regex: the same placement restricted to the language tower (vision frozen).
    """

    family: str
    text: dict[str, Any] | None
    vision: dict[str, Any] | None
    top: dict[str, Any] = field(default_factory=dict)
    image_size: tuple[int, int] = (448, 448)
    image_processor: dict[str, Any] = field(default_factory=dict)
    lora_suffixes: tuple[str, ...] = ()
    language_only_regex: str = ""

    @property
    def real(self) -> bool:
        return self.text is not None


_LANGUAGE_ONLY = r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
_QWEN_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv", "attn.proj")
_GEMMA_SUFFIXES = (
    *("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    *("out_proj", "fc1", "fc2"),
)
# Qwen2.5-VL's vision tower is the same in the 3B, 7B and 72B releases (config.json of Qwen/Qwen2.5-VL-*).
_QWEN_VISION = dict(
    depth=32,
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31],
    tokens_per_second=2,
    hidden_act="silu",
)
# The released Qwen2.5-VL preprocessor_config.json: min_pixels 56*56, max_pixels 14*14*4*16384.
_QWEN_PIXELS = dict(min_pixels=3136, max_pixels=12845056)
_QWEN_TEXT = dict(
    rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
    max_position_embeddings=128000,
    rms_norm_eps=1e-6,
    hidden_act="silu",
)

MODELS: dict[str, ModelSpec] = {
    "qwen2_5_vl-7b": ModelSpec(
        family="qwen2_5_vl",
        text=dict(
            _QWEN_TEXT,
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
        ),
        vision=dict(_QWEN_VISION, out_hidden_size=3584),
        top=dict(tie_word_embeddings=False),
        image_size=(448, 448),
        image_processor=_QWEN_PIXELS,
        lora_suffixes=_QWEN_SUFFIXES,
        language_only_regex=_LANGUAGE_ONLY,
    ),
    "qwen2_5_vl-3b": ModelSpec(
        family="qwen2_5_vl",
        text=dict(
            _QWEN_TEXT,
            vocab_size=151936,
            hidden_size=2048,
            intermediate_size=11008,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=2,
        ),
        vision=dict(_QWEN_VISION, out_hidden_size=2048),
        top=dict(tie_word_embeddings=True),
        image_size=(448, 448),
        image_processor=_QWEN_PIXELS,
        lora_suffixes=_QWEN_SUFFIXES,
        language_only_regex=_LANGUAGE_ONLY,
    ),
    "gemma3-4b": ModelSpec(
        family="gemma3",
        text=dict(
            vocab_size=262208,
            hidden_size=2560,
            intermediate_size=10240,
            num_hidden_layers=34,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=256,
            query_pre_attn_scalar=256,
            sliding_window=1024,
            # Every sixth layer attends globally (sliding_window_pattern 6 in google/gemma-3-4b-it).
            layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(34)],
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            },
            max_position_embeddings=131072,
            rms_norm_eps=1e-6,
        ),
        vision=dict(
            model_type="siglip_vision_model",
            hidden_size=1152,
            intermediate_size=4304,
            num_hidden_layers=27,
            num_attention_heads=16,
            image_size=896,
            patch_size=14,
            vision_use_head=False,
        ),
        top=dict(mm_tokens_per_image=256, tie_word_embeddings=True),
        image_size=(896, 896),
        image_processor=dict(size={"height": 896, "width": 896}, image_mean=[0.5] * 3, image_std=[0.5] * 3),
        lora_suffixes=_GEMMA_SUFFIXES,
        language_only_regex=_LANGUAGE_ONLY,
    ),
    "tiny-qwen": ModelSpec(
        family="qwen2_5_vl",
        text=None,
        vision=None,
        image_size=(112, 112),
        lora_suffixes=_QWEN_SUFFIXES,
        language_only_regex=_LANGUAGE_ONLY,
    ),
    "tiny-gemma": ModelSpec(
        family="gemma3",
        text=None,
        vision=None,
        image_size=(64, 64),
        lora_suffixes=_GEMMA_SUFFIXES,
        language_only_regex=_LANGUAGE_ONLY,
    ),
}


# ----------------------------------------------------------------------------------------- configurations


@dataclass(frozen=True)
class BenchConfig:
    """One way of setting a model up for LoRA training.

    Attributes:
        stack: ``"hf"`` (transformers + peft + bitsandbytes as the public recipes do it), ``"unsloth"`` or
            ``"vlmtune"``.
        quant: QLoRA (4-bit NF4 base) rather than bf16 LoRA.
        upcast: the baseline's ``prepare_model_for_kbit_training`` (every non-4-bit weight upcast to fp32).
        liger: Liger-Kernel's patch for the family, applied to the loaded model.
        kernels: vlmtune's Triton kernels (``vlmtune.kernels.patch.apply_kernels``).
        offload: vlmtune's activation offload (``TuningConfig(offload_activations=True)``).
        lora_dtype: vlmtune's ``TuningConfig.lora_dtype`` (``"float32"`` or ``"compute"``).
        vision_micro_batch: vlmtune's ``TuningConfig.vision_micro_batch`` (images per vision-tower pass).
        summary: one line for BENCHMARKS.md.
    """

    stack: str
    quant: bool
    summary: str
    upcast: bool = False
    liger: bool = False
    kernels: bool = False
    offload: bool = False
    lora_dtype: str = "float32"
    vision_micro_batch: int | None = None

    @property
    def needs_cuda(self) -> bool:
        return self.quant or self.liger or self.kernels or self.stack == "unsloth"


CONFIGS: dict[str, BenchConfig] = {
    "hf_qlora": BenchConfig(
        "hf", True, "transformers + peft + bitsandbytes QLoRA, prepare_model_for_kbit_training", upcast=True
    ),
    "hf_qlora_noupcast": BenchConfig("hf", True, "the same without prepare_model_for_kbit_training (no fp32 upcast)"),
    "hf_qlora_liger": BenchConfig(
        "hf", True, "hf_qlora + Liger-Kernel's patch for the family", upcast=True, liger=True
    ),
    "hf_bf16": BenchConfig("hf", False, "transformers + peft bf16 LoRA"),
    "unsloth": BenchConfig("unsloth", True, "Unsloth FastVisionModel QLoRA, gradient checkpointing 'unsloth'"),
    "unsloth_bf16": BenchConfig("unsloth", False, "Unsloth FastVisionModel bf16 LoRA"),
    "vlmtune_qlora": BenchConfig("vlmtune", True, "vlmtune.load(nf4) + apply_tuning, kernels off"),
    "vlmtune_qlora_kernels": BenchConfig("vlmtune", True, "vlmtune QLoRA with vlmtune's Triton kernels", kernels=True),
    "vlmtune_qlora_kernels_offload": BenchConfig(
        "vlmtune",
        True,
        "vlmtune's lean-memory setting: QLoRA, kernels on, checkpointed activations offloaded to CPU, the vision "
        "tower on 2 images at a time where the family allows (Gemma-3)",
        kernels=True,
        offload=True,
        vision_micro_batch=2,
    ),
    "vlmtune_qlora_kernels_offload_bf16lora": BenchConfig(
        "vlmtune",
        True,
        "vlmtune QLoRA, kernels on, offload, LoRA weights in bf16 (lora_dtype='compute')",
        kernels=True,
        offload=True,
        lora_dtype="compute",
    ),
    "vlmtune_qlora_kernels_micro": BenchConfig(
        "vlmtune",
        True,
        "vlmtune QLoRA, kernels on, the vision tower on 2 images at a time (vision_micro_batch=2)",
        kernels=True,
        vision_micro_batch=2,
    ),
    "vlmtune_bf16": BenchConfig("vlmtune", False, "vlmtune bf16 LoRA, kernels off"),
    "vlmtune_bf16_kernels": BenchConfig("vlmtune", False, "vlmtune bf16 LoRA with kernels", kernels=True),
}
VISION_MODES = ("lora", "frozen")


@dataclass(frozen=True)
class Suite:
    """A fixed set of runs of one model in one call of ``train_step.py --suite NAME``.

    Attributes:
        configs: the configurations, in the order they run (the ones that matter most first: a spent
            ``time_budget`` skips the last).
        profile: the configurations that also profile one step after their timed ones (``--profile``).
        warmup: untimed steps before the timed ones.
        steps: timed steps.
        time_budget: seconds for the whole call, checkpoint building included (``--time-budget``).
    """

    configs: tuple[str, ...]
    profile: tuple[str, ...]
    warmup: int = 2
    steps: int = 3
    time_budget: float | None = None


_PROFILED = ("vlmtune_qlora_kernels", "hf_qlora")
# "final": three models in one device call of under 8 minutes (budgets 150 + 125 + 190 s): ours and the
# baseline, both profiled, on each model, plus the no-upcast and bf16 comparisons on Qwen2.5-VL-3B. Sized on
# the H100 records of 2026-11-22: building and saving a checkpoint 7-26 s (prepare 13-30 s), one
# configuration's process 26-40 s with 6 steps, to which the profiled step and its summary add ~10 s.
SUITES: dict[str, dict[str, Suite]] = {
    "final": {
        "qwen2_5_vl-7b": Suite(_PROFILED, _PROFILED, time_budget=150),
        "gemma3-4b": Suite(_PROFILED, _PROFILED, time_budget=125),
        "qwen2_5_vl-3b": Suite(
            (*_PROFILED, "hf_qlora_noupcast", "vlmtune_bf16_kernels", "hf_bf16"), _PROFILED, time_budget=190
        ),
        # The CPU stand-in (tests): the bf16 pair, both profiled.
        "tiny-qwen": Suite(("vlmtune_bf16", "hf_bf16"), ("vlmtune_bf16", "hf_bf16"), warmup=1, steps=1),
        "tiny-gemma": Suite(("vlmtune_bf16", "hf_bf16"), ("vlmtune_bf16", "hf_bf16"), warmup=1, steps=1),
    },
}


def split_name(name: str) -> tuple[str, str | None]:
    """``"vlmtune_qlora:frozen"`` → ``("vlmtune_qlora", "frozen")``; no suffix → ``(name, None)``."""
    base, _, vision = name.partition(":")
    if base not in CONFIGS:
        raise ValueError(f"unknown configuration {base!r}; choose from {sorted(CONFIGS)}")
    if vision and vision not in VISION_MODES:
        raise ValueError(f"{name!r}: the suffix after ':' must be one of {VISION_MODES}")
    return base, vision or None


# ------------------------------------------------------------------------------------------------ checkpoints


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


_REAL_BUILDERS = {"qwen2_5_vl": _real_qwen, "gemma3": _real_gemma}


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
        model_class, config, processor = _REAL_BUILDERS[spec.family](spec, build(spec.family, folder / "tiny"))
        torch.manual_seed(0)
        with torch.device(device):
            model = model_class._from_config(config, dtype=torch.bfloat16 if device != "cpu" else torch.float32)
        model.save_pretrained(folder, safe_serialization=True)
        processor.save_pretrained(folder)
        del model
    done.write_text(json.dumps({"model": name}) + "\n")
    return folder


# ----------------------------------------------------------------------------------------------------- batches


def _collator(folder: Path):
    from transformers import AutoConfig, AutoProcessor

    from vlmtune.adapters import detect
    from vlmtune.data.collator import Collator

    config = AutoConfig.from_pretrained(folder)
    adapter = detect(config)
    processor = AutoProcessor.from_pretrained(folder)
    return Collator(adapter, processor, config, max_length=8192), adapter, processor


def fixed_batches(name: str, folder: Path, batch: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """One fixed-shape batch: per sample one random-noise image, ``PROMPT_TOKENS`` text tokens before the
    answer (the chat template's own tokens included) and ``ANSWER_TOKENS`` supervised answer tokens.

    The prompt is the family's chat template rendering a user turn that holds the image, with the image
    placeholder expanded as the family's processor does; random ordinary token ids fill it up to
    ``PROMPT_TOKENS`` text tokens, and the answer is random ordinary ids, all supervised.
    """
    import torch
    from PIL import Image

    from vlmtune.data.collator import IGNORE_INDEX, Encoded

    collator, adapter, processor = _collator(folder)
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
    return [collator.pad(encoded)]


def real_batches(folder: Path, data_dir: Path, batch: int, count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``count`` batches of generated LaTeX-OCR rows through vlmtune's collator (right padding, as it pads)."""
    from vlmtune.data.latex_ocr import make_latex_ocr
    from vlmtune.data.spec import load_rows

    rows_needed = batch * count
    if not (data_dir / "train.parquet").exists():
        make_latex_ocr(rows_needed, data_dir, seed=seed, test_fraction=0.0)
    rows = load_rows("latex_ocr", split="train", path=data_dir)
    if len(rows) < rows_needed:
        raise ValueError(f"{data_dir} holds {len(rows)} rows, {rows_needed} needed; delete it to regenerate")
    collator, _, _ = _collator(folder)
    items = [{"index": i, "row": rows[i]} for i in range(rows_needed)]
    return [collator(items[b * batch : (b + 1) * batch]) for b in range(count)]


def describe(batches: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Token and image counts of a batch list (non-pad tokens only)."""
    tokens = [int(b["attention_mask"].sum()) for b in batches]
    padded = [int(b["attention_mask"].numel()) for b in batches]
    supervised = [int((b["labels"] != -100).sum()) for b in batches]
    return {
        "batches": len(batches),
        "batch_size": int(batches[0]["input_ids"].shape[0]),
        "tokens_per_batch": tokens,
        "padded_tokens_per_batch": padded,
        "supervised_tokens_per_batch": supervised,
        "keys": sorted(batches[0]),
    }
