"""Gemma-3 family on the tiny checkpoint (64 px SigLIP, 16 soft tokens per image).

Token-for-token equality with ``Gemma3Processor`` (pan-and-scan included), hand-derived label masks, golden
LoRA target lists, real freezing of the vision tower, and QLoRA placement.
"""

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

import vlmtune
from vlmtune.data.collator import IGNORE_INDEX, Collator
from vlmtune.families import detect
from vlmtune.families.gemma3 import GEMMA3
from vlmtune.testing import collate, noise, single, turn
from vlmtune.tuning import TuningConfig, apply_tuning, lora_target_names, trainable_parameter_names

SOFT_TOKENS = 16
IMAGE_TEXT = "\n\n<start_of_image>" + "<image_soft_token>" * SOFT_TOKENS + "<end_of_image>\n\n"
PAN_AND_SCAN = {
    "do_pan_and_scan": True,
    "pan_and_scan_min_crop_size": 16,
    "pan_and_scan_max_num_crops": 4,
    "pan_and_scan_min_ratio_to_activate": 1.2,
}


@pytest.fixture(scope="module")
def processor(tiny_gemma):
    return AutoProcessor.from_pretrained(tiny_gemma)


@pytest.fixture(scope="module")
def config(tiny_gemma):
    return AutoConfig.from_pretrained(tiny_gemma)


@pytest.fixture(scope="module")
def collator(processor, config):
    return Collator(detect(config), processor, config)


@pytest.fixture(scope="module")
def model(tiny_gemma):
    """A model for read-only checks (module names); tests that wrap with PEFT load their own."""
    return AutoModelForImageTextToText.from_pretrained(tiny_gemma).eval()


def reference(processor, messages, images, **kwargs):
    text = processor.apply_chat_template(messages, tokenize=False)
    return processor(
        text=[text],
        images=[images] if images else None,
        add_special_tokens=False,
        return_tensors="pt",
        **kwargs,
    )


def assert_matches_processor(batch, ref, with_images=True):
    assert torch.equal(batch["input_ids"], ref["input_ids"])
    assert torch.equal(batch["attention_mask"], ref["attention_mask"])
    assert torch.equal(batch["token_type_ids"], ref["token_type_ids"].long())
    if with_images:
        assert torch.equal(batch["pixel_values"], ref["pixel_values"])
    else:
        assert "pixel_values" not in batch and "pixel_values" not in ref


def count(batch, processor, token: str) -> int:
    return int((batch["input_ids"] == processor.tokenizer.convert_tokens_to_ids(token)).sum())


def test_detect(config):
    assert detect(config) is GEMMA3


# --- fidelity with Gemma3Processor -----------------------------------------------------------------------

SIZES = {
    "1x1": (1, 1),
    "5x5": (5, 5),
    "tall_1_10": (30, 300),
    "wide_10_1": (300, 30),
    "square": (64, 64),
    "larger_than_processor": (1000, 700),
}


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
def test_single_image_matches_processor(collator, processor, size):
    image = noise(size)
    messages = single("Write the LaTeX representation for this image.", r"\frac{a}{b}")
    batch = collate(collator, (messages, [image]))
    assert_matches_processor(batch, reference(processor, messages, [image]))
    assert batch["pixel_values"].shape == (1, 3, 64, 64)
    assert count(batch, processor, "<start_of_image>") == count(batch, processor, "<end_of_image>") == 1
    assert count(batch, processor, "<image_soft_token>") == SOFT_TOKENS
    assert batch["token_type_ids"].sum() == SOFT_TOKENS


def test_multi_image_conversation_matches_processor(collator, processor):
    images = [noise((300, 60), 1), noise((40, 40), 2), noise((100, 200), 3)]
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
    assert batch["pixel_values"].shape == (3, 3, 64, 64)
    assert count(batch, processor, "<image_soft_token>") == 3 * SOFT_TOKENS


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
    text = processor.tokenizer.decode(batch["input_ids"][0])
    assert text.startswith("<bos><start_of_turn>user\nAnswer with the formula only.\n\n\n\n<start_of_image>")


