"""Qwen2-VL on the shared Qwen-VL family, with its own tiny checkpoint.

Qwen2-VL differs from Qwen2.5-VL where LoRA placement can go wrong: its vision MLP is ``fc1``/``fc2`` (the
names SigLIP uses too) and its merger is ``merger.mlp.0/2``. The tests check token-for-token equality with
``Qwen2VLProcessor``, hand-derived label masks, M-RoPE positions against the model's own ``get_rope_index`` on
a right-padded batch, golden LoRA lists, and one training step.
"""

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from vlmtune.data.collator import IGNORE_INDEX, Collator
from vlmtune.families import detect
from vlmtune.families.qwen_vl import QWEN2_5_VL
from vlmtune.testing import collate, noise, single, turn
from vlmtune.tuning import TuningConfig, apply_tuning, lora_target_names, trainable_parameter_names

SYSTEM_DEFAULT = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


@pytest.fixture(scope="module")
def processor(tiny_qwen2_vl):
    return AutoProcessor.from_pretrained(tiny_qwen2_vl)


@pytest.fixture(scope="module")
def config(tiny_qwen2_vl):
    return AutoConfig.from_pretrained(tiny_qwen2_vl)


@pytest.fixture(scope="module")
def collator(processor, config):
    return Collator(detect(config), processor, config)


@pytest.fixture(scope="module")
def model(tiny_qwen2_vl):
    return AutoModelForImageTextToText.from_pretrained(tiny_qwen2_vl).eval()


def reference(processor, messages, images, **image_kwargs):
    text = processor.apply_chat_template(messages, tokenize=False)
    return processor(
        text=[text],
        images=[images] if images else None,
        add_special_tokens=False,
        return_tensors="pt",
        **image_kwargs,
    )


def assert_matches_processor(batch, ref, with_images=True):
    assert torch.equal(batch["input_ids"], ref["input_ids"])
    assert torch.equal(batch["attention_mask"], ref["attention_mask"])
    assert torch.equal(batch["mm_token_type_ids"], ref["mm_token_type_ids"].long())
    if with_images:
        assert torch.equal(batch["pixel_values"], ref["pixel_values"])
        assert torch.equal(batch["image_grid_thw"], ref["image_grid_thw"])
    else:
        assert "pixel_values" not in batch and "pixel_values" not in ref


def test_detect_gives_the_shared_qwen_vl_adapter(config, processor, model):
    assert config.model_type == "qwen2_vl"
    assert detect(config) is QWEN2_5_VL
    assert type(processor).__name__ == "Qwen2VLProcessor"
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"


# --- fidelity with Qwen2VLProcessor ----------------------------------------------------------------------

# PIL size (width, height) -> grid (t, h, w) of 14 px patches under the tiny min_pixels=56*56,
# max_pixels=224*224, derived by hand from smart_resize (factor 28, aspect ratio <= 200):
# - 5x5: rounds to 28x28 = 784 < 3136, so scaled up by sqrt(3136/25) and ceiled to 56x56 -> 4x4;
# - 30x300: 28x308 = 8624 fits -> 2x22 (and the transpose for 300x30);
# - 1000x700: 1008x700 is over 50176, beta = sqrt(700000/50176) = 3.735, floor to 252x168 -> 18x12.
SIZES = {
    "tiny_5x5": ((5, 5), (1, 4, 4)),
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
    # `size` works on every transformers 5.x; 5.17 ignores a lone min_pixels or max_pixels call kwarg.
    size = {"shortest_edge": options.get("min_pixels", 56 * 56), "longest_edge": options.get("max_pixels", 224 * 224)}
    assert_matches_processor(batch, reference(processor, messages, images, size=size))
    assert batch["image_grid_thw"].tolist() == grids


def test_multi_image_multi_turn_with_system_matches_processor(collator, processor, config):
    images = [noise((300, 60), 1), noise((56, 56), 2), noise((30, 300), 3)]
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Answer with the formula only."}]},
        turn("user", "Compare", 2),
        turn("assistant", r"\alpha + \beta"),
        turn("user", "And here?", 1),
        turn("assistant", r"\sqrt{x}"),
    ]
    batch = collate(collator, (messages, images))
    assert_matches_processor(batch, reference(processor, messages, images))
    assert batch["image_grid_thw"].tolist() == [[1, 4, 22], [1, 4, 4], [1, 22, 2]]
    assert SYSTEM_DEFAULT not in processor.tokenizer.decode(batch["input_ids"][0])


def test_text_only_conversation_matches_processor(collator, processor):
    messages = [turn("user", "Say hi."), turn("assistant", "hi")]
    batch = collate(collator, (messages, []))
    assert_matches_processor(batch, reference(processor, messages, []), with_images=False)
    assert batch["position_ids"][0, 0].tolist() == list(range(batch["input_ids"].shape[1]))


# --- hand-derived label masks ----------------------------------------------------------------------------


def ids_of(processor, text: str) -> list[int]:
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_labels_cover_exactly_answer_and_im_end(collator, processor):
    tok = processor.tokenizer
    answer = r"\frac{a}{b}+\sqrt{x}"
    enc = collator.encode({"messages": single("Write the LaTeX.", answer), "images": [noise((56, 56))]}, 0)

    # The default system turn, then 56x56 -> grid 1x4x4 -> 4 image pads.
    prefix = (
        SYSTEM_DEFAULT + "<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * 4 + "<|vision_end|>"
        "Write the LaTeX.<|im_end|>\n<|im_start|>assistant\n"
    )
    prefix_ids, answer_ids = ids_of(processor, prefix), ids_of(processor, answer)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert enc.input_ids == prefix_ids + answer_ids + [im_end] + ids_of(processor, "\n")
    start, stop = len(prefix_ids), len(prefix_ids) + len(answer_ids) + 1
    assert [i for i, label in enumerate(enc.labels) if label != IGNORE_INDEX] == list(range(start, stop))
    assert enc.labels[start:stop] == enc.input_ids[start:stop]


