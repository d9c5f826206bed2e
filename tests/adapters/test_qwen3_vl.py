"""Qwen3-VL family on its tiny checkpoint.

Qwen3-VL cuts 16 px patches merged 2x2 (sides are multiples of 32), normalises with mean/std 0.5, writes no
default system turn, names its vision MLP ``linear_fc1``/``linear_fc2`` (so do its mergers), and feeds
intermediate vision features to the first text layers through DeepStack mergers, which are projector modules.
The tests check token-for-token equality with ``Qwen3VLProcessor``, hand-derived label masks, M-RoPE positions
against the model's own ``get_rope_index`` on a right-padded batch, golden LoRA lists, and real freezing.
"""

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

import vlmtune
from vlmtune.data.collator import IGNORE_INDEX, Collator
from vlmtune.families import detect
from vlmtune.families.qwen_vl import QWEN3_VL
from vlmtune.testing import collate, noise, single, turn
from vlmtune.tuning import TuningConfig, apply_tuning, lora_target_names, trainable_parameter_names


@pytest.fixture(scope="module")
def processor(tiny_qwen3_vl):
    return AutoProcessor.from_pretrained(tiny_qwen3_vl)


@pytest.fixture(scope="module")
def config(tiny_qwen3_vl):
    return AutoConfig.from_pretrained(tiny_qwen3_vl)


@pytest.fixture(scope="module")
def collator(processor, config):
    return Collator(detect(config), processor, config)


@pytest.fixture(scope="module")
def model(tiny_qwen3_vl):
    return AutoModelForImageTextToText.from_pretrained(tiny_qwen3_vl).eval()


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


def test_detect_and_processor_settings(config, processor, model):
    assert detect(config) is QWEN3_VL
    assert type(processor).__name__ == "Qwen3VLProcessor"
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration"
    image_processor = processor.image_processor
    assert (image_processor.patch_size, image_processor.merge_size) == (16, 2)
    assert list(image_processor.image_mean) == list(image_processor.image_std) == [0.5] * 3
    assert config.text_config.rope_parameters["mrope_interleaved"] is True


# --- fidelity with Qwen3VLProcessor ----------------------------------------------------------------------

# PIL size (width, height) -> grid (t, h, w) of 16 px patches under the tiny min 64*64, max 256*256 pixels,
# derived by hand from smart_resize with factor 32:
# - 5x5: rounds to 32x32 = 1024 < 4096, scaled up by sqrt(4096/25) = 12.8 and ceiled to 64x64 -> 4x4;
# - 30x300: round(30/32) = 1, round(300/32) = 9 -> 32x288 = 9216 fits -> 2x18 (and the transpose);
# - 1000x700: 992x704 is over 65536, beta = sqrt(700000/65536) = 3.268, floor to 288x192 -> 18x12.
SIZES = {
    "tiny_5x5": ((5, 5), (1, 4, 4)),
    "tall_1_10": ((30, 300), (1, 18, 2)),
    "wide_10_1": ((300, 30), (1, 2, 18)),
    "square": ((128, 128), (1, 8, 8)),
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
    assert batch["pixel_values"].shape == (t * h * w, 3 * 2 * 16 * 16)


def test_max_pixels_option_matches_processor(processor, config):
    collator = Collator(QWEN3_VL, processor, config, image_options={"max_pixels": 128 * 128})
    images = [noise((1000, 700), 1), noise((20, 20), 2)]
    messages = single("Two images.", "ok", n_images=2)
    batch = collate(collator, (messages, images))
    size = {"shortest_edge": 64 * 64, "longest_edge": 128 * 128}
    assert_matches_processor(batch, reference(processor, messages, images, size=size))
    # 1000x700 under 16384 px: beta = sqrt(700000/16384) = 6.54 -> 128x96 -> 8x6 patches.
    assert batch["image_grid_thw"].tolist() == [[1, 6, 8], [1, 4, 4]]


def test_multi_image_multi_turn_with_system_matches_processor(collator, processor):
    images = [noise((300, 60), 1), noise((64, 64), 2), noise((30, 300), 3)]
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Answer with the formula only."}]},
        turn("user", "Compare", 2),
        turn("assistant", r"\alpha + \beta"),
        turn("user", "And here?", 1),
        turn("assistant", r"\sqrt{x}"),
    ]
    batch = collate(collator, (messages, images))
    assert_matches_processor(batch, reference(processor, messages, images))
    text = processor.tokenizer.decode(batch["input_ids"][0])
    assert text.startswith("<|im_start|>system\nAnswer with the formula only.<|im_end|>\n<|im_start|>user\n")


