"""MiniCPM-V 2.6 layout (``vpm`` / ``resampler`` / ``llm``) family on its tiny checkpoint.

The (width, height) → grid → token-count table of the slicing itself is checked in
``tests/models/test_minicpmv_image.py``; here: the processor built for this layout, hand-derived prompts and
label masks, ``image_bound`` ranges after padding, the padded pixel layout, golden LoRA lists, QLoRA placement,
and a training step through ``vlmtune.load`` + ``apply_tuning`` + ``Collator``.
"""

import pytest
import torch

import vlmtune
from vlmtune.data.collator import IGNORE_INDEX, Collator
from vlmtune.families import detect
from vlmtune.families.minicpmv import MINICPMV
from vlmtune.families.minicpmv import image as minicpmv_image
from vlmtune.families.minicpmv.processing import IMAGE_TAG, MiniCPMVProcessor
from vlmtune.testing import collate, noise, single, turn
from vlmtune.tuning import TuningConfig, apply_tuning, lora_target_names, trainable_parameter_names

SYSTEM_DEFAULT = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
QUERY = 64


@pytest.fixture(scope="module")
def processor(tiny_minicpmv):
    return MINICPMV.load_processor(tiny_minicpmv)


@pytest.fixture(scope="module")
def model(tiny_minicpmv):
    return MINICPMV.load_model(tiny_minicpmv).eval()


@pytest.fixture(scope="module")
def collator(processor, model):
    return Collator(MINICPMV, processor, model.config)


def ids_of(processor, text: str) -> list[int]:
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


