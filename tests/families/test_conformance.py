"""What every family must satisfy, on its tiny checkpoint: one entry per ``model_type`` in :data:`CASES`.

For each family: ``detect`` gives its descriptor; the collator's batch equals the family's own processor token for
token (pixels, grids and extra keys included) over image sizes and conversations, with hand-derived grids, views
and token counts; hand-derived label masks (answers and their end-of-turn only; image, pad and prompt tokens
-100); golden LoRA lists for each tower / kind flag combination; exactly the trainable parameters of
``apply_tuning``; QLoRA placement; one training step after ``vlmtune.load``; the processor's save / reload round
trip. Family-specific behaviour (M-RoPE, pan-and-scan, slicing, downsample modes ...) is tested in
``tests/families/<family>/``. A new family is one entry here.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import AutoProcessor

import vlmtune
from vlmtune.data.collator import IGNORE_INDEX, Collator
from vlmtune.families import REGISTRY, Family, detect
from vlmtune.families.gemma3 import GEMMA3
from vlmtune.families.minicpmv import MINICPMV
from vlmtune.families.minicpmv4_6 import MINICPMV4_6
from vlmtune.families.qwen_vl import QWEN2_5_VL, QWEN3_VL
from vlmtune.loading import read_config
from vlmtune.testing import collate, init_lora_b, noise, single, turn
from vlmtune.tuning import TuningConfig, apply_tuning, lora_target_names, trainable_parameter_names


@dataclass(frozen=True)
class Expect:
    """What the images of a batch become, derived by hand from the family's image rules.

    Attributes:
        layout: ``batch[Case.layout_key].tolist()``: Qwen's ``(t, h, w)`` patch grids, MiniCPM-V's ``(h, w)``
            patch grid of every view; ``None``: not checked.
        counts: how often each of these tokens occurs in the batch.
        pixel_shape: the shape of ``pixel_values``; ``None``: not checked.
    """

    layout: list | None = None
    counts: dict[str, int] = field(default_factory=dict)
    pixel_shape: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Case:
    """One ``model_type``'s expected values on its tiny checkpoint.

    Attributes:
        family: the descriptor ``detect`` must give.
        classes: the model and processor class names the checkpoint loads as.
        layout_key: the batch key that describes each image's grid or views (``None``: Gemma-3's fixed square).
        sizes: PIL ``(width, height)`` of one image → what it becomes (:class:`Expect`).
        conversations: expectations for the shared :data:`CONVERSATIONS` beyond the processor's equality.
        image_token / pad_token / newline / end_of_turn: the tokens (as strings) that stand for image content,
            padding, ``"\\n"`` and the end of an assistant turn.
        label_image: the size of the image in the label-mask rows.
        prompt: the text before the first answer of ``single(QUESTION, ...)`` with one ``label_image``.
        between: the text from the first answer's end-of-turn to the second answer (user turn "Sure?").
        system_start: how the rendered text of :data:`CONVERSATIONS` ``multi_turn_with_system`` starts.
        lora: the tiny model's LoRA-able linears by group (``v0.attention`` ... ``l1.mlp``, ``projector``), in
            model order; :data:`COMBOS` composes the golden lists from them.
        trainable: ``id → (TuningConfig flags, LoRA groups, modules_to_save copies)``: every trainable parameter
            after ``apply_tuning``.
        towers: module names → the tower ``Family.tower_of`` must give.
        qlora_plain: the ``nn.Linear`` modules ``quant="nf4"`` leaves unquantised (``None``: not tested).
        several_view_sizes: whether one batch may hold images whose views differ in size (MiniCPM-V 4.6 at 16x
            needs transformers >= 5.19); tests batching such images skip where not.
    """

    family: Family
    classes: tuple[str, str]
    layout_key: str | None
    sizes: dict[str, tuple[tuple[int, int], Expect]]
    image_token: str
    pad_token: str
    newline: str
    end_of_turn: str
    label_image: tuple[int, int]
    prompt: str
    between: str
    system_start: str
    lora: dict[str, list[str]]
    trainable: dict[str, tuple[dict, tuple[str, ...], set[str]]]
    towers: dict[str, str | None]
    conversations: dict[str, Expect] = field(default_factory=dict)
    qlora_plain: list[str] | None = None
    several_view_sizes: bool = True


# --- shared rows ------------------------------------------------------------------------------------------

QUESTION = "Write the LaTeX."
SYSTEM = {"role": "system", "content": [{"type": "text", "text": "Answer with the formula only."}]}


def multi_image_rows():
    """Three images in one user turn, between text parts."""
    parts = [{"type": "image"}, {"type": "text", "text": "Compare"}, {"type": "image"}, {"type": "text", "text": "and"}]
    messages = [{"role": "user", "content": [*parts, {"type": "image"}]}, turn("assistant", "They differ.")]
    return [(messages, [noise((300, 60), 1), noise((56, 56), 2), noise((100, 200), 3)])]


def multi_turn_messages():
    return [
        SYSTEM,
        turn("user", "Compare", 2),
        turn("assistant", r"\alpha + \beta"),
        turn("user", "And here?", 1),
        turn("assistant", r"\sqrt{x}"),
    ]


def multi_turn_rows():
    """A system turn, then two user turns with two and one images."""
    return [(multi_turn_messages(), [noise((300, 60), 1), noise((56, 56), 2), noise((30, 300), 3)])]


def text_only_rows():
    return [([turn("user", "Say hi."), turn("assistant", "hi"), turn("user", "Again."), turn("assistant", "hi")], [])]


def padded_batch_rows():
    """Two samples of different lengths: the batch is padded, and images of both samples concatenate in order."""
    first = (multi_turn_messages(), [noise((300, 60), 1), noise((56, 56), 2), noise((1000, 700), 3)])
    return [first, (single("Read.", "y"), [noise((64, 200), 4)])]


CONVERSATIONS: dict[str, Callable[[], list]] = {
    "multi_image": multi_image_rows,
    "multi_turn_with_system": multi_turn_rows,
    "text_only": text_only_rows,
    "padded_batch": padded_batch_rows,
}

# --- golden LoRA lists --------------------------------------------------------------------------------------

VISION = ("v0.attention", "v0.mlp", "v1.attention", "v1.mlp")
LANGUAGE = ("l0.attention", "l0.mlp", "l1.attention", "l1.mlp")

# Flag combination → the groups of Case.lora that get LoRA, in model order (every tiny model has two vision and two
# language layers, the vision tower first).
COMBOS = {
    "both_towers": ({}, VISION + LANGUAGE),
    "language_only": (dict(vision="frozen"), LANGUAGE),
    "vision_only": (dict(language="frozen"), VISION),
    "language_attention": (dict(vision="frozen", mlp=False), ("l0.attention", "l1.attention")),
    "language_mlp": (dict(vision="frozen", attention=False), ("l0.mlp", "l1.mlp")),
    "vision_mlp": (dict(language="frozen", attention=False), ("v0.mlp", "v1.mlp")),
    "both_last_layer": (dict(last_n_layers=1), ("v1.attention", "v1.mlp", "l1.attention", "l1.mlp")),
    "attention_last_layer": (dict(mlp=False, last_n_layers=1), ("v1.attention", "l1.attention")),
    "mlp_last_layer": (dict(attention=False, last_n_layers=1), ("v1.mlp", "l1.mlp")),
    "vision_attention_last_layer": (dict(language="frozen", mlp=False, last_n_layers=1), ("v1.attention",)),
    "vision_mlp_last_layer": (dict(language="frozen", attention=False, last_n_layers=1), ("v1.mlp",)),
    "language_attention_last_layer": (dict(vision="frozen", mlp=False, last_n_layers=1), ("l1.attention",)),
    "language_full_vision_lora_mlp": (dict(language="full", attention=False), ("v0.mlp", "v1.mlp")),
    "projector_lora_only": (dict(vision="frozen", language="frozen", projector="lora"), ("projector",)),
}


def layers(prefix: str, tag: str, attention: tuple[str, ...], mlp: tuple[str, ...]) -> dict[str, list[str]]:
    """The groups ``{tag}0.attention`` ... ``{tag}1.mlp`` of a two-layer tower: ``prefix.{i}.{name}``."""
    kinds = {"attention": attention, "mlp": mlp}
    return {
        f"{tag}{i}.{kind}": [f"{prefix}.{i}.{s}" for s in suffixes] for i in (0, 1) for kind, suffixes in kinds.items()
    }


def names(groups: dict[str, list[str]], keys: tuple[str, ...]) -> list[str]:
    return [name for key in keys for name in groups[key]]


def lora_params(modules: list[str]) -> set[str]:
    return {f"base_model.model.{m}.lora_{ab}.default.weight" for m in modules for ab in "AB"}


def copies(prefix: str, *params: str) -> set[str]:
    """The parameters of ``prefix``'s trained copy (PEFT ``modules_to_save``)."""
    return {f"base_model.model.{prefix}.modules_to_save.default.{p}" for p in params}