def test_text_only_conversation_matches_processor(collator, processor):
    messages = [
        turn("user", "Say hi."),
        turn("assistant", "hi"),
        turn("user", "Again."),
        turn("assistant", "hi"),
    ]
    batch = collate(collator, (messages, []))
    assert_matches_processor(batch, reference(processor, messages, []), with_images=False)


# 300x60: aspect 5 -> round(5) = 5 crops across, capped by pan_and_scan_max_num_crops=4 (75x60 each, above the
# 16 px minimum); 60x60 is below the 1.2 ratio that activates pan-and-scan.
PAN_CASES = {
    "wide": ([(300, 60)], 4),
    "square_untouched": ([(60, 60)], 0),
    "wide_and_square": ([(300, 60), (60, 60)], 4),
}


@pytest.mark.parametrize(("sizes", "crops"), PAN_CASES.values(), ids=PAN_CASES.keys())
def test_pan_and_scan_matches_processor(processor, config, sizes, crops):
    collator = Collator(GEMMA3, processor, config, image_options=PAN_AND_SCAN)
    images = [noise(size, seed) for seed, size in enumerate(sizes)]
    messages = single("Read the formula.", r"x^{2}", n_images=len(images))
    batch = collate(collator, (messages, images))
    assert_matches_processor(batch, reference(processor, messages, images, **PAN_AND_SCAN))
    sequences = crops + len(images)  # one per crop, plus each original
    assert batch["pixel_values"].shape == (sequences, 3, 64, 64)
    assert count(batch, processor, "<start_of_image>") == sequences
    assert count(batch, processor, "<end_of_image>") == sequences
    assert count(batch, processor, "<image_soft_token>") == SOFT_TOKENS * sequences
    text = processor.tokenizer.decode(batch["input_ids"][0])
    assert text.count("Here is the original image") == (1 if crops else 0)


def test_unknown_image_option_names_the_valid_ones(processor, config):
    with pytest.raises(ValueError, match="max_pixels.*valid: .*do_pan_and_scan"):
        Collator(GEMMA3, processor, config, image_options={"max_pixels": 10})


# --- hand-derived label masks ----------------------------------------------------------------------------


def ids_of(processor, text: str) -> list[int]:
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_labels_cover_exactly_answer_and_end_of_turn(collator, processor):
    tok = processor.tokenizer
    answer = r"\frac{a}{b} + \sqrt{x}"
    enc = collator.encode({"messages": single("Write the LaTeX.", answer), "images": [noise((50, 20))]}, 0)

    prefix = "<bos><start_of_turn>user\n" + IMAGE_TEXT + "Write the LaTeX.<end_of_turn>\n<start_of_turn>model\n"
    prefix_ids, answer_ids = ids_of(processor, prefix), ids_of(processor, answer)
    end_of_turn = tok.convert_tokens_to_ids("<end_of_turn>")
    newline = ids_of(processor, "\n")
    assert newline == [tok.convert_tokens_to_ids("<0x0A>")]
    assert enc.input_ids == prefix_ids + answer_ids + [end_of_turn] + newline

    start = len(prefix_ids)
    stop = start + len(answer_ids) + 1  # the answer and <end_of_turn>; not the "\n" after it
    supervised = [i for i, label in enumerate(enc.labels) if label != IGNORE_INDEX]
    assert supervised == list(range(start, stop))
    assert stop == len(enc.input_ids) - 1
    assert enc.labels[start:stop] == enc.input_ids[start:stop]
    assert enc.input_ids[0] == tok.convert_tokens_to_ids("<bos>") and enc.labels[0] == IGNORE_INDEX
    assert tok.decode([t for t in enc.labels if t != IGNORE_INDEX]) == answer + "<end_of_turn>"