def image_text(index: int = 0, views: int = 1, cols: int = 0) -> str:
    """A placeholder written out by hand: id tag, the source view, then rows of `cols` slices."""
    text = f"<image_id>{index}</image_id><image>" + "<unk>" * QUERY + "</image>"
    if views > 1:
        cell = "<slice>" + "<unk>" * QUERY + "</slice>"
        text += "\n".join(cell * cols for _ in range((views - 1) // cols))
    return text


def test_detect_and_load_without_remote_code(tiny_minicpmv, model, processor):
    # Imported here: collecting this file should not import the modeling stack (and with it triton).
    from transformers import AutoConfig

    from vlmtune.families.minicpmv.modeling import MiniCPMV

    config = AutoConfig.from_pretrained(tiny_minicpmv)  # no trust_remote_code: load_model registered "minicpmv"
    assert config.model_type == "minicpmv" and detect(config) is MINICPMV
    assert isinstance(model, MiniCPMV) and {n.split(".")[0] for n, _ in model.named_children()} == {
        "vpm",
        "resampler",
        "llm",
    }
    assert (processor.max_slice_nums, processor.scale_resolution, processor.patch_size) == (9, 112, 14)
    assert (processor.query_num, processor.slice_mode, processor.use_image_id) == (64, True, True)
    assert processor.image_token_id == processor.tokenizer.convert_tokens_to_ids("<unk>")


def test_vlmtune_load_gives_the_minicpmv_processor(tiny_minicpmv):
    _model, processor, family = vlmtune.load(tiny_minicpmv, device="cpu")
    assert family is MINICPMV and isinstance(processor, MiniCPMVProcessor)


def test_processor_save_and_reload_keeps_the_slicing(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    again = MiniCPMVProcessor.from_pretrained(tmp_path)  # no config.json: preprocessor_config.json alone
    assert (again.scale_resolution, again.max_slice_nums, again.query_num) == (112, 9, 64)
    messages = single("Read.", "x")
    assert again.apply_chat_template(messages) == processor.apply_chat_template(messages)


def test_chat_template_renders_parts_like_the_published_chat(processor):
    messages = [turn("user", "Compare", 2), turn("assistant", "same")]
    expected = SYSTEM_DEFAULT + f"<|im_start|>user\n{IMAGE_TAG}\n{IMAGE_TAG}\nCompare<|im_end|>\n"
    expected += "<|im_start|>assistant\nsame<|im_end|>\n"
    assert processor.apply_chat_template(messages) == expected


# --- hand-derived prompts, labels and image_bound ----------------------------------------------------------


def test_labels_cover_exactly_answer_and_im_end(collator, processor):
    tok = processor.tokenizer
    answer = r"\frac{a}{b}+\sqrt{x}"
    # 56x56 < 112^2: not sliced, one view; the published prompt keeps the newline after the image.
    enc = collator.encode({"messages": single("Write the LaTeX.", answer), "images": [noise((56, 56))]}, 0)
    prefix = SYSTEM_DEFAULT + "<|im_start|>user\n" + image_text() + "\nWrite the LaTeX.<|im_end|>\n"
    prefix += "<|im_start|>assistant\n"
    prefix_ids, answer_ids = ids_of(processor, prefix), ids_of(processor, answer)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert enc.input_ids == prefix_ids + answer_ids + [im_end] + ids_of(processor, "\n")
    start, stop = len(prefix_ids), len(prefix_ids) + len(answer_ids) + 1
    assert [i for i, label in enumerate(enc.labels) if label != IGNORE_INDEX] == list(range(start, stop))
    assert tok.decode([t for t in enc.labels if t != IGNORE_INDEX]) == answer + "<|im_end|>"


def test_sliced_image_prompt_and_image_bound_on_a_right_padded_batch(collator, processor):
    tok = processor.tokenizer
    # 1000x700: 2.6's grid is (cols, rows) = (4, 2) (see tests/models): a source view plus two rows of four.
    long = ([turn("user", "Two?", 2), turn("assistant", "yes")], [noise((1000, 700), 1), noise((40, 40), 2)])
    short = (single("One.", "a"), [noise((60, 30), 3)])
    batch = collate(collator, long, short)
    text = SYSTEM_DEFAULT + "<|im_start|>user\n" + image_text(0, views=9, cols=4) + "\n" + image_text(1)
    text += "\nTwo?<|im_end|>\n<|im_start|>assistant\nyes<|im_end|>\n"
    n0 = len(ids_of(processor, text))
    assert batch["input_ids"][0].tolist() == ids_of(processor, text)
    n1 = int(batch["attention_mask"][1].sum())
    assert n1 < n0 and batch["input_ids"][1, n1:].eq(tok.pad_token_id).all()

    assert [len(b) for b in batch["image_bound"]] == [10, 1]
    unk = tok.convert_tokens_to_ids("<unk>")
    for sample, bounds in enumerate(batch["image_bound"]):
        ids = batch["input_ids"][sample]
        assert (bounds[:, 1] - bounds[:, 0]).eq(QUERY).all()
        covered = torch.zeros_like(ids, dtype=torch.bool)
        for start, end in bounds.tolist():
            assert tok.convert_ids_to_tokens(int(ids[start - 1])) in ("<image>", "<slice>")
            assert tok.convert_ids_to_tokens(int(ids[end])) in ("</image>", "</slice>")
            covered[start:end] = True
        assert torch.equal(covered, ids == unk)  # the ranges are exactly the query fillers
        assert batch["labels"][sample][covered].eq(IGNORE_INDEX).all()


def test_pixel_layout_is_padded_strips_in_placeholder_order(collator):
    images = [noise((1000, 700), 1), noise((40, 40), 2)], [noise((60, 30), 3)]
    batch = collate(collator, (single("a", "b", 2), images[0]), (single("c", "d"), images[1]))
    expected = [
        minicpmv_image.process_image(image, scale_resolution=112, image_idx=i)
        for sample in images
        for i, image in enumerate(sample)
    ]
    strips = [s for e in expected for s in e["pixel_values"]]
    assert torch.equal(batch["tgt_sizes"], torch.cat([e["tgt_sizes"] for e in expected]))
    width = max(s.shape[-1] for s in strips)
    assert batch["pixel_values"].shape == (len(strips), 3, 14, width) == (11, 3, 14, width)
    for row, strip in zip(batch["pixel_values"], strips, strict=True):
        assert torch.equal(row[..., : strip.shape[-1]], strip)
        assert row[..., strip.shape[-1] :].eq(0).all()


@pytest.mark.parametrize(
    ("options", "views", "id_tags"),
    [({"max_slice_nums": 4}, 5, 1), ({"slice_mode": False}, 1, 1), ({"use_image_id": False}, 9, 0)],
    ids=["max_slice_nums", "no_slices", "no_image_id"],
)
def test_image_options(processor, model, options, views, id_tags):
    collator = Collator(MINICPMV, processor, model.config, image_options=options)
    batch = collate(collator, (single("Read.", "x"), [noise((1000, 700), 3)]))
    assert len(batch["tgt_sizes"]) == len(batch["image_bound"][0]) == views
    assert processor.tokenizer.decode(batch["input_ids"][0]).count("<image_id>") == id_tags


def test_processor_call_feeds_generate(processor, model):
    prompt = processor.apply_chat_template([turn("user", "Read.", 1)], add_generation_prompt=True)
    inputs = processor(text=[prompt], images=[[noise((200, 50), 1)]], add_special_tokens=False, return_tensors="pt")
    assert [len(b) for b in inputs["image_bound"]] == [len(inputs["tgt_sizes"])]
    out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])


# --- golden LoRA lists ------------------------------------------------------------------------------------


def vision(layer: int, kind: str) -> list[str]:
    names = [f"self_attn.{p}_proj" for p in ("q", "k", "v", "out")] if kind == "attention" else ["mlp.fc1", "mlp.fc2"]
    return [f"vpm.encoder.layers.{layer}.{n}" for n in names]


def language(layer: int, kind: str) -> list[str]:
    names = (
        [f"self_attn.{p}_proj" for p in "qkvo"]
        if kind == "attention"
        else ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    )
    return [f"llm.model.layers.{layer}.{n}" for n in names]


V_ALL = vision(0, "attention") + vision(0, "mlp") + vision(1, "attention") + vision(1, "mlp")
L_ALL = language(0, "attention") + language(0, "mlp") + language(1, "attention") + language(1, "mlp")
RESAMPLER = ["resampler.kv_proj", "resampler.attn.out_proj"]

GOLDEN = {
    "both_towers": (dict(), V_ALL + L_ALL),
    "language_only": (dict(vision="frozen"), L_ALL),
    "vision_only": (dict(language="frozen"), V_ALL),
    "language_attention_last_layer": (dict(vision="frozen", mlp=False, last_n_layers=1), language(1, "attention")),
    "vision_mlp": (dict(language="frozen", attention=False), vision(0, "mlp") + vision(1, "mlp")),
    "projector_lora_only": (dict(vision="frozen", language="frozen", projector="lora"), RESAMPLER),
}


@pytest.mark.parametrize(("flags", "expected"), GOLDEN.values(), ids=GOLDEN.keys())
def test_golden_lora_targets(model, flags, expected):
    config = TuningConfig(**flags)
    targets = lora_target_names(model, MINICPMV, config)
    assert targets == expected
    if config.vision != "lora":
        assert not [t for t in targets if t.startswith("vpm.")]
    assert "llm.lm_head" not in targets


def test_minicpmv_flags_train_resampler_and_vision_in_full_and_llm_with_lora(tiny_minicpmv):
    model = MINICPMV.load_model(tiny_minicpmv)
    peft_model = apply_tuning(model, MINICPMV, TuningConfig.from_minicpmv(tune_vision=True, r=4))
    trainable = trainable_parameter_names(peft_model)
    assert {n for n in trainable if ".lora_" in n} == {
        f"base_model.model.{m}.lora_{ab}.default.weight" for m in L_ALL for ab in "AB"
    }
    full = {n.split(".modules_to_save.")[0].removeprefix("base_model.model.") for n in trainable if ".lora_" not in n}
    assert full == {"vpm", "resampler"}


def test_qlora_quantizes_exactly_the_llm_linears(tiny_minicpmv):
    import bitsandbytes as bnb

    model, _processor, family = vlmtune.load(tiny_minicpmv, quant="nf4", device="cpu")
    assert family is MINICPMV
    assert [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)] == L_ALL
    assert [n for n, m in model.named_modules() if type(m) is torch.nn.Linear] == V_ALL + [
        "llm.lm_head",
        "resampler.kv_proj",
    ]


def test_one_training_step_through_vlmtune_load(tiny_minicpmv):
    model, processor, family = vlmtune.load(tiny_minicpmv, device="cpu")
    peft_model = apply_tuning(model, family, TuningConfig(vision="frozen", r=4))
    peft_model.train()
    collator = Collator(family, processor, model.config)
    batch = collate(
        collator,
        (single("Read this.", r"\frac{1}{2}"), [noise((200, 100), 1)]),
        (single("And this one, please.", r"x^{2} + y"), [noise((40, 90), 2)]),
    )
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.1)
    loss = peft_model(**batch).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    for name, param in peft_model.named_parameters():
        changed = not torch.equal(before[name], param.detach())
        if "lora_B" in name:  # B starts at zero, so only B moves on the first step
            assert changed, name
        elif "lora_" not in name:
            assert not changed and param.grad is None, name
