"""MiniCPM-V 4.6 (native transformers layout) family on its tiny checkpoint.

Token-for-token and pixel-for-pixel equality with ``MiniCPMV4_6Processor`` in both downsample modes, a
hand-derived table of views and tokens, hand-derived label masks, the ``downsample_mode`` batch key, golden
LoRA lists over the hybrid Qwen3.5 text tower, and training steps with frozen and trained towers.
"""

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from vlmtune.data.collator import IGNORE_INDEX, Collator
from vlmtune.data.schema import DataError
from vlmtune.families import detect
from vlmtune.families.minicpmv4_6.family import MINICPMV4_6, num_image_tokens
from vlmtune.testing import collate, noise, single, turn
from vlmtune.tuning import TuningConfig, apply_tuning, lora_target_names, trainable_parameter_names


@pytest.fixture(scope="module")
def processor(tiny_minicpmv4_6):
    return AutoProcessor.from_pretrained(tiny_minicpmv4_6)


@pytest.fixture(scope="module")
def config(tiny_minicpmv4_6):
    return AutoConfig.from_pretrained(tiny_minicpmv4_6)


@pytest.fixture(scope="module")
def collator(processor, config):
    return Collator(detect(config), processor, config)


@pytest.fixture(scope="module")
def model(tiny_minicpmv4_6):
    return AutoModelForImageTextToText.from_pretrained(tiny_minicpmv4_6).eval()


def reference(processor, conversations, images, **image_kwargs):
    texts = [processor.apply_chat_template(m, tokenize=False) for m in conversations]
    return processor(text=texts, images=images if any(images) else None, return_tensors="pt", **image_kwargs)


def assert_matches_processor(batch, ref):
    assert torch.equal(batch["input_ids"], ref["input_ids"])
    assert torch.equal(batch["attention_mask"], ref["attention_mask"])
    assert torch.equal(batch["pixel_values"], ref["pixel_values"])
    assert torch.equal(batch["target_sizes"], ref["target_sizes"])


def test_detect_and_processor(config, processor, model):
    assert detect(config) is MINICPMV4_6
    assert type(processor).__name__ == "MiniCPMV4_6Processor"
    assert type(model).__name__ == "MiniCPMV4_6ForConditionalGeneration"
    assert config.text_config.layer_types == ["linear_attention", "full_attention"]


# --- fidelity with MiniCPMV4_6Processor ------------------------------------------------------------------

# PIL size (width, height) -> patch grids (rows, cols) of the source view and the slices, and the tokens at 16x,
# derived by hand for the tiny processor (scale_resolution 112, patch 14, sides rounded to multiples of 56):
# - 5x5: one view (5*5 < 112^2), upscaled to about 112^2 keeping the aspect: 112x112 -> 8x8 patches, 4 tokens;
# - 30x300: one view, height int(112 / sqrt(0.1)) = 354 -> 336, width int(35.4) = 35 -> 56: 24x4, 6 tokens;
# - 300x30: the transpose, 4x24, 6 tokens;
# - 1000x700: 55.8 x 112^2, so min(56, 9) = 9 slices at most; among 8 and 9 slices the grid closest to
#   log(1000/700) is 2 rows x 4 cols (|0.357 - log 2| = 0.337 beats 3x3's 0.357); the source is ~93x132 ->
#   112x112 and each 350x250 slice is ~132x94 -> 112x112: 9 views of 8x8, 9 * 4 = 36 tokens.
SIZES = {
    "tiny_5x5": ((5, 5), [(8, 8)], 4),
    "tall_1_10": ((30, 300), [(24, 4)], 6),
    "wide_10_1": ((300, 30), [(4, 24)], 6),
    "sliced_2x4": ((1000, 700), [(8, 8)] * 9, 36),
}


@pytest.mark.parametrize(("size", "views", "tokens"), SIZES.values(), ids=SIZES.keys())
def test_single_image_matches_processor_16x(collator, processor, config, size, views, tokens):
    image = noise(size)
    messages = single("Write the LaTeX representation for this image.", r"\frac{a}{b}")
    batch = collate(collator, (messages, [image]))
    assert_matches_processor(batch, reference(processor, [messages], [[image]]))
    assert [tuple(v) for v in batch["target_sizes"].tolist()] == views
    assert int((batch["input_ids"] == config.image_token_id).sum()) == tokens
    assert batch["pixel_values"].shape == (1, 3, 14, sum(h * w for h, w in views) * 14)
    assert "downsample_mode" not in batch  # the model's config says 16x already


