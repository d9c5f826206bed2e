"""Qwen2.5-VL family on the tiny checkpoint.

Token-for-token equality with ``Qwen2_5_VLProcessor``, hand-derived label masks, M-RoPE positions against
the model's own ``get_rope_index``, golden LoRA target lists, real freezing of the vision tower, and QLoRA
placement.
"""

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

import vlmtune
from vlmtune.data.collator import IGNORE_INDEX, Collator
from vlmtune.data.schema import DataError
from vlmtune.families import detect
from vlmtune.families.qwen_vl import QWEN2_5_VL
from vlmtune.testing import collate, noise, single, turn
from vlmtune.tuning import TuningConfig, apply_tuning, lora_target_names, trainable_parameter_names

SYSTEM_DEFAULT = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


@pytest.fixture(scope="module")
def processor(tiny_qwen):
    return AutoProcessor.from_pretrained(tiny_qwen)


@pytest.fixture(scope="module")
def config(tiny_qwen):
    return AutoConfig.from_pretrained(tiny_qwen)


@pytest.fixture(scope="module")
def collator(processor, config):
    return Collator(detect(config), processor, config)


@pytest.fixture(scope="module")
def model(tiny_qwen):
    """A model for read-only checks (names, get_rope_index); tests that wrap with PEFT load their own."""
    return AutoModelForImageTextToText.from_pretrained(tiny_qwen).eval()


def reference(processor, messages, images):
    text = processor.apply_chat_template(messages, tokenize=False)
    return processor(text=[text], images=[images] if images else None, add_special_tokens=False, return_tensors="pt")


def assert_matches_processor(batch, ref, with_images=True):
    assert torch.equal(batch["input_ids"], ref["input_ids"])
    assert torch.equal(batch["attention_mask"], ref["attention_mask"])
    assert torch.equal(batch["mm_token_type_ids"], ref["mm_token_type_ids"].long())
    if with_images:
        assert torch.equal(batch["pixel_values"], ref["pixel_values"])
        assert torch.equal(batch["image_grid_thw"], ref["image_grid_thw"])
    else:
        assert "pixel_values" not in batch and "pixel_values" not in ref


def test_detect_serves_both_qwen_vl_types(config):
    assert detect(config) is QWEN2_5_VL
    assert detect(type("C", (), {"model_type": "qwen2_vl"})()) is QWEN2_5_VL


# --- fidelity with Qwen2_5_VLProcessor -------------------------------------------------------------------

# PIL size (width, height) -> the grid (t, h, w) of 14 px patches the processor makes under the tiny
# min_pixels=56*56, max_pixels=224*224.
SIZES = {
    "1x1": ((1, 1), (1, 4, 4)),
    "5x5": ((5, 5), (1, 4, 4)),
    "tall_1_10": ((30, 300), (1, 22, 2)),
    "wide_10_1": ((300, 30), (1, 2, 22)),
    "square": ((112, 112), (1, 8, 8)),
    "over_max_pixels": ((1000, 700), (1, 12, 18)),
}


@pytest.mark.parametrize(("size", "grid"), SIZES.values(), ids=SIZES.keys())
def test_single_image_matches_processor(collator, processor, config, size, grid):
    image = noise(size)
    messages = single("Write the LaTeX representation for this image.", r"\frac{a}{b}")
    batch = collate(collator, (messages, [image]))
    assert_matches_processor(batch, reference(processor, messages, [image]))
    assert batch["image_grid_thw"].tolist() == [list(grid)]
    t, h, w = grid
    assert int((batch["input_ids"] == config.image_token_id).sum()) == t * h * w // 4
    assert batch["pixel_values"].shape == (t * h * w, 3 * 2 * 14 * 14)
    assert h * w * 14 * 14 <= 224 * 224


