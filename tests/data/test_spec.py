"""Data specs: YAML → DataSpec, and spec + files → canonical rows with images left encoded."""

import io
import json
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlmtune.data.latex_ocr import make_latex_ocr
from vlmtune.data.schema import DataError, load_image, text_of, validate_row
from vlmtune.data.spec import DataSpec, load_rows

BUNDLED = Path(__file__).resolve().parents[2] / "data_specs"
INSTRUCTION = "Write the LaTeX representation for this image."


def needs_bundled(name: str):
    return pytest.mark.skipif(not (BUNDLED / f"{name}.yaml").exists(), reason=f"data_specs/{name}.yaml missing")


@pytest.fixture(scope="module")
def latex_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("latex_ocr")
    make_latex_ocr(8, out, seed=0)  # 7 train rows, 1 test row
    return out


def png(size, color) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


# --- from_yaml --------------------------------------------------------------------------------------------


@needs_bundled("latex_ocr")
@pytest.mark.parametrize("ref", ["latex_ocr", str(BUNDLED / "latex_ocr.yaml")], ids=["bare_name", "path"])
def test_bundled_latex_ocr_spec(ref):
    spec = DataSpec.from_yaml(ref)
    assert spec == DataSpec(
        name="latex_ocr",
        format="image_text",
        source_type="parquet",
        path="data/latex_ocr",
        hub=None,
        columns={"image": "image", "text": "text"},
        instruction=INSTRUCTION,
        system=None,
    )


@needs_bundled("chat")
def test_bundled_chat_spec():
    spec = DataSpec.from_yaml("chat")
    assert (spec.name, spec.format, spec.source_type, spec.path) == ("chat", "chat", "jsonl", "data/chat")
    assert spec.columns == {"messages": "messages", "images": "images"}
    assert spec.system is None


def test_from_yaml_reads_every_field(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(
        "format: image_text\n"
        "source: {type: csv, path: somewhere/data.csv}\n"
        "columns: {image: picture, text: latex}\n"
        "instruction: Transcribe.\n"
        "system: You are terse.\n"
    )
    spec = DataSpec.from_yaml(path)
    assert spec == DataSpec(
        name="mine",  # the file's stem when the spec has no name
        format="image_text",
        source_type="csv",
        path="somewhere/data.csv",
        columns={"image": "picture", "text": "latex"},
        instruction="Transcribe.",
        system="You are terse.",
    )


def test_from_yaml_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert DataSpec.from_yaml(path) == DataSpec(name="empty", instruction=INSTRUCTION)


def test_from_yaml_missing_file_says_where_it_looked():
    with pytest.raises(FileNotFoundError, match=r"data spec 'no_such_spec' not found .*no_such_spec\.yaml"):
        DataSpec.from_yaml("no_such_spec")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(format="pairs"), "format 'pairs' is not one of"),
        (dict(source_type="sql"), "source type 'sql' is not one of"),
        (dict(source_type="hub"), "needs `hub: owner/name`"),
        (dict(columns={"image": "image"}), r"missing \['text'\]"),
        (dict(format="chat"), r"missing \['messages', 'images'\]"),
    ],
)
def test_invalid_spec_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DataSpec(name="bad", **kwargs)


# --- image_text rows from the LaTeX-OCR parquet -----------------------------------------------------------


def test_latex_ocr_rows_are_canonical_with_encoded_images(latex_dir):
    rows = load_rows(DataSpec(name="latex", path=str(latex_dir)), split="train")
    table = pq.read_table(latex_dir / "train.parquet").to_pylist()
    assert len(rows) == len(table) == 7
    for index, (canonical, raw) in enumerate(zip(rows, table, strict=True)):
        assert canonical["messages"] == [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": INSTRUCTION}]},
            {"role": "assistant", "content": [{"type": "text", "text": raw["text"]}]},
        ]
        (image,) = canonical["images"]
        assert isinstance(image, dict) and image["bytes"] == raw["image"]["bytes"]  # not decoded yet
        assert image["bytes"].startswith(b"\x89PNG")
        validate_row(canonical, index)
        decoded = load_image(image, index)
        with Image.open(io.BytesIO(raw["image"]["bytes"])) as expected:
            assert decoded.mode == "RGB" and decoded.size == expected.size
            assert list(decoded.getdata()) == list(expected.convert("RGB").getdata())
    assert [r["messages"][1]["content"][0]["text"] for r in rows[1:3]] == [table[1]["text"], table[2]["text"]]


@needs_bundled("latex_ocr")
def test_bundled_spec_with_path_override_and_test_split(latex_dir):
    rows = load_rows("latex_ocr", split="test", path=latex_dir)
    assert len(rows) == 1
    assert rows[0]["messages"][0]["content"][1]["text"] == INSTRUCTION