def test_multi_turn_labels_supervise_both_answers_not_the_user_between(collator, processor):
    tok = processor.tokenizer
    a1, a2 = r"\alpha_{1}", "Yes, it is."
    messages = [turn("user", "What?", 1), turn("assistant", a1), turn("user", "Sure?"), turn("assistant", a2)]
    enc = collator.encode({"messages": messages, "images": [noise((64, 64))]}, 0)

    end_of_turn = tok.convert_tokens_to_ids("<end_of_turn>")
    first = "<bos><start_of_turn>user\n" + IMAGE_TEXT + "What?<end_of_turn>\n<start_of_turn>model\n"
    between = "\n<start_of_turn>user\nSure?<end_of_turn>\n<start_of_turn>model\n"
    p1, x1, p2, x2 = (ids_of(processor, s) for s in (first, a1, between, a2))
    assert enc.input_ids == p1 + x1 + [end_of_turn] + p2 + x2 + [end_of_turn] + ids_of(processor, "\n")

    s1 = len(p1)
    s2 = s1 + len(x1) + 1 + len(p2)
    expected = list(range(s1, s1 + len(x1) + 1)) + list(range(s2, s2 + len(x2) + 1))
    assert [i for i, label in enumerate(enc.labels) if label != IGNORE_INDEX] == expected
    assert tok.decode([t for t in enc.labels if t != IGNORE_INDEX]) == a1 + "<end_of_turn>" + a2 + "<end_of_turn>"


def test_padding_positions_are_ignored_and_masked(collator, processor, config):
    short = (single("q", "a"), [noise((64, 64))])
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
    pad_id = processor.tokenizer.convert_tokens_to_ids("<pad>")
    assert batch["input_ids"][0, n0:].tolist() == [pad_id] * (n1 - n0)
    assert batch["labels"][0, n0:].tolist() == [IGNORE_INDEX] * (n1 - n0)
    assert batch["token_type_ids"][0, n0:].eq(0).all()
    assert batch["attention_mask"].tolist() == [[1] * n0 + [0] * (n1 - n0), [1] * n1]
    image_positions = batch["input_ids"] == config.image_token_index
    assert torch.equal(batch["token_type_ids"].bool(), image_positions)
    assert batch["labels"][image_positions].eq(IGNORE_INDEX).all()


# --- golden LoRA lists ------------------------------------------------------------------------------------

# SigLIP declares k_proj, v_proj, q_proj, out_proj in that order; targets come back in model order.
V0_ATTN = [
    "model.vision_tower.encoder.layers.0.self_attn.k_proj",
    "model.vision_tower.encoder.layers.0.self_attn.v_proj",
    "model.vision_tower.encoder.layers.0.self_attn.q_proj",
    "model.vision_tower.encoder.layers.0.self_attn.out_proj",
]
V0_MLP = ["model.vision_tower.encoder.layers.0.mlp.fc1", "model.vision_tower.encoder.layers.0.mlp.fc2"]
V1_ATTN = [
    "model.vision_tower.encoder.layers.1.self_attn.k_proj",
    "model.vision_tower.encoder.layers.1.self_attn.v_proj",
    "model.vision_tower.encoder.layers.1.self_attn.q_proj",
    "model.vision_tower.encoder.layers.1.self_attn.out_proj",
]
V1_MLP = ["model.vision_tower.encoder.layers.1.mlp.fc1", "model.vision_tower.encoder.layers.1.mlp.fc2"]
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

GOLDEN = {
    "both_towers": (dict(), V0_ATTN + V0_MLP + V1_ATTN + V1_MLP + L0_ATTN + L0_MLP + L1_ATTN + L1_MLP),
    "language_only": (dict(vision="frozen"), L0_ATTN + L0_MLP + L1_ATTN + L1_MLP),
    "vision_only": (dict(language="frozen"), V0_ATTN + V0_MLP + V1_ATTN + V1_MLP),
    "language_attention": (dict(vision="frozen", mlp=False), L0_ATTN + L1_ATTN),
    "language_mlp": (dict(vision="frozen", attention=False), L0_MLP + L1_MLP),
    "both_last_layer": (dict(last_n_layers=1), V1_ATTN + V1_MLP + L1_ATTN + L1_MLP),
    "vision_attention_last_layer": (dict(language="frozen", mlp=False, last_n_layers=1), V1_ATTN),
    "mlp_last_layer": (dict(attention=False, last_n_layers=1), V1_MLP + L1_MLP),
    # The projector is a bare weight matrix, not a Linear: "lora" on it alone finds no target.
    "projector_lora_only": (dict(vision="frozen", language="frozen", projector="lora"), []),
}