@pytest.mark.parametrize(
    ("options", "grids"),
    [
        ({"max_pixels": 112 * 112}, [[1, 6, 8], [1, 4, 4]]),
        ({"min_pixels": 112 * 112}, [[1, 12, 18], [1, 8, 8]]),
    ],
    ids=["max_pixels", "min_pixels"],
)
def test_pixel_options_match_processor(processor, config, options, grids):
    collator = Collator(QWEN2_5_VL, processor, config, image_options=options)
    images = [noise((1000, 700), 1), noise((20, 20), 2)]
    messages = single("Two images.", "ok", n_images=2)
    batch = collate(collator, (messages, images))
    text = processor.apply_chat_template(messages, tokenize=False)
    # The reference call states both bounds through `size`: transformers 5.17 ignores a lone min/max_pixels kwarg.
    size = {
        "shortest_edge": options.get("min_pixels", processor.image_processor.size["shortest_edge"]),
        "longest_edge": options.get("max_pixels", processor.image_processor.size["longest_edge"]),
    }
    ref = processor(text=[text], images=[images], add_special_tokens=False, return_tensors="pt", size=size)
    assert_matches_processor(batch, ref)
    assert batch["image_grid_thw"].tolist() == grids


@pytest.mark.parametrize("size", [(1, 300), (300, 1)])
def test_aspect_ratio_over_200_is_a_data_error_naming_the_row(collator, size):
    messages = single("q", "a")
    with pytest.raises(DataError, match=r"^row 5: .*aspect ratio"):
        collator.encode({"messages": messages, "images": [noise(size)]}, 5)


def test_multi_image_conversation_matches_processor(collator, processor, config):
    images = [noise((300, 60), 1), noise((56, 56), 2), noise((100, 200), 3)]
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "text", "text": "Compare"},
                {"type": "image"},
                {"type": "text", "text": "and"},
                {"type": "image"},
            ],
        },
        turn("assistant", "They differ."),
    ]
    batch = collate(collator, (messages, images))
    assert_matches_processor(batch, reference(processor, messages, images))
    assert batch["image_grid_thw"].tolist() == [[1, 4, 22], [1, 4, 4], [1, 14, 8]]
    assert int((batch["input_ids"] == config.image_token_id).sum()) == (88 + 16 + 112) // 4


def test_multi_turn_conversation_with_system_matches_processor(collator, processor):
    images = [noise((64, 64), 4), noise((30, 300), 5)]
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Answer with the formula only."}]},
        turn("user", "What is written?", 1),
        turn("assistant", r"\alpha + \beta"),
        turn("user", "And here?", 1),
        turn("assistant", r"\sqrt{x}"),
    ]
    batch = collate(collator, (messages, images))
    assert_matches_processor(batch, reference(processor, messages, images))
    assert SYSTEM_DEFAULT not in processor.tokenizer.decode(batch["input_ids"][0])


def test_text_only_conversation_matches_processor(collator, processor):
    messages = [
        turn("user", "Say hi."),
        turn("assistant", "hi"),
        turn("user", "Again."),
        turn("assistant", "hi"),
    ]
    batch = collate(collator, (messages, []))
    assert_matches_processor(batch, reference(processor, messages, []), with_images=False)
    assert batch["position_ids"].shape == (3, 1, batch["input_ids"].shape[1])
    assert batch["position_ids"][0, 0].tolist() == list(range(batch["input_ids"].shape[1]))


# --- hand-derived label masks ----------------------------------------------------------------------------


def ids_of(processor, text: str) -> list[int]:
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_labels_cover_exactly_answer_and_im_end(collator, processor):
    tok = processor.tokenizer
    answer = r"\frac{a}{b}+\sqrt{x}"
    row = {"messages": single("Write the LaTeX.", answer), "images": [noise((56, 56))]}  # grid 1x4x4: 4 pads
    enc = collator.encode(row, 0)

    prefix = (
        SYSTEM_DEFAULT + "<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * 4 + "<|vision_end|>"
        "Write the LaTeX.<|im_end|>\n<|im_start|>assistant\n"
    )
    prefix_ids, answer_ids = ids_of(processor, prefix), ids_of(processor, answer)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    newline = ids_of(processor, "\n")
    assert newline == [tok.convert_tokens_to_ids("Ċ")]
    assert enc.input_ids == prefix_ids + answer_ids + [im_end] + newline

    start = len(prefix_ids)
    stop = start + len(answer_ids) + 1  # the answer and <|im_end|>; not the "\n" after it
    supervised = [i for i, label in enumerate(enc.labels) if label != IGNORE_INDEX]
    assert supervised == list(range(start, stop))
    assert stop == len(enc.input_ids) - 1
    assert enc.labels[start:stop] == enc.input_ids[start:stop]
    assert tok.decode(enc.input_ids[start - 1]) == "\n"  # the prompt's newline after "assistant" is not supervised
    assert tok.decode([t for t in enc.labels if t != IGNORE_INDEX]) == answer + "<|im_end|>"