@pytest.mark.parametrize("size", [v[0] for v in SIZES.values()], ids=SIZES.keys())
def test_single_image_matches_processor_4x(processor, config, size):
    collator = Collator(MINICPMV4_6, processor, config, image_options={"downsample_mode": "4x"})
    image = noise(size)
    messages = single("Read.", "x")
    batch = collate(collator, (messages, [image]))
    assert_matches_processor(batch, reference(processor, [messages], [[image]], downsample_mode="4x"))
    # 4x skips the in-tower merge: a quarter of each view's patches, four times the 16x budget per patch.
    tokens = int((batch["target_sizes"].prod(-1) // 4).sum())
    assert int((batch["input_ids"] == config.image_token_id).sum()) == tokens
    assert batch["downsample_mode"] == "4x"


@pytest.mark.parametrize(
    ("options", "views", "id_tags"),
    [
        # 4 slices at most: 2x2 (|0.357 - 0| beats 1x3's 0.742); 350x500 slices -> 112x112.
        ({"max_slice_nums": 4}, 5, 1),
        ({"slice_mode": False}, 1, 1),
        ({"use_image_id": False}, 9, 0),
    ],
    ids=["max_slice_nums", "no_slices", "no_image_id"],
)
def test_image_options_match_processor(processor, config, options, views, id_tags):
    collator = Collator(MINICPMV4_6, processor, config, image_options=options)
    image = noise((1000, 700), 3)
    messages = single("Read.", "x")
    batch = collate(collator, (messages, [image]))
    assert_matches_processor(batch, reference(processor, [messages], [[image]], **options))
    assert len(batch["target_sizes"]) == views
    assert processor.tokenizer.decode(batch["input_ids"][0]).count("<image_id>") == id_tags


@pytest.mark.skipif(
    Version(transformers.__version__) < Version("5.19"), reason="views of several sizes need transformers>=5.19 at 16x"
)
def test_two_images_two_turns_and_a_padded_batch_match_processor(collator, processor):
    first = [
        {"role": "system", "content": [{"type": "text", "text": "Answer with the formula only."}]},
        turn("user", "Compare", 2),
        turn("assistant", r"\alpha + \beta"),
        turn("user", "And here?", 1),
        turn("assistant", r"\sqrt{x}"),
    ]
    second = single("Read.", "y")
    images = [[noise((300, 60), 1), noise((56, 56), 2), noise((1000, 700), 3)], [noise((64, 200), 4)]]
    batch = collate(collator, (first, images[0]), (second, images[1]))
    ref = reference(processor, [first, second], images)  # left-padded by the processor
    assert torch.equal(batch["pixel_values"], ref["pixel_values"])  # every view of both samples, in order
    assert torch.equal(batch["target_sizes"], ref["target_sizes"])
    for b in range(2):
        ours = batch["input_ids"][b, batch["attention_mask"][b].bool()]
        assert torch.equal(ours, ref["input_ids"][b, ref["attention_mask"][b].bool()])
    text = processor.tokenizer.decode(batch["input_ids"][0])
    assert [text.count(f"<image_id>{i}</image_id>") for i in range(3)] == [1, 1, 1]  # ids count per sample


# --- hand-derived label masks ----------------------------------------------------------------------------


def ids_of(processor, text: str) -> list[int]:
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_labels_cover_exactly_answer_and_im_end(collator, processor):
    tok = processor.tokenizer
    answer = r"\frac{a}{b}+\sqrt{x}"
    enc = collator.encode({"messages": single("Write the LaTeX.", answer), "images": [noise((112, 112))]}, 0)

    # 112x112: one 8x8 view, 4 tokens at 16x.
    prefix = (
        "<|im_start|>user\n<image_id>0</image_id><image>" + "<|image_pad|>" * 4 + "</image>"
        "Write the LaTeX.<|im_end|>\n<|im_start|>assistant\n"
    )
    prefix_ids, answer_ids = ids_of(processor, prefix), ids_of(processor, answer)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert enc.input_ids == prefix_ids + answer_ids + [im_end] + ids_of(processor, "\n")
    start, stop = len(prefix_ids), len(prefix_ids) + len(answer_ids) + 1
    assert [i for i, label in enumerate(enc.labels) if label != IGNORE_INDEX] == list(range(start, stop))
    assert tok.decode([t for t in enc.labels if t != IGNORE_INDEX]) == answer + "<|im_end|>"


def test_num_image_tokens_follows_the_mode(collator):
    enc = collator.encode({"messages": single("q", "a"), "images": [noise((1000, 700))]}, 0)
    info = enc.images.infos[0]
    assert info["grid"] == (2, 4) and num_image_tokens(info) == 36
    assert num_image_tokens({**info, "downsample_mode": "4x"}) == 9 * 64 // 4


def test_unknown_downsample_mode_is_a_data_error_naming_the_row(processor, config):
    collator = Collator(MINICPMV4_6, processor, config, image_options={"downsample_mode": "8x"})
    with pytest.raises(DataError, match=r"^row 3: .*downsample_mode"):
        collator.encode({"messages": single("q", "a"), "images": [noise((64, 64))]}, 3)


# --- golden LoRA lists ------------------------------------------------------------------------------------


def vision(layer: int, kind: str) -> list[str]:
    # SigLIP declares k, v, q, out in that order; targets come back in model order.
    names = [f"self_attn.{p}_proj" for p in ("k", "v", "q", "out")] if kind == "attention" else ["mlp.fc1", "mlp.fc2"]
    return [f"model.vision_tower.encoder.layers.{layer}.{n}" for n in names]


L0_ATTN = [f"model.language_model.layers.0.linear_attn.{n}" for n in ("out_proj", "in_proj_qkv", "in_proj_z")]
L1_ATTN = [f"model.language_model.layers.1.self_attn.{p}_proj" for p in "qkvo"]
L0_MLP = [f"model.language_model.layers.0.mlp.{p}_proj" for p in ("gate", "up", "down")]
L1_MLP = [f"model.language_model.layers.1.mlp.{p}_proj" for p in ("gate", "up", "down")]
V_ALL = vision(0, "attention") + vision(0, "mlp") + vision(1, "attention") + vision(1, "mlp")
L_ALL = L0_ATTN + L0_MLP + L1_ATTN + L1_MLP
VIT_MERGER = [f"model.vision_tower.vit_merger.self_attn.{p}_proj" for p in ("k", "v", "q", "out")] + [
    "model.vision_tower.vit_merger.linear_1",
    "model.vision_tower.vit_merger.linear_2",
]
MERGER = ["model.merger.mlp.0.linear_1", "model.merger.mlp.0.linear_2"]

GOLDEN = {
    "both_towers": (dict(), V_ALL + L_ALL),
    "language_only": (dict(vision="frozen"), L_ALL),
    "vision_only": (dict(language="frozen"), V_ALL),
    "language_attention": (dict(vision="frozen", mlp=False), L0_ATTN + L1_ATTN),
    "language_attention_last_layer": (dict(vision="frozen", mlp=False, last_n_layers=1), L1_ATTN),
    "mlp_last_layer": (dict(attention=False, last_n_layers=1), vision(1, "mlp") + L1_MLP),
    "projector_lora_only": (dict(vision="frozen", language="frozen", projector="lora"), VIT_MERGER + MERGER),
}


@pytest.mark.parametrize(("flags", "expected"), GOLDEN.values(), ids=GOLDEN.keys())
def test_golden_lora_targets(model, flags, expected):
    config = TuningConfig(**flags)
    targets = lora_target_names(model, MINICPMV4_6, config)
    assert targets == expected
    assert not [t for t in targets if t.endswith(("in_proj_a", "in_proj_b"))]
    if config.projector != "lora":
        assert not [t for t in targets if "merger" in t]
    assert "lm_head" not in targets


def test_tower_of_puts_both_mergers_in_the_projector():
    assert MINICPMV4_6.tower_of("model.vision_tower.vit_merger.linear_1") == "projector"
    assert MINICPMV4_6.tower_of("model.merger.mlp.0.pre_norm") == "projector"
    assert MINICPMV4_6.tower_of("model.vision_tower.encoder.layers.0.mlp.fc1") == "vision"
    assert MINICPMV4_6.tower_of("model.language_model.layers.0.linear_attn.dt_bias") == "language"


def lora_params(names: list[str]) -> set[str]:
    return {f"base_model.model.{n}.lora_{ab}.default.weight" for n in names for ab in "AB"}


def test_full_projector_trains_both_mergers_and_nothing_else_of_the_vision_tower(tiny_minicpmv4_6):
    model = AutoModelForImageTextToText.from_pretrained(tiny_minicpmv4_6)
    peft_model = apply_tuning(model, MINICPMV4_6, TuningConfig(vision="frozen", projector="full", attention=False))
    trainable = set(trainable_parameter_names(peft_model))
    assert lora_params(L0_MLP + L1_MLP) <= trainable
    copies = {n for n in trainable if ".modules_to_save." in n}
    assert copies == {n for n in copies if ".vit_merger.modules_to_save." in n or ".merger.modules_to_save." in n}
    assert any(".vit_merger." in n for n in copies) and any("model.merger." in n for n in copies)
    assert len(trainable) == len(lora_params(L0_MLP + L1_MLP)) + len(copies)


@pytest.mark.parametrize("mode", ["16x", "4x"])
def test_training_step_with_frozen_vision(tiny_minicpmv4_6, processor, config, mode):
    model = AutoModelForImageTextToText.from_pretrained(tiny_minicpmv4_6)
    peft_model = apply_tuning(model, MINICPMV4_6, TuningConfig(vision="frozen", r=4))
    torch.manual_seed(0)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero, which would make every A grad zero
            torch.nn.init.normal_(param, std=0.02)
    peft_model.train()
    collator = Collator(MINICPMV4_6, processor, config, image_options={"downsample_mode": mode})
    rows = (
        (single("Read this.", r"\frac{1}{2}"), [noise((200, 100), 1)]),
        (single("And this one, please.", r"x^{2} + y"), [noise((1000, 700), 2)]),
    )
    if mode == "16x" and Version(transformers.__version__) < Version("5.19"):
        with pytest.raises(ValueError, match="transformers>=5.19 or set the image option downsample_mode='4x'"):
            collate(collator, *rows)
        return
    batch = collate(collator, *rows)
    loss = peft_model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        elif ".vision_tower." in name or ".merger." in name:
            assert param.grad is None and not param.requires_grad, name