@pytest.mark.parametrize(("flags", "expected"), GOLDEN.values(), ids=GOLDEN.keys())
def test_golden_lora_targets(model, flags, expected):
    config = TuningConfig(**flags)
    targets = lora_target_names(model, GEMMA3, config)
    assert targets == expected
    if config.vision != "lora":
        assert not [t for t in targets if t.startswith("model.vision_tower")]
    assert not [t for t in targets if t.startswith("model.multi_modal_projector")]
    assert "lm_head" not in targets


def test_nothing_to_train_is_refused(tiny_gemma):
    model = AutoModelForImageTextToText.from_pretrained(tiny_gemma)
    with pytest.raises(ValueError, match="nothing to train"):
        apply_tuning(model, GEMMA3, TuningConfig(vision="frozen", language="frozen", projector="lora"))


def test_full_projector_alone_is_refused_with_a_clear_message(tiny_gemma):
    # A run with no LoRA tower has no adapter to export: refused up front rather than failing inside PEFT.
    model = AutoModelForImageTextToText.from_pretrained(tiny_gemma)
    with pytest.raises(ValueError, match="no tower is set to 'lora'"):
        apply_tuning(model, GEMMA3, TuningConfig(vision="frozen", language="frozen", projector="full"))


def lora_params(names: list[str]) -> set[str]:
    return {f"base_model.model.{n}.lora_{ab}.default.weight" for n in names for ab in "AB"}


PROJECTOR_COPY = "base_model.model.model.multi_modal_projector.modules_to_save.default."

TRAINABLE = {
    "language_only": (dict(vision="frozen"), lora_params(L0_ATTN + L0_MLP + L1_ATTN + L1_MLP)),
    "vision_last_layer": (dict(language="frozen", last_n_layers=1), lora_params(V1_ATTN + V1_MLP)),
    "projector_full": (
        dict(vision="frozen", projector="full", attention=False),
        lora_params(L0_MLP + L1_MLP)
        | {PROJECTOR_COPY + "mm_input_projection_weight", PROJECTOR_COPY + "mm_soft_emb_norm.weight"},
    ),
}


@pytest.mark.parametrize(("flags", "expected"), TRAINABLE.values(), ids=TRAINABLE.keys())
def test_apply_tuning_trains_exactly_the_targets(tiny_gemma, flags, expected):
    model = AutoModelForImageTextToText.from_pretrained(tiny_gemma)
    peft_model = apply_tuning(model, GEMMA3, TuningConfig(**flags))
    assert set(trainable_parameter_names(peft_model)) == expected


def init_lora_b(peft_model) -> None:
    """PEFT starts lora_B at zero, which makes lora_A's grad zero: give B values so every grad informs."""
    torch.manual_seed(0)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)


def vision_batch(collator):
    return collate(collator, (single("Read this.", r"\frac{1}{2}"), [noise((80, 40))]))


# --- QLoRA -------------------------------------------------------------------------------------------------


def test_qlora_quantizes_exactly_the_language_linears_and_trains(tiny_gemma, collator):
    import bitsandbytes as bnb

    model, processor, family = vlmtune.load(tiny_gemma, quant="nf4", device="cpu")
    assert family is GEMMA3
    four_bit = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert four_bit == L0_ATTN + L0_MLP + L1_ATTN + L1_MLP
    plain = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear]
    assert plain == V0_ATTN + V0_MLP + V1_ATTN + V1_MLP + ["lm_head"]
    for name in plain:
        assert model.get_submodule(name).weight.dtype == torch.float32, name
    assert model.model.multi_modal_projector.mm_input_projection_weight.dtype == torch.float32
    assert model.model.language_model.layers[1].self_attn.q_proj.weight.quant_state.quant_type == "nf4"

    peft_model = apply_tuning(model, family, TuningConfig(vision="frozen"))
    peft_model.train()
    loss = peft_model(**vision_batch(collator)).loss
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert len(grads) == 14 and all(g is not None and g.abs().sum() > 0 for g in grads)