def test_multi_turn_labels_supervise_both_answers_not_the_user_between(collator, processor):
    tok = processor.tokenizer
    a1, a2 = r"\alpha_{1}", "Yes, it is."
    messages = [turn("user", "What?", 1), turn("assistant", a1), turn("user", "Sure?"), turn("assistant", a2)]
    enc = collator.encode({"messages": messages, "images": [noise((56, 56))]}, 0)

    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    first = SYSTEM_DEFAULT + "<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * 4 + "<|vision_end|>"
    first += "What?<|im_end|>\n<|im_start|>assistant\n"
    between = "\n<|im_start|>user\nSure?<|im_end|>\n<|im_start|>assistant\n"
    p1, x1, p2, x2 = (ids_of(processor, s) for s in (first, a1, between, a2))
    assert enc.input_ids == p1 + x1 + [im_end] + p2 + x2 + [im_end] + ids_of(processor, "\n")

    s1 = len(p1)
    s2 = s1 + len(x1) + 1 + len(p2)
    expected = list(range(s1, s1 + len(x1) + 1)) + list(range(s2, s2 + len(x2) + 1))
    assert [i for i, label in enumerate(enc.labels) if label != IGNORE_INDEX] == expected
    assert tok.decode([t for t in enc.labels if t != IGNORE_INDEX]) == a1 + "<|im_end|>" + a2 + "<|im_end|>"


def test_padding_positions_are_ignored_and_masked(collator, processor, config):
    short = (single("q", "a"), [noise((56, 56))])
    long = (
        single("Write the LaTeX representation for this image.", r"\sum_{i=1}^{n} i^{2}"),
        [noise((300, 60))],
    )
    batch = collate(collator, short, long)
    alone = [collator.encode({"messages": m, "images": i}, 0) for m, i in (short, long)]
    n0, n1 = len(alone[0].input_ids), len(alone[1].input_ids)
    assert n0 < n1 == batch["input_ids"].shape[1]
    assert batch["input_ids"][0, :n0].tolist() == alone[0].input_ids
    assert batch["labels"][0, :n0].tolist() == alone[0].labels
    assert batch["input_ids"][1].tolist() == alone[1].input_ids
    pad_id = processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert batch["input_ids"][0, n0:].tolist() == [pad_id] * (n1 - n0)
    assert batch["labels"][0, n0:].tolist() == [IGNORE_INDEX] * (n1 - n0)
    assert batch["attention_mask"].tolist() == [[1] * n0 + [0] * (n1 - n0), [1] * n1]
    assert batch["position_ids"][:, 0, n0:].eq(0).all()
    # image, system and prompt tokens are never supervised
    image_positions = batch["input_ids"] == config.image_token_id
    assert batch["labels"][image_positions].eq(IGNORE_INDEX).all()


# --- M-RoPE -----------------------------------------------------------------------------------------------


def test_mrope_positions_equal_model_get_rope_index(collator, model):
    rows = (
        (single("Read this.", r"x^{2} + y"), [noise((300, 60), 7)]),
        (
            [turn("user", "Two:", 2), turn("assistant", "a"), turn("user", "ok"), turn("assistant", "b")],
            [noise((64, 64), 8), noise((100, 200), 9)],
        ),
    )
    batch = collate(collator, *rows)
    lengths = batch["attention_mask"].sum(1).tolist()
    assert lengths[0] != lengths[1]
    expected, _deltas = model.model.get_rope_index(
        batch["input_ids"],
        mm_token_type_ids=batch["mm_token_type_ids"],
        image_grid_thw=batch["image_grid_thw"],
        attention_mask=batch["attention_mask"],
    )
    assert batch["position_ids"].shape == expected.shape == (3, 2, max(lengths))
    mask = batch["attention_mask"].bool()
    assert torch.equal(batch["position_ids"][:, mask], expected[:, mask])
    # Real 3-D positions: images compress positions, so the last text position is below length - 1.
    for b, n in enumerate(lengths):
        assert int(batch["position_ids"][0, b, n - 1]) < n - 1
        assert not torch.equal(batch["position_ids"][1, b, :n], batch["position_ids"][2, b, :n])