def test_data_file_path_and_system_prompt(latex_dir):
    spec = DataSpec(name="latex", path=str(latex_dir / "train.parquet"), system="Be exact.")
    row = load_rows(spec)[0]
    assert row["messages"][0] == {"role": "system", "content": [{"type": "text", "text": "Be exact."}]}
    assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
    validate_row(row, 0)


def test_wrong_column_lists_available_columns(latex_dir):
    spec = DataSpec(name="latex", path=str(latex_dir), columns={"image": "image", "text": "formula"})
    with pytest.raises(ValueError, match=r"\['formula'\].*available columns: \['image', 'text'\]"):
        load_rows(spec)


def test_missing_split_lists_the_files(latex_dir):
    with pytest.raises(FileNotFoundError, match=r"split 'validation'.*\['test\.parquet', 'train\.parquet'\]"):
        load_rows(DataSpec(name="latex", path=str(latex_dir)), split="validation")


# --- chat rows --------------------------------------------------------------------------------------------


def chat_record(question: str, answer: str, images: list) -> dict:
    user = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
    return {
        "messages": [
            {"role": "user", "content": user},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ],
        "images": images,
    }


@pytest.fixture
def chat_dir(tmp_path):
    (tmp_path / "images").mkdir()
    red, blue = tmp_path / "images" / "red.png", tmp_path / "images" / "blue.png"
    red.write_bytes(png((12, 8), (255, 0, 0)))
    blue.write_bytes(png((5, 9), (0, 0, 255)))
    records = [
        chat_record("What colour?", "Red.", [str(red)]),
        chat_record("And these two?", "Blue, then red.", [str(blue), str(red)]),
        chat_record("No picture here.", "Fine.", []),
    ]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return tmp_path


CHAT = dict(name="chat", format="chat", source_type="jsonl", columns={"messages": "messages", "images": "images"})


def test_jsonl_chat_rows_are_canonical(chat_dir):
    rows = load_rows(DataSpec(path=str(chat_dir), **CHAT))
    assert len(rows) == 3
    first = rows[0]
    assert [m["role"] for m in first["messages"]] == ["user", "assistant"]
    assert [p["type"] for p in first["messages"][0]["content"]] == ["image", "text"]
    assert first["messages"][0]["content"][1]["text"] == "What colour?"
    assert first["messages"][1]["content"] == [{"type": "text", "text": "Red."}]
    assert first["images"] == [str(chat_dir / "images" / "red.png")]
    assert rows[1]["images"] == [str(chat_dir / "images" / "blue.png"), str(chat_dir / "images" / "red.png")]
    assert rows[2]["images"] == []
    for index, row in enumerate(rows):
        validate_row(row, index)
    blue = load_image(rows[1]["images"][0], 1)
    assert blue.size == (5, 9) and blue.getpixel((2, 2)) == (0, 0, 255)


def test_jsonl_chat_system_prompt_is_prepended(chat_dir):
    rows = load_rows(DataSpec(path=str(chat_dir), system="Name colours.", **CHAT))
    for row in rows:
        assert row["messages"][0] == {
            "role": "system",
            "content": [{"type": "text", "text": "Name colours."}],
        }
        assert [m["role"] for m in row["messages"][1:]] == ["user", "assistant"]


def test_chat_parquet_with_image_list_stays_encoded(tmp_path):
    features = datasets.Features(
        {
            "messages": datasets.List(
                {
                    "role": datasets.Value("string"),
                    "content": datasets.List({"type": datasets.Value("string"), "text": datasets.Value("string")}),
                }
            ),
            "images": datasets.List(datasets.Image()),
        }
    )
    record = chat_record("Which?", "Green.", [{"bytes": png((4, 6), (0, 255, 0)), "path": None}])
    datasets.Dataset.from_list([record], features=features).to_parquet(str(tmp_path / "train.parquet"))
    rows = load_rows(DataSpec(path=str(tmp_path), **{**CHAT, "source_type": "parquet"}))
    (image,) = rows[0]["images"]
    assert isinstance(image, dict) and image["bytes"].startswith(b"\x89PNG")
    validate_row(rows[0], 0)
    assert load_image(image, 0).getpixel((1, 1)) == (0, 255, 0)