def test_text_only_conversation_matches_processor(collator, processor):
    messages = [turn("user", "Say hi."), turn("assistant", "hi")]
    batch = collate(collator, (messages, []))
    assert_matches_processor(batch, reference(processor, messages, []), with_images=False)


# --- hand-derived label masks ----------------------------------------------------------------------------


def ids_of(processor, text: str) -> list[int]:
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_labels_cover_exactly_answer_and_im_end_with_no_default_system(collator, processor):
    tok = processor.tokenizer
    a1, a2 = r"\frac{a}{b}+\sqrt{x}", "Yes."
    messages = [
        turn("user", "Write the LaTeX.", 1),
        turn("assistant", a1),
        turn("user", "Sure?"),
        turn("assistant", a2),
    ]
    enc = collator.encode({"messages": messages, "images": [noise((64, 64))]}, 0)

    # No system turn; 64x64 -> grid 1x4x4 -> 4 image pads.
    first = "<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * 4 + "<|vision_end|>"
    first += "Write the LaTeX.<|im_end|>\n<|im_start|>assistant\n"
    between = "\n<|im_start|>user\nSure?<|im_end|>\n<|im_start|>assistant\n"
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    p1, x1, p2, x2 = (ids_of(processor, s) for s in (first, a1, between, a2))
    assert enc.input_ids == p1 + x1 + [im_end] + p2 + x2 + [im_end] + ids_of(processor, "\n")
    s1 = len(p1)
    s2 = s1 + len(x1) + 1 + len(p2)
    expected = list(range(s1, s1 + len(x1) + 1)) + list(range(s2, s2 + len(x2) + 1))
    assert [i for i, label in enumerate(enc.labels) if label != IGNORE_INDEX] == expected
    assert tok.decode([t for t in enc.labels if t != IGNORE_INDEX]) == a1 + "<|im_end|>" + a2 + "<|im_end|>"


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
    # 300x60 -> 288x64 -> grid 1x4x18 -> 2x9 merged: text after it resumes 9 positions on, not 18.
    n = lengths[0]
    assert int(batch["position_ids"][0, 0, n - 1]) == n - 1 - 18 + 9


def test_explicit_positions_give_the_same_loss_as_the_model_s_own(collator, tiny_qwen3_vl):
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen3_vl).eval()
    batch = collate(
        collator,
        (single("Read this.", r"x^{2}"), [noise((96, 64), 1)]),
        (single("And this one, please.", r"\frac{1}{2} + \sqrt{3}"), [noise((64, 160), 2)]),
    )
    with torch.no_grad():
        ours = model(**batch).loss
        own = model(**{k: v for k, v in batch.items() if k != "position_ids"}).loss
    torch.testing.assert_close(ours, own, rtol=0, atol=0)


# --- golden LoRA lists ------------------------------------------------------------------------------------


def vision(block: int, kind: str) -> list[str]:
    names = ["attn.qkv", "attn.proj"] if kind == "attention" else ["mlp.linear_fc1", "mlp.linear_fc2"]
    return [f"model.visual.blocks.{block}.{n}" for n in names]


def language(layer: int, kind: str) -> list[str]:
    if kind == "attention":
        names = [f"self_attn.{p}_proj" for p in "qkvo"]
    else:
        names = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    return [f"model.language_model.layers.{layer}.{n}" for n in names]


V_ALL = vision(0, "attention") + vision(0, "mlp") + vision(1, "attention") + vision(1, "mlp")
L_ALL = language(0, "attention") + language(0, "mlp") + language(1, "attention") + language(1, "mlp")
PROJECTORS = [
    "model.visual.merger.linear_fc1",
    "model.visual.merger.linear_fc2",
    "model.visual.deepstack_merger_list.0.linear_fc1",
    "model.visual.deepstack_merger_list.0.linear_fc2",
]

GOLDEN = {
    "both_towers": (dict(), V_ALL + L_ALL),
    "language_only": (dict(vision="frozen"), L_ALL),
    "vision_only": (dict(language="frozen"), V_ALL),
    "language_attention": (dict(vision="frozen", mlp=False), language(0, "attention") + language(1, "attention")),
    "vision_mlp_last_layer": (dict(language="frozen", attention=False, last_n_layers=1), vision(1, "mlp")),
    "mlp_last_layer": (dict(attention=False, last_n_layers=1), vision(1, "mlp") + language(1, "mlp")),
    "projector_lora_only": (dict(vision="frozen", language="frozen", projector="lora"), PROJECTORS),
}