def with_bias(*modules: str) -> list[str]:
    return [f"{m}.{p}" for m in modules for p in ("weight", "bias")]


ATTENTION = tuple(f"self_attn.{p}_proj" for p in "qkvo")
MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# SigLIP declares k_proj, v_proj, q_proj, out_proj in that order; targets come back in model order.
SIGLIP_ATTENTION = tuple(f"self_attn.{p}_proj" for p in ("k", "v", "q", "out"))
QWEN_LANGUAGE = layers("model.language_model.layers", "l", ATTENTION, MLP)
QWEN_VISION_ATTENTION = ("attn.qkv", "attn.proj")

QWEN2_5_LORA = {
    **layers("model.visual.blocks", "v", QWEN_VISION_ATTENTION, MLP),  # the vision MLP reuses gate/up/down_proj
    **QWEN_LANGUAGE,
    "projector": ["model.visual.merger.mlp.0", "model.visual.merger.mlp.2"],
}
QWEN2_LORA = {
    **layers("model.visual.blocks", "v", QWEN_VISION_ATTENTION, ("mlp.fc1", "mlp.fc2")),
    **QWEN_LANGUAGE,
    "projector": ["model.visual.merger.mlp.0", "model.visual.merger.mlp.2"],
}
QWEN3_LORA = {
    **layers("model.visual.blocks", "v", QWEN_VISION_ATTENTION, ("mlp.linear_fc1", "mlp.linear_fc2")),
    **QWEN_LANGUAGE,
    "projector": [
        "model.visual.merger.linear_fc1",
        "model.visual.merger.linear_fc2",
        "model.visual.deepstack_merger_list.0.linear_fc1",
        "model.visual.deepstack_merger_list.0.linear_fc2",
    ],
}
GEMMA3_LORA = {
    **layers("model.vision_tower.encoder.layers", "v", SIGLIP_ATTENTION, ("mlp.fc1", "mlp.fc2")),
    **layers("model.language_model.layers", "l", ATTENTION, MLP),
    # The projector is a bare weight matrix (mm_input_projection_weight), not a Linear: "lora" on it finds nothing.
    "projector": [],
}
MINICPMV4_6_LORA = {
    **layers("model.vision_tower.encoder.layers", "v", SIGLIP_ATTENTION, ("mlp.fc1", "mlp.fc2")),
    **layers("model.language_model.layers", "l", ATTENTION, MLP),
    # Layer 0 of the hybrid Qwen3.5 tower is Gated DeltaNet: its in_proj_a / in_proj_b are never targets.
    "l0.attention": [
        f"model.language_model.layers.0.linear_attn.{n}" for n in ("out_proj", "in_proj_qkv", "in_proj_z")
    ],
    "projector": [
        *(f"model.vision_tower.vit_merger.{n}" for n in (*SIGLIP_ATTENTION, "linear_1", "linear_2")),
        "model.merger.mlp.0.linear_1",
        "model.merger.mlp.0.linear_2",
    ],
}
MINICPMV_LORA = {
    **layers(
        "vpm.encoder.layers", "v", tuple(f"self_attn.{p}_proj" for p in ("q", "k", "v", "out")), ("mlp.fc1", "mlp.fc2")
    ),
    **layers("llm.model.layers", "l", ATTENTION, MLP),
    # The resampler's q/k/v projection is one fused in_proj_weight; its Linears are these two.
    "projector": ["resampler.kv_proj", "resampler.attn.out_proj"],
}