# --- golden LoRA lists ------------------------------------------------------------------------------------

V0_ATTN = ["model.visual.blocks.0.attn.qkv", "model.visual.blocks.0.attn.proj"]
V0_MLP = [
    "model.visual.blocks.0.mlp.gate_proj",
    "model.visual.blocks.0.mlp.up_proj",
    "model.visual.blocks.0.mlp.down_proj",
]
V1_ATTN = ["model.visual.blocks.1.attn.qkv", "model.visual.blocks.1.attn.proj"]
V1_MLP = [
    "model.visual.blocks.1.mlp.gate_proj",
    "model.visual.blocks.1.mlp.up_proj",
    "model.visual.blocks.1.mlp.down_proj",
]
L0_ATTN = [
    "model.language_model.layers.0.self_attn.q_proj",
    "model.language_model.layers.0.self_attn.k_proj",
    "model.language_model.layers.0.self_attn.v_proj",
    "model.language_model.layers.0.self_attn.o_proj",
]
L0_MLP = [
    "model.language_model.layers.0.mlp.gate_proj",
    "model.language_model.layers.0.mlp.up_proj",
    "model.language_model.layers.0.mlp.down_proj",
]
L1_ATTN = [
    "model.language_model.layers.1.self_attn.q_proj",
    "model.language_model.layers.1.self_attn.k_proj",
    "model.language_model.layers.1.self_attn.v_proj",
    "model.language_model.layers.1.self_attn.o_proj",
]
L1_MLP = [
    "model.language_model.layers.1.mlp.gate_proj",
    "model.language_model.layers.1.mlp.up_proj",
    "model.language_model.layers.1.mlp.down_proj",
]
MERGER = ["model.visual.merger.mlp.0", "model.visual.merger.mlp.2"]

GOLDEN = {
    "both_towers": (dict(), V0_ATTN + V0_MLP + V1_ATTN + V1_MLP + L0_ATTN + L0_MLP + L1_ATTN + L1_MLP),
    "language_only": (dict(vision="frozen"), L0_ATTN + L0_MLP + L1_ATTN + L1_MLP),
    "vision_only": (dict(language="frozen"), V0_ATTN + V0_MLP + V1_ATTN + V1_MLP),
    "language_attention": (dict(vision="frozen", mlp=False), L0_ATTN + L1_ATTN),
    "language_mlp": (dict(vision="frozen", attention=False), L0_MLP + L1_MLP),
    "both_last_layer": (dict(last_n_layers=1), V1_ATTN + V1_MLP + L1_ATTN + L1_MLP),
    "vision_mlp_last_layer": (dict(language="frozen", attention=False, last_n_layers=1), V1_MLP),
    "attention_last_layer": (dict(mlp=False, last_n_layers=1), V1_ATTN + L1_ATTN),
    "language_full_vision_lora_mlp": (dict(language="full", attention=False), V0_MLP + V1_MLP),
    "projector_lora_only": (dict(vision="frozen", language="frozen", projector="lora"), MERGER),
}


@pytest.mark.parametrize(("flags", "expected"), GOLDEN.values(), ids=GOLDEN.keys())
def test_golden_lora_targets(model, flags, expected):
    config = TuningConfig(**flags)
    targets = lora_target_names(model, QWEN2_5_VL, config)
    assert targets == expected
    if config.vision != "lora":  # Qwen's vision MLP reuses gate/up/down_proj: a language choice never hits it
        assert not [t for t in targets if t.startswith("model.visual.blocks.")]
    if config.projector != "lora":
        assert not [t for t in targets if t.startswith("model.visual.merger")]
    assert "lm_head" not in targets


def test_lora_with_neither_attention_nor_mlp_is_refused():
    with pytest.raises(ValueError, match="attention and mlp are both off"):
        TuningConfig(vision="frozen", attention=False, mlp=False)


def test_tower_of_separates_merger_from_vision_blocks():
    assert QWEN2_5_VL.tower_of("model.visual.merger.mlp.0") == "projector"
    assert QWEN2_5_VL.tower_of("model.visual.blocks.0.mlp.gate_proj") == "vision"
    assert QWEN2_5_VL.tower_of("model.visual.patch_embed.proj") == "vision"
    assert QWEN2_5_VL.tower_of("model.language_model.layers.1.mlp.gate_proj") == "language"
    assert QWEN2_5_VL.tower_of("lm_head") == "language"
    assert QWEN2_5_VL.tower_of("model.visualx") is None