@pytest.mark.parametrize(("flags", "expected"), GOLDEN.values(), ids=GOLDEN.keys())
def test_golden_lora_targets(model, flags, expected):
    config = TuningConfig(**flags)
    targets = lora_target_names(model, QWEN3_VL, config)
    assert targets == expected
    if config.projector != "lora":  # the mergers' linear_fc1/fc2 share the vision MLP's names
        assert not [t for t in targets if ".merger" in t]
    assert "lm_head" not in targets


def test_tower_of_puts_both_mergers_in_the_projector():
    assert QWEN3_VL.tower_of("model.visual.deepstack_merger_list.0.linear_fc1") == "projector"
    assert QWEN3_VL.tower_of("model.visual.deepstack_merger_list.2.linear_fc2") == "projector"
    assert QWEN3_VL.tower_of("model.visual.merger.norm") == "projector"
    assert QWEN3_VL.tower_of("model.visual.blocks.1.mlp.linear_fc1") == "vision"
    assert QWEN3_VL.tower_of("model.visual.pos_embed") == "vision"
    assert QWEN3_VL.tower_of("model.language_model.layers.0.self_attn.q_norm") == "language"


def lora_params(names: list[str]) -> set[str]:
    return {f"base_model.model.{n}.lora_{ab}.default.weight" for n in names for ab in "AB"}


def merger_copy(prefix: str) -> set[str]:
    params = (
        "norm.weight",
        "norm.bias",
        "linear_fc1.weight",
        "linear_fc1.bias",
        "linear_fc2.weight",
        "linear_fc2.bias",
    )
    return {f"base_model.model.model.visual.{prefix}.modules_to_save.default.{p}" for p in params}


TRAINABLE = {
    "language_only": (dict(vision="frozen"), lora_params(L_ALL)),
    "both_last_layer": (
        dict(last_n_layers=1),
        lora_params(vision(1, "attention") + vision(1, "mlp") + language(1, "attention") + language(1, "mlp")),
    ),
    "projector_full": (
        dict(vision="frozen", projector="full", mlp=False),
        lora_params(language(0, "attention") + language(1, "attention"))
        | merger_copy("merger")
        | merger_copy("deepstack_merger_list.0"),
    ),
}


@pytest.mark.parametrize(("flags", "expected"), TRAINABLE.values(), ids=TRAINABLE.keys())
def test_apply_tuning_trains_exactly_the_targets(tiny_qwen3_vl, flags, expected):
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen3_vl)
    peft_model = apply_tuning(model, QWEN3_VL, TuningConfig(**flags))
    assert set(trainable_parameter_names(peft_model)) == expected


def test_frozen_vision_gets_no_grads_and_language_lora_does(tiny_qwen3_vl, collator):
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen3_vl)
    peft_model = apply_tuning(model, QWEN3_VL, TuningConfig(vision="frozen"))
    torch.manual_seed(0)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero, which would make every A grad zero
            torch.nn.init.normal_(param, std=0.02)
    peft_model.train()
    outputs = []
    visual = peft_model.get_base_model().model.visual
    visual.register_forward_hook(lambda _m, _args, out: outputs.append(out.pooler_output))
    batch = collate(collator, (single("Read this.", r"\frac{1}{2}"), [noise((128, 64))]))
    loss = peft_model(**batch).loss
    loss.backward()
    assert outputs and not outputs[0].requires_grad
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        if ".visual." in name:
            assert param.grad is None, name


def test_qlora_quantizes_exactly_the_language_linears_and_trains(tiny_qwen3_vl, collator):
    import bitsandbytes as bnb

    model, _processor, family = vlmtune.load(tiny_qwen3_vl, quant="nf4", device="cpu")
    assert family is QWEN3_VL
    assert [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)] == L_ALL
    plain = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear]
    assert plain == V_ALL + PROJECTORS + ["lm_head"]
    peft_model = apply_tuning(model, family, TuningConfig(vision="frozen"))
    peft_model.train()
    loss = peft_model(**collate(collator, (single("Read.", "x"), [noise((64, 96))]))).loss
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert len(grads) == 14 and all(g is not None and g.abs().sum() > 0 for g in grads)
