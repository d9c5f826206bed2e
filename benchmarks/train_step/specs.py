"""What ``python -m benchmarks.train_step`` measures: the models (random checkpoints of real size) and the
configurations (how each stack sets a model up); the batches are ``batches.py``'s. Imports no torch at module
level, so the driver stays light; the work happens in its child processes.

A real-size checkpoint is a random model built from the family's published config (dimensions below; built by
``checkpoints.py``), saved once per machine with a processor, so every configuration loads it the way
a user loads a download (``from_pretrained``, with a bitsandbytes config for QLoRA). The tokenizer and chat
template are ``vlmtune.tiny``'s (the family's real special tokens, a small BPE vocabulary): token ids only matter
for shapes, and the model's embedding keeps the real vocabulary size, so the embedding, ``lm_head`` and loss cost
what they cost on the released model. The image processor is the family's real one at its real settings.

Batches are made once, before any configuration runs, and every configuration trains on the same tensors
(the packed configurations on the same samples, packed: ``batches.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

PROMPT_TOKENS = 24
"""Fixed shape: text tokens before the answer (chat template included), image tokens not counted."""
ANSWER_TOKENS = 128
"""Fixed shape: supervised answer tokens per sample."""
HF_PROCESSOR_KEYS = frozenset(
    {
        *("input_ids", "attention_mask", "labels", "pixel_values", "image_grid_thw", "mm_token_type_ids"),
        *("token_type_ids", "target_sizes"),
    }
)
"""The batch keys the family's transformers processor produces (plus labels): what the baseline and Unsloth
get (``target_sizes``: MiniCPM-V 4.6's view grids). vlmtune's collator adds ``position_ids`` for Qwen-VL (M-RoPE
positions computed on the host, in the data loader) and vlmtune configurations get them."""


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
        unsupported: stacks that cannot run this family (``"hf"``, ``"unsloth"``), each with the reason its
            configurations report as ``n/a``.
    """

    family: str
    text: dict[str, Any] | None
    vision: dict[str, Any] | None
    top: dict[str, Any] = field(default_factory=dict)
    image_size: tuple[int, int] = (448, 448)
    image_processor: dict[str, Any] = field(default_factory=dict)
    lora_suffixes: tuple[str, ...] = ()
    language_only_regex: str = ""
    unsupported: dict[str, str] = field(default_factory=dict)

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
# SigLIP so400m at patch 14 on a 980-px position table: the vision tower of MiniCPM-V 2.6 (its config.json's
# vision_config, vlmtune.families.minicpmv.configuration.DEFAULT_VISION_CONFIG) and of 4.6 (SigLIP2-400M, same
# dimensions).
_SIGLIP_400M = dict(
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=27,
    num_attention_heads=16,
    patch_size=14,
    image_size=980,
)
# MiniCPM-V's released slicing: up to 9 slices of about 448x448 px besides the source view, patch 14.
_MINICPMV_SLICING = dict(max_slice_nums=9, scale_resolution=448, patch_size=14)
# The suffix list also hits the in-tower window merger's attention (vision_tower.vit_merger.self_attn.*): 4 LoRA
# modules more than vlmtune's vision = "lora", which counts that merger as projector.
_MINICPMV4_6_SUFFIXES = (
    *("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    *("in_proj_qkv", "in_proj_z", "out_proj", "fc1", "fc2"),
)
_MINICPMV4_6_LANGUAGE_ONLY = (
    r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|linear_attn\.(in_proj_qkv|in_proj_z|out_proj)"
    r"|mlp\.(gate|up|down)_proj)"
)
_REMOTE_CODE_ONLY = (
    "the MiniCPM-V 2.6 layout (model_type 'minicpmv') has no transformers class, only the checkpoint's remote "
    "code (trust_remote_code), which this benchmark does not run; vlmtune serves it with its own model class"
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
    # openbmb/MiniCPM-V-2_6 config.json: Qwen2-7B inside (flat fields), SigLIP-400M with its last layer kept
    # (drop_vision_last_layer false), a 64-query resampler (28 heads: hidden // 128).
    "minicpmv2_6-8b": ModelSpec(
        family="minicpmv",
        text=dict(
            vocab_size=151666,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            max_position_embeddings=32768,
            rope_theta=1e6,
            rms_norm_eps=1e-6,
            hidden_act="silu",
        ),
        vision=_SIGLIP_400M,
        top=dict(
            version=2.6,
            query_num=64,
            image_size=448,
            slice_mode=True,
            slice_config={"max_slice_nums": 9, "scale_resolution": 448},
            use_image_id=True,
            drop_vision_last_layer=False,
            tie_word_embeddings=False,
        ),
        # 896 px: the source view and 2x2 slices of 448 px, 5 x 64 = 320 image tokens.
        image_size=(896, 896),
        image_processor=_MINICPMV_SLICING,
        unsupported={"hf": _REMOTE_CODE_ONLY, "unsloth": _REMOTE_CODE_ONLY},
    ),
    # openbmb/MiniCPM-V-4.6 config.json (as mirrored by mlx-community/MiniCPM-V-4.6-*): Qwen3.5-0.8B inside
    # (24 layers, Gated DeltaNet x3 : full attention x1, head_dim 256, tied head, vocabulary 248094),
    # SigLIP2-400M with the window-attention merger after layer 6, 16x downsampling by default.
    "minicpmv4_6-1.3b": ModelSpec(
        family="minicpmv4_6",
        text=dict(
            model_type="qwen3_5_text",
            vocab_size=248094,
            hidden_size=1024,
            intermediate_size=3584,
            num_hidden_layers=24,
            layer_types=["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(24)],
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=256,
            linear_num_key_heads=16,
            linear_num_value_heads=16,
            linear_key_head_dim=128,
            linear_value_head_dim=128,
            linear_conv_kernel_dim=4,
            max_position_embeddings=262144,
            rms_norm_eps=1e-6,
            # Qwen3.5's RoPE: a quarter of each head, interleaved M-RoPE sections (Qwen/Qwen3.5-0.8B config.json).
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 1e7,
                "partial_rotary_factor": 0.25,
                "mrope_section": [11, 11, 10],
                "mrope_interleaved": True,
            },
            tie_word_embeddings=True,
        ),
        vision=_SIGLIP_400M,
        top=dict(insert_layer_id=6, image_size=448, downsample_mode="16x", tie_word_embeddings=True),
        # 896 px: the source view and 2x2 slices of 448 px, 5 x 64 = 320 image tokens at 16x.
        image_size=(896, 896),
        image_processor=_MINICPMV_SLICING,
        lora_suffixes=_MINICPMV4_6_SUFFIXES,
        language_only_regex=_MINICPMV4_6_LANGUAGE_ONLY,
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
    # The tiny builders' views are about 112 px: 224 px makes the source view and 2x2 slices, as 896 px does at
    # real size.
    "tiny-minicpmv": ModelSpec(
        family="minicpmv",
        text=None,
        vision=None,
        image_size=(224, 224),
        unsupported={"hf": _REMOTE_CODE_ONLY, "unsloth": _REMOTE_CODE_ONLY},
    ),
    "tiny-minicpmv4_6": ModelSpec(
        family="minicpmv4_6",
        text=None,
        vision=None,
        image_size=(224, 224),
        lora_suffixes=_MINICPMV4_6_SUFFIXES,
        language_only_regex=_MINICPMV4_6_LANGUAGE_ONLY,
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
        vision_checkpointing: vlmtune's ``TuningConfig.vision_checkpointing`` (``"attention"``: keep the
            attention outputs through the recomputation).
        compile: vlmtune's ``TrainConfig.compile`` (``"language"``, ``"vision"``, ``"both"``): the towers' layers
            compiled one by one (``vlmtune.compile.compile_layers``) after the kernels are applied.
        packed: train on each step's samples packed into one padding-free row (``vlmtune.data.packing``) instead
            of the padded batch; real shape only (``batches.build_steps`` says why this is the
            like-for-like comparison).
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
    vision_checkpointing: bool | str = True
    packed: bool = False
    compile: str = "off"

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
    "vlmtune_qlora_kernels_offload_only": BenchConfig(
        "vlmtune",
        True,
        "vlmtune QLoRA, kernels on, checkpointed activations offloaded to CPU (the whole batch per vision pass)",
        kernels=True,
        offload=True,
    ),
    "vlmtune_qlora_kernels_keep_attention": BenchConfig(
        "vlmtune",
        True,
        "vlmtune QLoRA, kernels on, the vision layers' attention outputs kept through the recomputation",
        kernels=True,
        vision_checkpointing="attention",
    ),
    "vlmtune_qlora_kernels_micro": BenchConfig(
        "vlmtune",
        True,
        "vlmtune QLoRA, kernels on, the vision tower on 2 images at a time (vision_micro_batch=2)",
        kernels=True,
        vision_micro_batch=2,
    ),
    "vlmtune_qlora_kernels_packed": BenchConfig(
        "vlmtune",
        True,
        "vlmtune QLoRA, kernels on, each step's samples packed into one padding-free row (real shape)",
        kernels=True,
        packed=True,
    ),
    **{
        f"vlmtune_qlora_kernels_compile_{towers}": BenchConfig(
            "vlmtune", True, f"vlmtune QLoRA, kernels on, {towers} layers compiled", kernels=True, compile=towers
        )
        for towers in ("language", "vision", "both")
    },
    "vlmtune_bf16": BenchConfig("vlmtune", False, "vlmtune bf16 LoRA, kernels off"),
    "vlmtune_bf16_packed": BenchConfig(
        "vlmtune", False, "vlmtune bf16 LoRA, kernels off, each step's samples packed (real shape)", packed=True
    ),
    "vlmtune_bf16_kernels": BenchConfig("vlmtune", False, "vlmtune bf16 LoRA with kernels", kernels=True),
}
VISION_MODES = ("lora", "frozen")


@dataclass(frozen=True)
class Suite:
    """A fixed set of runs of one model in one call of ``python -m benchmarks.train_step --suite NAME``.

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