def lora_params(names: list[str]) -> set[str]:
    return {f"base_model.model.{n}.lora_{ab}.default.weight" for n in names for ab in "AB"}


MERGER_COPY = "base_model.model.model.visual.merger.modules_to_save.default."

TRAINABLE = {
    "language_only": (dict(vision="frozen"), lora_params(L0_ATTN + L0_MLP + L1_ATTN + L1_MLP)),
    "both_last_layer": (dict(last_n_layers=1), lora_params(V1_ATTN + V1_MLP + L1_ATTN + L1_MLP)),
    "projector_full": (
        dict(vision="frozen", projector="full", mlp=False),
        lora_params(L0_ATTN + L1_ATTN)
        | {MERGER_COPY + p for p in ("ln_q.weight", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias")},
    ),
}


@pytest.mark.parametrize(("flags", "expected"), TRAINABLE.values(), ids=TRAINABLE.keys())
def test_apply_tuning_trains_exactly_the_targets(tiny_qwen, flags, expected):
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen)
    peft_model = apply_tuning(model, QWEN2_5_VL, TuningConfig(**flags))
    assert set(trainable_parameter_names(peft_model)) == expected


def init_lora_b(peft_model) -> None:
    """PEFT starts lora_B at zero, which makes lora_A's grad zero: give B values so every grad informs."""
    torch.manual_seed(0)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)


def vision_batch(collator):
    return collate(collator, (single("Read this.", r"\frac{1}{2}"), [noise((112, 56))]))


@pytest.mark.parametrize(("projector", "trained"), [("full", 5), ("lora", 4)])
def test_trained_projector_inside_frozen_vision_still_gets_grads(tiny_qwen, collator, projector, trained):
    """The merger sits inside model.visual: a frozen vision tower must not cut it off with no_grad."""
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen)
    peft_model = apply_tuning(model, QWEN2_5_VL, TuningConfig(vision="frozen", projector=projector))
    init_lora_b(peft_model)
    peft_model.train()
    peft_model(**vision_batch(collator)).loss.backward()
    merger = {n: p for n, p in peft_model.named_parameters() if n.startswith(MERGER_COPY) or n in lora_params(MERGER)}
    assert len(merger) == trained
    for name, param in merger.items():
        assert param.requires_grad and param.grad is not None and param.grad.abs().sum() > 0, name
    blocks = [p for n, p in peft_model.named_parameters() if ".visual.blocks." in n]
    assert blocks and all(p.grad is None and not p.requires_grad for p in blocks)


def test_full_vision_keeps_a_frozen_projector_frozen(tiny_qwen):
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen)
    peft_model = apply_tuning(model, QWEN2_5_VL, TuningConfig(vision="full", projector="frozen"))
    trainable = trainable_parameter_names(peft_model)
    assert any(".visual." in n and ".blocks." in n for n in trainable)
    assert [n for n in trainable if ".merger." in n] == []


# --- QLoRA -------------------------------------------------------------------------------------------------


def test_qlora_quantizes_exactly_the_language_linears_and_trains(tiny_qwen, collator):
    import bitsandbytes as bnb

    model, processor, family = vlmtune.load(tiny_qwen, quant="nf4", device="cpu")
    assert family is QWEN2_5_VL
    four_bit = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert four_bit == L0_ATTN + L0_MLP + L1_ATTN + L1_MLP
    plain = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear]
    assert plain == V0_ATTN + V0_MLP + V1_ATTN + V1_MLP + MERGER + ["lm_head"]
    for name in plain:
        assert model.get_submodule(name).weight.dtype == torch.float32, name
    assert model.model.language_model.layers[0].mlp.up_proj.weight.quant_state.quant_type == "nf4"

    peft_model = apply_tuning(model, family, TuningConfig(vision="frozen"))
    peft_model.train()
    loss = peft_model(**vision_batch(collator)).loss
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert len(grads) == 14 and all(g is not None and g.abs().sum() > 0 for g in grads)
