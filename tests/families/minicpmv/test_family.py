"""MiniCPM-V 2.6 / 4.x remote layout (``vpm`` / ``resampler`` / ``llm``) beyond the conformance suite: loading
without remote code, the processor built for this layout, sliced placeholders and ``image_bound`` after padding,
the padded pixel layout, the image options, generation, and MiniCPM-V's own fine-tuning flags.

The (width, height) → grid → token-count table of the slicing itself is in ``test_image.py``.
"""

import copy

import pytest
import torch

from vlmtune.data.collator import IGNORE_INDEX
from vlmtune.families.minicpmv import image as minicpmv_image
from vlmtune.families.minicpmv.processing import IMAGE_TAG, MiniCPMVProcessor
from vlmtune.testing import collate, noise, single, turn
from vlmtune.tuning import TuningConfig, apply_tuning, trainable_parameter_names

SYSTEM_DEFAULT = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
QUERY = 64


@pytest.fixture(scope="module")
def t(tiny):
    return tiny("minicpmv")


def ids_of(processor, text: str) -> list[int]:
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


def image_text(index: int = 0, views: int = 1, cols: int = 0) -> str:
    """A placeholder written out by hand: id tag, the source view, then rows of `cols` slices."""
    text = f"<image_id>{index}</image_id><image>" + "<unk>" * QUERY + "</image>"
    if views > 1:
        cell = "<slice>" + "<unk>" * QUERY + "</slice>"
        text += "\n".join(cell * cols for _ in range((views - 1) // cols))
    return text


def test_load_registers_the_layout_and_reads_the_slicing(t):
    # Imported here: collecting this file should not import the modeling stack (and with it triton).
    from transformers import AutoConfig

    from vlmtune.families.minicpmv.modeling import MiniCPMV

    config = AutoConfig.from_pretrained(t.folder)  # no trust_remote_code: load_model registered "minicpmv"
    assert config.model_type == "minicpmv"
    assert isinstance(t.model, MiniCPMV) and {n for n, _ in t.model.named_children()} == {"vpm", "resampler", "llm"}
    processor = t.processor
    assert isinstance(processor, MiniCPMVProcessor)
    assert (processor.max_slice_nums, processor.scale_resolution, processor.patch_size) == (9, 112, 14)
    assert (processor.query_num, processor.slice_mode, processor.use_image_id) == (64, True, True)
    assert processor.image_token_id == processor.tokenizer.convert_tokens_to_ids("<unk>")


def test_processor_save_and_reload_keeps_the_slicing(t, tmp_path):
    t.processor.save_pretrained(tmp_path)
    again = MiniCPMVProcessor.from_pretrained(tmp_path)  # no config.json: preprocessor_config.json alone
    assert (again.scale_resolution, again.max_slice_nums, again.query_num) == (112, 9, 64)
    messages = single("Read.", "x")
    assert again.apply_chat_template(messages) == t.processor.apply_chat_template(messages)


def test_chat_template_renders_parts_like_the_published_chat(t):
    messages = [turn("user", "Compare", 2), turn("assistant", "same")]
    expected = SYSTEM_DEFAULT + f"<|im_start|>user\n{IMAGE_TAG}\n{IMAGE_TAG}\nCompare<|im_end|>\n"
    expected += "<|im_start|>assistant\nsame<|im_end|>\n"
    assert t.processor.apply_chat_template(messages) == expected


def test_sliced_image_prompt_and_image_bound_on_a_right_padded_batch(t):
    tok = t.processor.tokenizer
    # 1000x700: 2.6's grid is (cols, rows) = (4, 2) (see test_image.py): a source view plus two rows of four.
    long = ([turn("user", "Two?", 2), turn("assistant", "yes")], [noise((1000, 700), 1), noise((40, 40), 2)])
    short = (single("One.", "a"), [noise((60, 30), 3)])
    batch = collate(t.collator, long, short)
    text = SYSTEM_DEFAULT + "<|im_start|>user\n" + image_text(0, views=9, cols=4) + "\n" + image_text(1)
    text += "\nTwo?<|im_end|>\n<|im_start|>assistant\nyes<|im_end|>\n"
    n0 = len(ids_of(t.processor, text))
    assert batch["input_ids"][0].tolist() == ids_of(t.processor, text)
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


def test_pixel_layout_is_padded_strips_in_placeholder_order(t):
    images = [noise((1000, 700), 1), noise((40, 40), 2)], [noise((60, 30), 3)]
    batch = collate(t.collator, (single("a", "b", 2), images[0]), (single("c", "d"), images[1]))
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
def test_image_options(t, options, views, id_tags):
    rows = [(single("Read.", "x"), [noise((1000, 700), 3)])]
    batch = t.assert_matches_processor(rows, collator=t.collator_with(**options), **options)
    assert len(batch["tgt_sizes"]) == len(batch["image_bound"][0]) == views
    assert t.processor.tokenizer.decode(batch["input_ids"][0]).count("<image_id>") == id_tags


def test_processor_call_feeds_generate(t):
    prompt = t.processor.apply_chat_template([turn("user", "Read.", 1)], add_generation_prompt=True)
    inputs = t.processor(text=[prompt], images=[[noise((200, 50), 1)]], add_special_tokens=False, return_tensors="pt")
    assert [len(b) for b in inputs["image_bound"]] == [len(inputs["tgt_sizes"])]
    out = t.model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])


def test_minicpmv_flags_train_resampler_and_vision_in_full_and_llm_with_lora(t):
    peft_model = apply_tuning(copy.deepcopy(t.model), t.family, TuningConfig.from_minicpmv(tune_vision=True, r=4))
    trainable = trainable_parameter_names(peft_model)
    layers = [f"llm.model.layers.{i}" for i in (0, 1)]
    llm = [f"{layer}.self_attn.{p}_proj" for layer in layers for p in "qkvo"]
    llm += [f"{layer}.mlp.{p}_proj" for layer in layers for p in ("gate", "up", "down")]
    assert {n for n in trainable if ".lora_" in n} == {
        f"base_model.model.{m}.lora_{ab}.default.weight" for m in llm for ab in "AB"
    }
    full = {n.split(".modules_to_save.")[0].removeprefix("base_model.model.") for n in trainable if ".lora_" not in n}
    assert full == {"vpm", "resampler"}