# --- M-RoPE -----------------------------------------------------------------------------------------------


def test_mrope_positions_equal_model_get_rope_index_on_a_right_padded_batch(collator, model):
    rows = (
        (single("Read this.", r"x^{2} + y"), [noise((300, 60), 7)]),
        (
            [turn("user", "Two:", 2), turn("assistant", "a"), turn("user", "ok"), turn("assistant", "b")],
            [noise((64, 64), 8), noise((100, 200), 9)],
        ),
        ([turn("user", "No image."), turn("assistant", "fine")], []),
    )
    batch = collate(collator, *rows)
    lengths = batch["attention_mask"].sum(1).tolist()
    assert len(set(lengths)) == 3
    expected, _deltas = model.model.get_rope_index(
        batch["input_ids"],
        mm_token_type_ids=batch["mm_token_type_ids"],
        image_grid_thw=batch["image_grid_thw"],
        attention_mask=batch["attention_mask"],
    )
    mask = batch["attention_mask"].bool()
    assert torch.equal(batch["position_ids"][:, mask], expected[:, mask])
    assert batch["position_ids"][:, ~mask].eq(0).all()


# --- golden LoRA lists ------------------------------------------------------------------------------------


def vision(block: int, kind: str) -> list[str]:
    names = ["attn.qkv", "attn.proj"] if kind == "attention" else ["mlp.fc1", "mlp.fc2"]
    return [f"model.visual.blocks.{block}.{n}" for n in names]


def language(layer: int, kind: str) -> list[str]:
    if kind == "attention":
        names = [f"self_attn.{p}_proj" for p in "qkvo"]
    else:
        names = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    return [f"model.language_model.layers.{layer}.{n}" for n in names]


V_ALL = vision(0, "attention") + vision(0, "mlp") + vision(1, "attention") + vision(1, "mlp")
L_ALL = language(0, "attention") + language(0, "mlp") + language(1, "attention") + language(1, "mlp")
MERGER = ["model.visual.merger.mlp.0", "model.visual.merger.mlp.2"]

GOLDEN = {
    "both_towers": (dict(), V_ALL + L_ALL),
    "language_only": (dict(vision="frozen"), L_ALL),
    "vision_only": (dict(language="frozen"), V_ALL),
    "language_mlp": (dict(vision="frozen", attention=False), language(0, "mlp") + language(1, "mlp")),
    "vision_mlp_last_layer": (dict(language="frozen", attention=False, last_n_layers=1), vision(1, "mlp")),
    "attention_last_layer": (dict(mlp=False, last_n_layers=1), vision(1, "attention") + language(1, "attention")),
    "projector_lora_only": (dict(vision="frozen", language="frozen", projector="lora"), MERGER),
}


@pytest.mark.parametrize(("flags", "expected"), GOLDEN.values(), ids=GOLDEN.keys())
def test_golden_lora_targets(model, flags, expected):
    config = TuningConfig(**flags)
    targets = lora_target_names(model, QWEN2_5_VL, config)
    assert targets == expected
    if config.vision != "lora":  # language-only LoRA never reaches the vision fc1/fc2
        assert not [t for t in targets if ".visual.blocks." in t]
    assert "lm_head" not in targets


def lora_params(names: list[str]) -> set[str]:
    return {f"base_model.model.{n}.lora_{ab}.default.weight" for n in names for ab in "AB"}


MERGER_COPY = "base_model.model.model.visual.merger.modules_to_save.default."

TRAINABLE = {
    "language_only": (dict(vision="frozen"), lora_params(L_ALL)),
    "projector_full": (
        dict(vision="frozen", projector="full", attention=False),
        lora_params(language(0, "mlp") + language(1, "mlp"))
        | {
            MERGER_COPY + p
            for p in ("ln_q.weight", "ln_q.bias", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias")
        },
    ),
}


@pytest.mark.parametrize(("flags", "expected"), TRAINABLE.values(), ids=TRAINABLE.keys())
def test_apply_tuning_trains_exactly_the_targets(tiny_qwen2_vl, flags, expected):
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen2_vl)
    peft_model = apply_tuning(model, QWEN2_5_VL, TuningConfig(**flags))
    assert set(trainable_parameter_names(peft_model)) == expected


def test_one_training_step_changes_only_lora(tiny_qwen2_vl, collator):
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen2_vl)
    peft_model = apply_tuning(model, QWEN2_5_VL, TuningConfig(vision="lora", r=4))
    peft_model.train()
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.1)
    batch = collate(collator, (single("Read this.", r"\frac{1}{2}"), [noise((112, 56))]))
    loss = peft_model(**batch).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    for name, param in peft_model.named_parameters():
        changed = not torch.equal(before[name], param.detach())
        # lora_B starts at zero, so A's first gradient is zero: one step moves every B and nothing frozen.
        if "lora_B" in name:
            assert changed, name
        elif "lora_" not in name:
            assert not changed, name