# --- the table ----------------------------------------------------------------------------------------------

SYSTEM_DEFAULT = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
CHATML_ASSISTANT = "<|im_end|>\n<|im_start|>assistant\n"
CHATML_BETWEEN = "\n<|im_start|>user\nSure?" + CHATML_ASSISTANT
CHATML_SYSTEM = "<|im_start|>system\nAnswer with the formula only.<|im_end|>\n<|im_start|>user\n"
# The ChatML families (Qwen-VL, MiniCPM-V): pad, "\n" (byte-level), end of turn, the turns between answers.
CHATML = dict(
    pad_token="<|endoftext|>",
    newline="Ċ",
    end_of_turn="<|im_end|>",
    between=CHATML_BETWEEN,
    system_start=CHATML_SYSTEM,
)
QWEN_PADS_4 = "<|vision_start|>" + "<|image_pad|>" * 4 + "<|vision_end|>"


def qwen_image(grid: tuple[int, int, int], patch: int) -> Expect:
    """One image of patch grid ``(t, h, w)``: ``t * h * w / 4`` pads (2x2 merge), ``t * h * w`` flat patches."""
    t, h, w = grid
    return Expect(
        layout=[list(grid)],
        counts={"<|image_pad|>": t * h * w // 4, "<|vision_start|>": 1, "<|vision_end|>": 1},
        pixel_shape=(t * h * w, 3 * 2 * patch * patch),
    )


def views(layout: list[list[int]], token: str, tokens: int, pixel_shape: tuple[int, ...]) -> Expect:
    """One MiniCPM-V image of views with patch grids ``layout``: ``<image>`` around the source view, ``<slice>``
    around each other view, ``tokens`` image tokens in all."""
    return Expect(layout, {token: tokens, "<image>": 1, "<slice>": len(layout) - 1}, pixel_shape)


# PIL size (width, height) -> grid (t, h, w) of 14 px patches under the tiny min_pixels=56*56,
# max_pixels=224*224, derived by hand from smart_resize (factor 28, aspect ratio <= 200):
# - 1x1 and 5x5: round to 28x28 = 784 < 3136, so scaled up by sqrt(3136/25) and ceiled to 56x56 -> 4x4;
# - 30x300: 28x308 = 8624 fits -> 2x22 (and the transpose for 300x30);
# - 1000x700: 1008x700 is over 50176, beta = sqrt(700000/50176) = 3.735, floor to 252x168 -> 18x12.
QWEN2_SIZES = {
    "1x1": ((1, 1), qwen_image((1, 4, 4), 14)),
    "5x5": ((5, 5), qwen_image((1, 4, 4), 14)),
    "tall_1_10": ((30, 300), qwen_image((1, 22, 2), 14)),
    "wide_10_1": ((300, 30), qwen_image((1, 2, 22), 14)),
    "square": ((112, 112), qwen_image((1, 8, 8), 14)),
    "over_max_pixels": ((1000, 700), qwen_image((1, 12, 18), 14)),
}
# The same rules on the shared rows: 300x60 -> 308x56 -> 22x4; 56x56 -> 4x4; 100x200 -> 112x196 -> 8x14 (and
# 30x300 as above): 88 + 16 + 112 patches, a quarter of them pads.
QWEN2_CONVERSATIONS = {
    "multi_image": Expect([[1, 4, 22], [1, 4, 4], [1, 14, 8]], {"<|image_pad|>": (88 + 16 + 112) // 4}),
    "multi_turn_with_system": Expect([[1, 4, 22], [1, 4, 4], [1, 22, 2]]),
}
QWEN2_TOWERS = {
    "model.visual.merger.mlp.0": "projector",
    "model.visual.blocks.0.mlp.gate_proj": "vision",
    "model.visual.blocks.0.mlp.fc1": "vision",
    "model.visual.patch_embed.proj": "vision",
    "model.language_model.layers.1.mlp.gate_proj": "language",
    "lm_head": "language",
    "model.visualx": None,
}
QWEN2_LABELS = dict(
    image_token="<|image_pad|>",
    # 56x56 -> grid 1x4x4 -> 4 image pads, after the default system turn.
    label_image=(56, 56),
    prompt=SYSTEM_DEFAULT + "<|im_start|>user\n" + QWEN_PADS_4 + QUESTION + CHATML_ASSISTANT,
    **CHATML,
)

CASES: dict[str, Case] = {
    "qwen2_vl": Case(
        family=QWEN2_5_VL,
        classes=("Qwen2VLForConditionalGeneration", "Qwen2VLProcessor"),
        layout_key="image_grid_thw",
        sizes={k: v for k, v in QWEN2_SIZES.items() if k != "1x1"},
        conversations=QWEN2_CONVERSATIONS,
        **QWEN2_LABELS,
        lora=QWEN2_LORA,
        trainable={
            "language_only": (dict(vision="frozen"), LANGUAGE, set()),
            "projector_full": (
                dict(vision="frozen", projector="full", attention=False),
                ("l0.mlp", "l1.mlp"),
                copies("model.visual.merger", *with_bias("ln_q", "mlp.0", "mlp.2")),
            ),
        },
        towers=QWEN2_TOWERS,
    ),
    "qwen2_5_vl": Case(
        family=QWEN2_5_VL,
        classes=("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor"),
        layout_key="image_grid_thw",
        sizes=QWEN2_SIZES,
        conversations=QWEN2_CONVERSATIONS,
        **QWEN2_LABELS,
        lora=QWEN2_5_LORA,
        trainable={
            "language_only": (dict(vision="frozen"), LANGUAGE, set()),
            "both_last_layer": (dict(last_n_layers=1), ("v1.attention", "v1.mlp", "l1.attention", "l1.mlp"), set()),
            "projector_full": (
                dict(vision="frozen", projector="full", mlp=False),
                ("l0.attention", "l1.attention"),
                copies("model.visual.merger", "ln_q.weight", *with_bias("mlp.0", "mlp.2")),
            ),
        },
        towers=QWEN2_TOWERS,
        qlora_plain=[*names(QWEN2_5_LORA, VISION + ("projector",)), "lm_head"],
    ),
    "qwen3_vl": Case(
        family=QWEN3_VL,
        classes=("Qwen3VLForConditionalGeneration", "Qwen3VLProcessor"),
        layout_key="image_grid_thw",
        # PIL size (width, height) -> grid (t, h, w) of 16 px patches under the tiny min 64*64, max 256*256 pixels,
        # derived by hand from smart_resize with factor 32:
        # - 5x5: rounds to 32x32 = 1024 < 4096, scaled up by sqrt(4096/25) = 12.8 and ceiled to 64x64 -> 4x4;
        # - 30x300: round(30/32) = 1, round(300/32) = 9 -> 32x288 = 9216 fits -> 2x18 (and the transpose);
        # - 1000x700: 992x704 is over 65536, beta = sqrt(700000/65536) = 3.268, floor to 288x192 -> 18x12.
        sizes={
            "5x5": ((5, 5), qwen_image((1, 4, 4), 16)),
            "tall_1_10": ((30, 300), qwen_image((1, 18, 2), 16)),
            "wide_10_1": ((300, 30), qwen_image((1, 2, 18), 16)),
            "square": ((128, 128), qwen_image((1, 8, 8), 16)),
            "over_max_pixels": ((1000, 700), qwen_image((1, 12, 18), 16)),
        },
        # 300x60 -> 288x64 -> 18x4; 56x56 -> 64x64 -> 4x4; 100x200 -> 96x192 -> 6x12; 30x300 as above.
        conversations={
            "multi_image": Expect([[1, 4, 18], [1, 4, 4], [1, 12, 6]], {"<|image_pad|>": (72 + 16 + 72) // 4}),
            "multi_turn_with_system": Expect([[1, 4, 18], [1, 4, 4], [1, 18, 2]]),
        },
        image_token="<|image_pad|>",
        **CHATML,
        # No default system turn; 64x64 -> grid 1x4x4 -> 4 image pads.
        label_image=(64, 64),
        prompt="<|im_start|>user\n" + QWEN_PADS_4 + QUESTION + CHATML_ASSISTANT,
        lora=QWEN3_LORA,
        trainable={
            "language_only": (dict(vision="frozen"), LANGUAGE, set()),
            "both_last_layer": (dict(last_n_layers=1), ("v1.attention", "v1.mlp", "l1.attention", "l1.mlp"), set()),
            "projector_full": (
                dict(vision="frozen", projector="full", mlp=False),
                ("l0.attention", "l1.attention"),
                copies("model.visual.merger", *with_bias("norm", "linear_fc1", "linear_fc2"))
                | copies("model.visual.deepstack_merger_list.0", *with_bias("norm", "linear_fc1", "linear_fc2")),
            ),
        },
        towers={
            "model.visual.deepstack_merger_list.0.linear_fc1": "projector",
            "model.visual.deepstack_merger_list.2.linear_fc2": "projector",
            "model.visual.merger.norm": "projector",
            "model.visual.blocks.1.mlp.linear_fc1": "vision",
            "model.visual.pos_embed": "vision",
            "model.language_model.layers.0.self_attn.q_norm": "language",
        },
        qlora_plain=[*names(QWEN3_LORA, VISION + ("projector",)), "lm_head"],
    ),
    "gemma3": Case(
        family=GEMMA3,
        classes=("Gemma3ForConditionalGeneration", "Gemma3Processor"),
        layout_key=None,
        # Every image is resized to the tiny 64x64 square: boi, 16 soft tokens, eoi.
        sizes={
            name: (
                size,
                Expect(None, {"<start_of_image>": 1, "<end_of_image>": 1, "<image_soft_token>": 16}, (1, 3, 64, 64)),
            )
            for name, size in {
                "1x1": (1, 1),
                "5x5": (5, 5),
                "tall_1_10": (30, 300),
                "wide_10_1": (300, 30),
                "square": (64, 64),
                "larger_than_processor": (1000, 700),
            }.items()
        },
        conversations={
            "multi_image": Expect(None, {"<image_soft_token>": 3 * 16}, (3, 3, 64, 64)),
            "multi_turn_with_system": Expect(None, {"<image_soft_token>": 3 * 16}, (3, 3, 64, 64)),
        },
        image_token="<image_soft_token>",
        pad_token="<pad>",
        newline="<0x0A>",
        end_of_turn="<end_of_turn>",
        label_image=(50, 20),
        prompt="<bos><start_of_turn>user\n\n\n<start_of_image>"
        + "<image_soft_token>" * 16
        + "<end_of_image>\n\n"
        + QUESTION
        + "<end_of_turn>\n<start_of_turn>model\n",
        between="\n<start_of_turn>user\nSure?<end_of_turn>\n<start_of_turn>model\n",
        # Gemma-3 has no system role: the template puts the system text at the top of the first user turn.
        system_start="<bos><start_of_turn>user\nAnswer with the formula only.\n\n\n\n<start_of_image>",
        lora=GEMMA3_LORA,
        trainable={
            "language_only": (dict(vision="frozen"), LANGUAGE, set()),
            "vision_last_layer": (dict(language="frozen", last_n_layers=1), ("v1.attention", "v1.mlp"), set()),
            "projector_full": (
                dict(vision="frozen", projector="full", attention=False),
                ("l0.mlp", "l1.mlp"),
                copies("model.multi_modal_projector", "mm_input_projection_weight", "mm_soft_emb_norm.weight"),
            ),
        },
        towers={
            "model.vision_tower.encoder.layers.0.mlp.fc1": "vision",
            "model.multi_modal_projector.mm_soft_emb_norm": "projector",
            "model.language_model.layers.0.mlp.up_proj": "language",
            "lm_head": "language",
        },
        qlora_plain=[*names(GEMMA3_LORA, VISION), "lm_head"],
    ),
    "minicpmv4_6": Case(
        family=MINICPMV4_6,
        classes=("MiniCPMV4_6ForConditionalGeneration", "MiniCPMV4_6Processor"),
        layout_key="target_sizes",
        # PIL size (width, height) -> patch grids (rows, cols) of the source view and the slices, and the tokens at
        # 16x, derived by hand for the tiny processor (scale_resolution 112, patch 14, sides rounded to multiples of
        # 56):
        # - 5x5: one view (5*5 < 112^2), upscaled to about 112^2 keeping the aspect: 112x112 -> 8x8 patches, 4 tokens;
        # - 30x300: one view, height int(112 / sqrt(0.1)) = 354 -> 336, width int(35.4) = 35 -> 56: 24x4, 6 tokens;
        # - 300x30: the transpose, 4x24, 6 tokens;
        # - 1000x700: 55.8 x 112^2, so min(56, 9) = 9 slices at most; among 8 and 9 slices the grid closest to
        #   log(1000/700) is 2 rows x 4 cols (|0.357 - log 2| = 0.337 beats 3x3's 0.357); the source is ~93x132 ->
        #   112x112 and each 350x250 slice is ~132x94 -> 112x112: 9 views of 8x8, 9 * 4 = 36 tokens.
        sizes={
            "5x5": ((5, 5), views([[8, 8]], "<|image_pad|>", 4, (1, 3, 14, 64 * 14))),
            "tall_1_10": (
                (30, 300),
                views([[24, 4]], "<|image_pad|>", 6, (1, 3, 14, 96 * 14)),
            ),
            "wide_10_1": (
                (300, 30),
                views([[4, 24]], "<|image_pad|>", 6, (1, 3, 14, 96 * 14)),
            ),
            "sliced_2x4": (
                (1000, 700),
                views([[8, 8]] * 9, "<|image_pad|>", 36, (1, 3, 14, 9 * 64 * 14)),
            ),
        },
        image_token="<|image_pad|>",
        **CHATML,
        # 112x112: one 8x8 view, 4 tokens at 16x; no default system turn.
        label_image=(112, 112),
        prompt="<|im_start|>user\n<image_id>0</image_id><image>"
        + "<|image_pad|>" * 4
        + "</image>"
        + QUESTION
        + CHATML_ASSISTANT,
        lora=MINICPMV4_6_LORA,
        several_view_sizes=Version(transformers.__version__) >= Version("5.19"),
        trainable={
            "language_only": (dict(vision="frozen"), LANGUAGE, set()),
            # Both mergers are projector modules, and nothing else of the vision tower trains.
            "projector_full": (
                dict(vision="frozen", projector="full", attention=False),
                ("l0.mlp", "l1.mlp"),
                copies("model.merger", *with_bias("mlp.0.linear_1", "mlp.0.linear_2", "mlp.0.pre_norm"))
                | copies(
                    "model.vision_tower.vit_merger",
                    *with_bias("layer_norm1", "linear_1", "linear_2", "pre_norm", *SIGLIP_ATTENTION),
                ),
            ),
        },
        towers={
            "model.vision_tower.vit_merger.linear_1": "projector",
            "model.merger.mlp.0.pre_norm": "projector",
            "model.vision_tower.encoder.layers.0.mlp.fc1": "vision",
            "model.language_model.layers.0.linear_attn.dt_bias": "language",
        },
    ),
    "minicpmv": Case(
        family=MINICPMV,
        classes=("MiniCPMV", "MiniCPMVProcessor"),
        layout_key="tgt_sizes",
        # The tiny processor slices at scale_resolution 112 (patch 14, at most 9 slices; the rules and a table at the
        # released 448 are in minicpmv/test_image.py). Sides round to multiples of 14, half to even; every view is
        # 64 query tokens.
        # - 5x5: not sliced; upscaled to 112x112 -> 8x8 patches;
        # - 30x300: ratio 9000 / 112^2 = 0.72, not sliced; h = int(112 / sqrt(0.1)) = 354 -> 350, w = int(35.4) = 35
        #   -> 28 (2.5 rounds to 2): 25x2 patches; 300x30 the transpose;
        # - 1000x700: ratio 55.8 -> 9 slices at most, counts {8, 9}: (cols, rows) (4, 2) has the least
        #   |log(1000/700) - log(4/2)| = 0.337; source h = int(112 / sqrt(1.4286)) = 93 -> 98, w = int(132.9) = 132
        #   -> 126: 7x9 patches; cells 250x350: h = int(112 / sqrt(0.7143)) = 132 -> 126, w = int(94.3) = 94 -> 98:
        #   9x7 patches; strips padded to the longest, 63 patches.
        sizes={
            "5x5": ((5, 5), views([[8, 8]], "<unk>", 64, (1, 3, 14, 64 * 14))),
            "tall_1_10": ((30, 300), views([[25, 2]], "<unk>", 64, (1, 3, 14, 50 * 14))),
            "wide_10_1": ((300, 30), views([[2, 25]], "<unk>", 64, (1, 3, 14, 50 * 14))),
            "sliced_4x2": (
                (1000, 700),
                views([[7, 9]] + [[9, 7]] * 8, "<unk>", 9 * 64, (9, 3, 14, 63 * 14)),
            ),
        },
        image_token="<unk>",
        **CHATML,
        # 56x56 < 112^2: not sliced, one view; the published prompt keeps the newline after the image.
        label_image=(56, 56),
        prompt=SYSTEM_DEFAULT
        + "<|im_start|>user\n<image_id>0</image_id><image>"
        + "<unk>" * 64
        + "</image>\n"
        + QUESTION
        + CHATML_ASSISTANT,
        lora=MINICPMV_LORA,
        trainable={"language_only": (dict(vision="frozen"), LANGUAGE, set())},
        towers={
            "vpm.encoder.layers.0.mlp.fc1": "vision",
            "resampler.kv_proj": "projector",
            "llm.model.layers.1.self_attn.q_proj": "language",
            "llm.lm_head": "language",
        },
        qlora_plain=[*names(MINICPMV_LORA, VISION), "llm.lm_head", "resampler.kv_proj"],
    ),
}


def each(attribute: str) -> list:
    """``(model_type, value)`` params over the entries of ``Case.<attribute>`` of every case, named by their keys."""
    return [
        pytest.param(model_type, value, id=f"{model_type}-{key}")
        for model_type, case in CASES.items()
        for key, value in getattr(case, attribute).items()
    ]


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def count(batch: dict, tokenizer, token: str) -> int:
    assert token in tokenizer.get_vocab(), token
    return int((batch["input_ids"] == tokenizer.convert_tokens_to_ids(token)).sum())


def skip_unless_several_view_sizes(case: Case) -> None:
    if not case.several_view_sizes:
        pytest.skip(f"{case.family.name} batches views of one size only on transformers {transformers.__version__}")


def check(batch: dict, case: Case, tokenizer, expect: Expect) -> None:
    if expect.layout is not None:
        assert batch[case.layout_key].tolist() == expect.layout
    assert {token: count(batch, tokenizer, token) for token in expect.counts} == expect.counts
    if expect.pixel_shape is not None:
        assert tuple(batch["pixel_values"].shape) == expect.pixel_shape


# --- detect -------------------------------------------------------------------------------------------------


def test_every_registered_model_type_has_an_entry():
    assert set(CASES) == set(REGISTRY)


@pytest.mark.parametrize("model_type", CASES)
def test_detect_gives_the_descriptor(tiny, model_type):
    case, t = CASES[model_type], tiny(model_type)
    assert model_type in case.family.model_types and model_type in case.family.tiny
    assert detect(read_config(t.folder)) is case.family  # from config.json alone, as vlmtune.load decides
    assert t.config.model_type == model_type
    assert detect(t.config) is t.family is case.family
    assert (type(t.model).__name__, type(t.processor).__name__) == case.classes


@pytest.mark.parametrize("model_type", CASES)
def test_tower_of(tiny, model_type):
    case, t = CASES[model_type], tiny(model_type)
    assert {name: case.family.tower_of(name) for name in case.towers} == case.towers
    assert [n for n, _ in t.model.named_parameters() if case.family.tower_of(n) is None] == []


# --- fidelity with the family's processor -------------------------------------------------------------------


@pytest.mark.parametrize(("model_type", "size_expect"), each("sizes"))
def test_single_image_matches_processor(tiny, model_type, size_expect):
    case, t = CASES[model_type], tiny(model_type)
    size, expect = size_expect
    rows = [(single("Write the LaTeX representation for this image.", r"\frac{a}{b}"), [noise(size)])]
    batch = t.assert_matches_processor(rows)
    check(batch, case, t.processor.tokenizer, expect)


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("model_type", CASES)
def test_conversation_matches_processor(tiny, model_type, conversation):
    case, t = CASES[model_type], tiny(model_type)
    if conversation != "text_only":
        skip_unless_several_view_sizes(case)
    batch = t.assert_matches_processor(CONVERSATIONS[conversation]())
    check(batch, case, t.processor.tokenizer, case.conversations.get(conversation, Expect()))


@pytest.mark.parametrize("model_type", CASES)
def test_a_system_turn_replaces_the_default(tiny, model_type):
    case, t = CASES[model_type], tiny(model_type)
    skip_unless_several_view_sizes(case)
    text = t.processor.tokenizer.decode(collate(t.collator, *multi_turn_rows())["input_ids"][0])
    assert text.startswith(case.system_start)
    assert "You are a helpful assistant." not in text


@pytest.mark.parametrize("model_type", CASES)
def test_processor_save_and_reload_gives_the_same_batch(tiny, model_type, tmp_path):
    t = tiny(model_type)
    skip_unless_several_view_sizes(CASES[model_type])
    t.processor.save_pretrained(tmp_path)
    again = (t.family.load_processor or AutoProcessor.from_pretrained)(tmp_path)
    assert type(again) is type(t.processor)
    rows = padded_batch_rows()
    batch, reloaded = collate(t.collator, *rows), collate(Collator(t.family, again, t.config), *rows)
    assert batch.keys() == reloaded.keys()
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, reloaded[key]), key
        else:
            assert str(value) == str(reloaded[key]), key


# --- hand-derived label masks -------------------------------------------------------------------------------


@pytest.mark.parametrize("turns", [1, 2])
@pytest.mark.parametrize("model_type", CASES)
def test_labels_cover_exactly_the_answers_and_their_end_of_turn(tiny, model_type, turns):
    case, t = CASES[model_type], tiny(model_type)
    tok = t.processor.tokenizer
    answers = [r"\frac{a}{b}+\sqrt{x}", "Yes, it is."][:turns]
    messages = single(QUESTION, answers[0])
    if turns == 2:
        messages += [turn("user", "Sure?"), turn("assistant", answers[1])]
    enc = t.collator.encode({"messages": messages, "images": [noise(case.label_image)]}, 0)

    # (text, supervised) in order: the prompt, each answer with its end-of-turn, the user turn between, the final
    # newline the template writes after the last end-of-turn (not supervised).
    pieces = [(case.prompt, False)]
    for i, answer in enumerate(answers):
        pieces += [(case.between, False)] if i else []
        pieces += [(answer, True), (case.end_of_turn, True)]
    pieces.append(("\n", False))
    input_ids, labels = [], []
    for text, supervised in pieces:
        ids = ids_of(tok, text)
        input_ids += ids
        labels += ids if supervised else [IGNORE_INDEX] * len(ids)
    assert ids_of(tok, "\n") == [tok.convert_tokens_to_ids(case.newline)]
    assert ids_of(tok, case.end_of_turn) == [tok.convert_tokens_to_ids(case.end_of_turn)]
    assert enc.input_ids == input_ids
    assert enc.labels == labels
    supervised = [label for label in enc.labels if label != IGNORE_INDEX]
    assert tok.decode(supervised) == "".join(answer + case.end_of_turn for answer in answers)


@pytest.mark.parametrize("model_type", CASES)
def test_padding_positions_are_ignored_and_masked(tiny, model_type):
    case, t = CASES[model_type], tiny(model_type)
    skip_unless_several_view_sizes(case)
    short = (single("q", "a"), [noise((56, 56))])
    long = (single("Write the LaTeX representation for this image.", r"\sum_{i=1}^{n} i^{2}"), [noise((300, 60))])
    batch = collate(t.collator, short, long)
    alone = [t.collator.encode({"messages": m, "images": i}, 0) for m, i in (short, long)]
    n0, n1 = len(alone[0].input_ids), len(alone[1].input_ids)
    assert n0 < n1 == batch["input_ids"].shape[1]
    assert batch["input_ids"][0, :n0].tolist() == alone[0].input_ids
    assert batch["labels"][0, :n0].tolist() == alone[0].labels
    assert batch["input_ids"][1].tolist() == alone[1].input_ids
    assert batch["labels"][1].tolist() == alone[1].labels
    pad_id = t.processor.tokenizer.convert_tokens_to_ids(case.pad_token)
    assert batch["input_ids"][0, n0:].tolist() == [pad_id] * (n1 - n0)
    assert batch["labels"][0, n0:].tolist() == [IGNORE_INDEX] * (n1 - n0)
    assert batch["attention_mask"].tolist() == [[1] * n0 + [0] * (n1 - n0), [1] * n1]
    # Per-token extra keys (token types, M-RoPE positions) are 0 on padding.
    for key, value in batch.items():
        if key not in ("input_ids", "labels", "attention_mask") and isinstance(value, torch.Tensor):
            if value.shape[-2:] == batch["input_ids"].shape:
                assert value[..., 0, n0:].eq(0).all(), key
    image_positions = batch["input_ids"] == t.processor.tokenizer.convert_tokens_to_ids(case.image_token)
    assert image_positions.sum() > 0 and batch["labels"][image_positions].eq(IGNORE_INDEX).all()


# --- golden LoRA lists and what trains ----------------------------------------------------------------------


@pytest.mark.parametrize("combo", COMBOS)
@pytest.mark.parametrize("model_type", CASES)
def test_golden_lora_targets(tiny, model_type, combo):
    case, t = CASES[model_type], tiny(model_type)
    flags, groups = COMBOS[combo]
    config = TuningConfig(**flags)
    targets = lora_target_names(t.model, case.family, config)
    assert targets == names(case.lora, groups)
    # Implied by the list, said once for every family: a target lies in a tower set to "lora", never lm_head.
    assert all(getattr(config, case.family.tower_of(name)) == "lora" for name in targets)
    assert not [name for name in targets if name.endswith("lm_head")]


@pytest.mark.parametrize(("model_type", "expected"), each("trainable"))
def test_apply_tuning_trains_exactly_the_targets(tiny, model_type, expected):
    t = tiny(model_type)
    flags, groups, trained_copies = expected
    peft_model = apply_tuning(copy.deepcopy(t.model), t.family, TuningConfig(**flags))
    assert (
        set(trainable_parameter_names(peft_model))
        == lora_params(names(CASES[model_type].lora, groups)) | trained_copies
    )


@pytest.mark.parametrize("model_type", CASES)
def test_a_run_without_lora_is_refused_with_a_clear_message(tiny, model_type):
    # No LoRA tower means no adapter to export: refused up front rather than failing inside PEFT.
    t = tiny(model_type)
    with pytest.raises(ValueError, match="no tower is set to 'lora'"):
        apply_tuning(
            copy.deepcopy(t.model), t.family, TuningConfig(vision="frozen", language="frozen", projector="full")
        )


def tensors_in(output) -> list[torch.Tensor]:
    """The tensors of a module's output (a tensor, a tuple, a ModelOutput or a dict of them)."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in tensors_in(item)]
    return []


@pytest.mark.parametrize("model_type", CASES)
def test_one_training_step_moves_every_lora_weight_and_nothing_else(tiny, model_type):
    t = tiny(model_type)
    skip_unless_several_view_sizes(CASES[model_type])
    peft_model = apply_tuning(copy.deepcopy(t.model), t.family, TuningConfig(vision="frozen", r=4))
    init_lora_b(peft_model)  # PEFT starts lora_B at zero, which would make every lora_A grad zero
    peft_model.train()
    vision_outputs = []
    vision = peft_model.get_base_model().get_submodule(t.family.towers["vision"][0])
    vision.register_forward_hook(lambda _module, _args, out: vision_outputs.extend(tensors_in(out)))
    batch = collate(
        t.collator,
        (single("Read this.", r"\frac{1}{2}"), [noise((200, 100), 1)]),
        (single("And this one, please.", r"x^{2} + y"), [noise((40, 90), 2)]),
    )
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.1)
    loss = peft_model(**batch).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and loss.item() > 0
    # The frozen vision tower ran without a graph: nothing of it is kept for a backward pass.
    assert vision_outputs and not [out for out in vision_outputs if out.requires_grad]
    lora_matrices = [n for n, _ in peft_model.named_parameters() if ".lora_" in n]
    assert len(lora_matrices) == 2 * len(names(CASES[model_type].lora, LANGUAGE))  # A and B of each language linear
    for name, param in peft_model.named_parameters():
        changed = not torch.equal(before[name], param.detach())
        if ".lora_" in name:
            assert param.grad is not None and param.grad.abs().sum() > 0 and changed, name
        else:
            assert not param.requires_grad and param.grad is None and not changed, name


@pytest.mark.parametrize("model_type", [m for m, case in CASES.items() if case.qlora_plain is not None])
def test_qlora_quantizes_exactly_the_language_linears_and_trains(tiny, tiny_checkpoint, model_type):
    import bitsandbytes as bnb

    case = CASES[model_type]
    model, _processor, family = vlmtune.load(tiny_checkpoint(model_type), quant="nf4", device="cpu")
    assert family is case.family
    four_bit = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert four_bit == names(case.lora, LANGUAGE)
    assert {model.get_submodule(n).weight.quant_state.quant_type for n in four_bit} == {"nf4"}
    assert [n for n, m in model.named_modules() if type(m) is torch.nn.Linear] == case.qlora_plain
    # Everything but the 4-bit linears (vision tower, projector, embeddings, lm_head) stays in the compute dtype.
    kept = {n: p.dtype for n, p in model.named_parameters() if n.rsplit(".", 1)[0] not in four_bit}
    assert set(kept.values()) == {torch.float32}

    peft_model = apply_tuning(model, family, TuningConfig(vision="frozen"))
    peft_model.train()
    batch = collate(tiny(model_type).collator, (single("Read this.", r"\frac{1}{2}"), [noise((112, 56))]))
    loss = peft_model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert len(grads) == len(four_bit) and all(g is not None and g.abs().sum() > 0 for g in grads)
