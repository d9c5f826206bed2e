"""The shared collator: label spans, placeholder expansion, errors that name the row, overflow handling."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoProcessor

from vlmtune.data.collator import (
    IGNORE_INDEX,
    Collator,
    PreparedDataset,
    SampleTooLong,
    answer_regions,
    expand_images,
    render_with_spans,
    tokenize,
)
from vlmtune.data.schema import DataError
from vlmtune.families import detect


def noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    width, height = size
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def turn(role: str, text: str, n_images: int = 0) -> dict:
    return {"role": role, "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}


def row(answer: str = r"\frac{a}{b}", images=None, question: str = "Write the LaTeX.") -> dict:
    images = [noise((56, 56))] if images is None else images
    return {"messages": [turn("user", question, len(images)), turn("assistant", answer)], "images": images}


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def qwen(tiny_qwen):
    processor, config = AutoProcessor.from_pretrained(tiny_qwen), AutoConfig.from_pretrained(tiny_qwen)
    return processor, config


@pytest.fixture(scope="module")
def collator(qwen):
    processor, config = qwen
    return Collator(detect(config), processor, config)


def image_tokens_per_sample(batch, config) -> list[int]:
    return (batch["input_ids"] == config.image_token_id).sum(1).tolist()


# --- render_with_spans ------------------------------------------------------------------------------------


def test_render_with_spans_single_turn(qwen):
    processor, _ = qwen
    messages = row(answer="x^{2}")["messages"]
    text, spans = render_with_spans(processor, messages, 0)
    assert text == processor.apply_chat_template(messages, tokenize=False)
    assert text.endswith("<|im_start|>assistant\nx^{2}<|im_end|>\n")
    assert [text[s:e] for s, e in spans] == ["x^{2}<|im_end|>"]
    assert spans[0][1] == len(text) - 1  # the newline after <|im_end|> is outside


def test_render_with_spans_multi_turn(qwen):
    processor, _ = qwen
    messages = [turn("user", "a?", 1), turn("assistant", "A1"), turn("user", "b?"), turn("assistant", "A2")]
    text, spans = render_with_spans(processor, messages, 0)
    assert [text[s:e] for s, e in spans] == ["A1<|im_end|>", "A2<|im_end|>"]
    between = text[spans[0][1] : spans[1][0]]
    assert between == "\n<|im_start|>user\nb?<|im_end|>\n<|im_start|>assistant\n"


def test_render_with_spans_rejects_leading_assistant(qwen):
    processor, _ = qwen
    with pytest.raises(DataError, match=r"^row 4: conversation starts with an assistant turn"):
        render_with_spans(processor, [turn("assistant", "hi"), turn("user", "x")], 4)


class _CountingTemplate:
    """A template that is not prefix-stable: it writes the number of messages first."""

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        return f"{len(messages)}|" + "".join(f"{m['role']}:{m['content']};" for m in messages)


def test_render_with_spans_rejects_template_that_is_not_prefix_stable():
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    with pytest.raises(DataError, match=r"^row 2: the chat template is not prefix-stable at turn 1"):
        render_with_spans(_CountingTemplate(), messages, 2)


# --- expand_images ----------------------------------------------------------------------------------------


def test_expand_images_leaves_literal_placeholder_in_answer_and_shifts_spans():
    text = "U<img>Q<img>|ans<img>wer|V<img>|two|"
    spans = [(text.index("ans"), text.index("wer|") + 3), (text.index("two"), text.index("two") + 3)]
    out, new_spans = expand_images(text, spans, "<img>", ["[A]", "[BB]", "[CCC]"], 0)
    assert out == "U[A]Q[BB]|ans<img>wer|V[CCC]|two|"
    assert [out[s:e] for s, e in new_spans] == ["ans<img>wer", "two"]
    assert new_spans == [(10, 21), (29, 32)]


def test_expand_images_without_spans_or_placeholders():
    assert expand_images("plain", [], "<img>", [], 0) == ("plain", [])
    assert expand_images("<img>", [], "<img>", ["X"], 0) == ("X", [])


@pytest.mark.parametrize("expansions", [[], ["[A]", "[B]"]])
def test_expand_images_wrong_count_names_the_row(expansions):
    text = "U<img>Q|ans<img>|"
    spans = [(text.index("ans"), len(text) - 1)]
    with pytest.raises(DataError, match=rf"^row 7: the rendered prompt holds 1 image tag\(s\) for {len(expansions)}"):
        expand_images(text, spans, "<img>", expansions, 7)


# --- a literal image tag in an answer is text --------------------------------------------------------------

# Per family: the generic tag, the family's own placeholder and the image markers its tokenizer holds as special
# tokens (Qwen: <|image_pad|>; Gemma-3: <start_of_image> ...; MiniCPM-V: <image>, its query filler <unk>).
LITERAL_TAGS = {
    "qwen2_5_vl": ["<image>", "<|image_pad|>", "<|vision_start|><|image_pad|><|vision_end|>"],
    "gemma3": ["<image>", "<start_of_image>", "<image_soft_token>", "<start_of_image><end_of_image>"],
    "minicpmv": ["<image>", "(<image>./</image>)", "<slice><unk></slice>"],
    "minicpmv4_6": ["<image>", "<|image_pad|>", "<image_id>0</image_id>"],
}


@pytest.fixture(scope="module")
def family_models(tiny_qwen, tiny_gemma, tiny_minicpmv, tiny_minicpmv4_6):
    import vlmtune

    paths = {"qwen2_5_vl": tiny_qwen, "gemma3": tiny_gemma, "minicpmv": tiny_minicpmv, "minicpmv4_6": tiny_minicpmv4_6}
    return {family: vlmtune.load(path) for family, path in paths.items()}


def supervised(encoded) -> list[int]:
    return [label for label in encoded.labels if label != IGNORE_INDEX]


@pytest.mark.parametrize(("family", "tag"), [(f, t) for f, tags in LITERAL_TAGS.items() for t in tags])
def test_literal_image_tag_in_answer_is_plain_text(family_models, family, tag):
    model, processor, adapter = family_models[family]
    collator = Collator(adapter, processor, model.config)
    tokenizer = processor.tokenizer
    answer = f"the tag {tag} is text"
    images = [noise((56, 56)), noise((80, 60), seed=1)]
    messages = [turn("user", "Compare.", 2), turn("assistant", answer), turn("user", "Again?"), turn("assistant", tag)]
    plain = [*messages[:1], turn("assistant", "the tag x is text"), messages[2], turn("assistant", "x")]
    with_tag = collator.encode({"messages": messages, "images": images}, 0)
    without = collator.encode({"messages": plain, "images": images}, 0)

    # The same images, the same image tokens, the same prompt up to the first answer: nothing shifted.
    assert with_tag.images.tensors.keys() == without.images.tensors.keys()
    for key, value in without.images.tensors.items():
        assert torch.equal(with_tag.images.tensors[key], value), key
    first = without.labels.index(supervised(without)[0])
    assert with_tag.input_ids[:first] == without.input_ids[:first]
    image_ids = collator.image_token_ids()
    n_image = sum(t in image_ids for t in without.input_ids)
    assert n_image > 0 and sum(t in image_ids for t in with_tag.input_ids) == n_image

    # The answers' labels are the answers tokenized as ordinary text, each closed by the end-of-turn token.
    end = tokenizer.convert_tokens_to_ids(adapter.end_of_turn)
    expected = []
    for text in (answer, tag):
        expected += tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] + [end]
    assert supervised(with_tag) == expected
    assert tokenizer.decode(supervised(with_tag)) == f"{answer}{adapter.end_of_turn}{tag}{adapter.end_of_turn}"
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    assert [t for t in supervised(with_tag) if t in special] == [end, end]

    # And the model takes the batch as it takes the one without the tag (MiniCPM-V's image bounds included).
    batch = collator.pad([with_tag, without])
    if "image_bound" in batch:
        assert torch.equal(batch["image_bound"][0], batch["image_bound"][1])
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)


@pytest.mark.parametrize("family", list(LITERAL_TAGS))
def test_answers_tokenized_on_their_own_give_the_tokens_of_one_call(family_models, family):
    # What lets a literal answer be tokenized apart without moving any other token (see collator.tokenize).
    _, processor, adapter = family_models[family]
    answers = ["x", " lead and trail ", "\n\nnew\nlines\n", "(a)\t{b}", "ünï ✓ 数学", "1. a\n2. b"]
    messages = [turn("user", "Q")]
    for answer in answers:
        messages += [turn("assistant", answer), turn("user", "more?\n")]
    text, spans = render_with_spans(processor, messages[:-1], 0)
    regions = answer_regions(text, spans, adapter.end_of_turn)
    assert len(regions) == len(answers)
    assert tokenize(processor.tokenizer, text, regions) == tokenize(processor.tokenizer, text, [])


@pytest.mark.parametrize(
    ("family", "question", "message"),
    [
        ("qwen2_5_vl", "Look: <|image_pad|>", r"the rendered prompt holds 2 image tag\(s\) for 1 image\(s\)"),
        (
            "gemma3",
            "Look: <image_soft_token>",
            r"holds 17 '<image_soft_token>' token\(s\) where its 1 image\(s\) need 16",
        ),
        ("gemma3", "Look: <start_of_image>", r"the rendered prompt holds 2 image tag\(s\) for 1 image\(s\)"),
        ("minicpmv", "Look: <image>", r"holds 2 '<image>' token\(s\) where its 1 image\(s\) need 1"),
        ("minicpmv", "Look: (<image>./</image>)", r"the rendered prompt holds 2 image tag\(s\) for 1 image\(s\)"),
        ("minicpmv4_6", "Look: <image>", r"holds 2 '<image>' token\(s\) where its 1 image\(s\) need 1"),
    ],
)
def test_literal_image_tag_in_a_user_turn_counts_and_must_match(family_models, family, question, message):
    model, processor, adapter = family_models[family]
    collator = Collator(adapter, processor, model.config)
    with pytest.raises(DataError, match=rf"^row 6: {message}") as info:
        collator.encode(row(question=question), 6)
    assert info.value.kind == "image count"


# --- encode errors name the row ---------------------------------------------------------------------------


def test_missing_image_file_names_the_row(collator, tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(DataError, match=r"^row 3: image file .*nope\.png' not found"):
        collator.encode(row(images=[str(missing)]), 3)


@pytest.mark.parametrize("data", [b"not an image at all", png_bytes(noise((8, 8)))[:40]], ids=["garbage", "cut"])
def test_corrupt_image_bytes_names_the_row(collator, data):
    with pytest.raises(DataError, match=r"^row 11: cannot decode image"):
        collator.encode(row(images=[data]), 11)


@pytest.mark.parametrize("answer", ["", "   \n"])
def test_empty_answer_names_the_row(collator, answer):
    with pytest.raises(DataError, match=r"^row 5: assistant turn \(message 1\) is empty"):
        collator.encode(row(answer=answer), 5)


def test_image_count_mismatch_names_the_row(collator):
    bad = row()
    bad["images"] = bad["images"] * 2
    with pytest.raises(DataError, match=r"^row 9: has 1 image tag\(s\) in its messages but 2 image\(s\)"):
        collator.encode(bad, 9)


def test_collator_rejects_bad_settings(qwen):
    processor, config = qwen
    with pytest.raises(ValueError, match="train_on"):
        Collator(detect(config), processor, config, train_on="prompt")
    with pytest.raises(ValueError, match="max_length"):
        Collator(detect(config), processor, config, max_length=0)


# --- overflow: images are atoms ---------------------------------------------------------------------------

# Under the tiny Qwen processor: 56x56 -> 4 image tokens, 300x60 -> 22, 1000x700 -> 54.
SMALL, MEDIUM, BIG = (56, 56), (300, 60), (1000, 700)


def test_too_long_sample_raises_sample_too_long(collator, qwen):
    processor, config = qwen
    n_big = len(collator.encode(row(images=[noise(BIG)]), 2).input_ids)
    n_small = len(collator.encode(row(images=[noise(SMALL)]), 2).input_ids)
    assert n_big - n_small == 54 - 4 and n_small < 60 < n_big
    long_collator = Collator(detect(config), processor, config, max_length=60)
    with pytest.raises(SampleTooLong, match=rf"^row 2: has {n_big} tokens, more than max_length=60") as info:
        long_collator.encode(row(images=[noise(BIG)]), 2)
    assert isinstance(info.value, DataError) and info.value.row == 2


def test_prepared_dataset_drops_and_counts_too_long(qwen):
    processor, config = qwen
    collator = Collator(detect(config), processor, config, max_length=60)
    rows = [row(images=[noise(SMALL)]), row(images=[noise(BIG)]), row(images=[noise(MEDIUM)])]
    data = PreparedDataset(rows, collator, overflow="drop")
    assert dict(data.skipped) == {"too long": 1}
    assert data.kept == [0, 2] and len(data) == 2
    assert data.lengths == [len(collator.encode(rows[i], i).input_ids) for i in (0, 2)]
    assert data[1] == {"index": 2, "row": rows[2]}


def test_prepared_dataset_error_mode_names_the_row(qwen):
    processor, config = qwen
    collator = Collator(detect(config), processor, config, max_length=60)
    rows = [row(images=[noise(SMALL)]), row(images=[noise(BIG)])]
    with pytest.raises(DataError, match=r"^row 1: has \d+ tokens, more than max_length=60") as info:
        PreparedDataset(rows, collator, overflow="error")
    assert info.value.kind == "too long" and isinstance(info.value.errors[0], SampleTooLong)


def test_prepared_dataset_other_bad_rows_stop_the_run(collator, tmp_path):
    rows = [row(), row(images=[str(tmp_path / "gone.png")])]
    with pytest.raises(DataError, match=r"^row 1: image file"):
        PreparedDataset(rows, collator, overflow="drop")


def test_prepared_dataset_with_no_usable_row(qwen):
    processor, config = qwen
    collator = Collator(detect(config), processor, config, max_length=10)
    with pytest.raises(DataError, match=r"no usable rows out of 2 \(skipped: \{'too long': 2\}\)"):
        PreparedDataset([row(), row()], collator)
    with pytest.raises(ValueError, match="overflow"):
        PreparedDataset([row()], collator, overflow="truncate")


def test_image_deleted_after_preparation_names_the_row_at_collate_time(collator, tmp_path):
    path = tmp_path / "img.png"
    noise(SMALL).save(path)
    data = PreparedDataset([row(), row(images=[str(path)])], collator)
    path.unlink()
    with pytest.raises(DataError, match=r"^row 1: image file"):
        collator([data[0], data[1]])


def test_over_long_samples_never_yield_partial_images(qwen):
    processor, config = qwen
    max_length = 64
    collator = Collator(detect(config), processor, config, max_length=max_length)
    sizes = [[SMALL], [BIG], [MEDIUM, SMALL], [MEDIUM, MEDIUM], [SMALL, SMALL], [BIG, SMALL], [MEDIUM]]
    rows = [row(images=[noise(s, i) for s in group]) for i, group in enumerate(sizes)]
    data = PreparedDataset(rows, collator, overflow="drop")
    assert data.kept == [0, 2, 4, 6] and dict(data.skipped) == {"too long": 3}
    loader = torch.utils.data.DataLoader(data, batch_size=2, collate_fn=collator)
    seen = []
    for batch in loader:
        assert batch["input_ids"].shape[1] <= max_length
        grids = batch["image_grid_thw"].prod(1).tolist()
        assert batch["pixel_values"].shape[0] == sum(grids)
        per_sample = image_tokens_per_sample(batch, config)
        assert sum(per_sample) == sum(grids) // 4  # every image's full token count, never a cut one
        start = processor.tokenizer.convert_tokens_to_ids("<|vision_start|>")
        end = processor.tokenizer.convert_tokens_to_ids("<|vision_end|>")
        assert (batch["input_ids"] == start).sum(1).tolist() == (batch["input_ids"] == end).sum(1).tolist()
        seen += per_sample
    assert seen == [4, 22 + 4, 4 + 4, 22]


def test_text_only_and_image_samples_share_a_batch(collator, qwen):
    _, config = qwen
    text_only = {"messages": [turn("user", "hi"), turn("assistant", "hello")], "images": []}
    batch = collator([{"index": 0, "row": text_only}, {"index": 1, "row": row(images=[noise(MEDIUM)])}])
    assert batch["image_grid_thw"].tolist() == [[1, 4, 22]]
    assert image_tokens_per_sample(batch, config) == [0, 22]
    n = int(batch["attention_mask"][0].sum())
    assert batch["position_ids"][:, 0, :n].tolist() == [list(range(n))] * 3


# --- train_on="all" ---------------------------------------------------------------------------------------


def test_train_on_all_labels_every_non_image_token(tiny_paths):
    processor, config = AutoProcessor.from_pretrained(tiny_paths), AutoConfig.from_pretrained(tiny_paths)
    collator = Collator(detect(config), processor, config, train_on="all")
    messages = [turn("user", "a?", 1), turn("assistant", "A1"), turn("user", "b?"), turn("assistant", "A2")]
    enc = collator.encode({"messages": messages, "images": [noise((64, 64))]}, 0)
    image_ids = collator.image_token_ids()
    assert set(image_ids) == {config.image_token_id, getattr(config, "video_token_id", config.image_token_id)}
    n_image = sum(t in image_ids for t in enc.input_ids)
    assert n_image in (4, 16)  # Qwen: 64 px -> 56 px -> 4 merged patches; Gemma: 16 soft tokens
    expected = [IGNORE_INDEX if t in image_ids else t for t in enc.input_ids]
    assert enc.labels == expected
    assistant_only = Collator(detect(config), processor, config).encode(
        {"messages": messages, "images": [noise((64, 64))]}, 0
    )
    assert assistant_only.input_ids == enc.input_ids
    supervised = {i for i, label in enumerate(assistant_only.labels) if label != IGNORE_INDEX}
    assert supervised < {i for i, label in enumerate(enc.labels) if label != IGNORE_INDEX}


def test_prepared_rows_as_a_datasets_dataset_read_rows_lazily(collator, tmp_path):
    rows = [row(), row(images=[str(tmp_path / "gone.png")]), row()]
    prepared = PreparedDataset(rows, collator, on_bad_row="skip")
    dataset = prepared.to_hf_dataset()
    assert dataset.column_names == ["index"] and len(dataset) == 2
    assert dataset[1] == {"index": 2, "row": rows[2]} == prepared[1]
    assert collator([dataset[0], dataset[1]])["input_ids"].shape[0] == 2