def test_jsonl_relative_image_paths_resolve_against_the_data_folder(chat_dir, monkeypatch, tmp_path_factory):
    records = [chat_record("What colour?", "Red.", ["images/red.png"])]
    (chat_dir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    for path in (chat_dir, chat_dir / "train.jsonl"):
        rows = load_rows(
            DataSpec(
                name="chat",
                format="chat",
                source_type="jsonl",
                path=None,
                columns={"messages": "messages", "images": "images"},
            ),
            path=path,
        )
        assert rows[0]["images"] == [str(chat_dir / "images" / "red.png")]
        assert load_image(rows[0]["images"][0], 0).getpixel((0, 0)) == (255, 0, 0)


# --- text encodings ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "line", "column"),
    [
        ("train.jsonl", b'{"image": "a.png", "text": "ok"}\n{"image": "b.png", "text": "caf\xe9"}\n', 2, 32),
        ("train.csv", b"image,text\na.png,ok\nb.png,na\xefve\n", 3, 9),
        ("train.json", b'[\n {"image": "a.png",\n  "text": "\xff"}\n]\n', 3, 12),
    ],
    ids=["jsonl", "csv", "json"],
)
def test_file_that_is_not_utf8_names_the_file_and_line(tmp_path, name, content, line, column):
    (tmp_path / name).write_bytes(content)
    source_type = name.rsplit(".", 1)[1]
    with pytest.raises(DataError, match=rf"{name} line {line}: not valid UTF-8 \(byte 0x.. at byte {column} of") as e:
        load_rows(DataSpec(name="mine", source_type=source_type, path=str(tmp_path)))
    assert e.value.kind == "non-UTF-8 text" and "iconv" in str(e.value)


def test_utf8_files_of_every_text_format_load(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"image": "a.png", "text": "café ∑"}\n', encoding="utf-8")
    (tmp_path / "train.csv").write_text("image,text\na.png,naïve\n", encoding="utf-8")
    for source_type, answer in (("jsonl", "café ∑"), ("csv", "naïve")):
        (row,) = load_rows(DataSpec(name="mine", source_type=source_type, path=str(tmp_path)))
        assert row["messages"][1]["content"] == [{"type": "text", "text": answer}]
        assert row["images"] == [str(tmp_path / "a.png")]


def test_binary_text_column_is_decoded_or_names_the_row(tmp_path):
    records = [
        {"image": {"bytes": png((4, 4), (0, 0, 0)), "path": None}, "text": "x^{2} ≤ y".encode()},
        {"image": {"bytes": png((4, 4), (0, 0, 0)), "path": None}, "text": "caf\xe9".encode("latin-1")},
    ]
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("binary")})
    datasets.Dataset.from_list(records, features=features).to_parquet(str(tmp_path / "train.parquet"))
    rows = load_rows(DataSpec(name="binary", path=str(tmp_path)))
    assert rows[0]["messages"][1]["content"] == [{"type": "text", "text": "x^{2} ≤ y".encode()}]  # as stored
    validate_row(rows[0], 0)
    assert text_of(rows[0]["messages"][1]["content"]) == "x^{2} ≤ y"
    with pytest.raises(DataError, match=r"^row 1: message 1 part 0 text is not valid UTF-8 \(byte 0xe9") as e:
        validate_row(rows[1], 1)
    assert e.value.kind == "non-UTF-8 text"


def test_csv_cells_are_read_as_written_and_empty_ones_are_empty(tmp_path):
    # pandas alone would read this column as floats: "007" -> 7.0, "1.50" -> 1.5, the empty cell -> NaN ("nan").
    (tmp_path / "train.csv").write_text("image,text\na.png,007\nb.png,\nc.png,1.50\nd.png,NA\n")
    rows = load_rows(DataSpec(name="numbers", source_type="csv", path=str(tmp_path)))
    assert [r["messages"][1]["content"][0]["text"] for r in rows] == ["007", "", "1.50", "NA"]
    with pytest.raises(DataError, match=r"^row 1: assistant turn \(message 1\) is empty"):
        validate_row(rows[1], 1)


@pytest.mark.parametrize(
    ("source_type", "columns", "missing", "available"),
    [
        ("jsonl", {"messages": "conversation", "images": "images"}, "conversation", "'messages', 'images'"),
        ("csv", {"image": "picture", "text": "text"}, "picture", "'image', 'text'"),
    ],
)
def test_spec_naming_a_column_that_does_not_exist_lists_the_columns(
    chat_dir, tmp_path, source_type, columns, missing, available
):
    if source_type == "csv":
        (tmp_path / "train.csv").write_text("image,text\na.png,x\n")
    fmt = "chat" if "messages" in columns else "image_text"
    folder = chat_dir if source_type == "jsonl" else tmp_path
    spec = DataSpec(name="mine", format=fmt, source_type=source_type, path=str(folder), columns=columns)
    with pytest.raises(ValueError, match=rf"names column\(s\) \['{missing}'\] .*available columns: \[{available}\]"):
        load_rows(spec)
