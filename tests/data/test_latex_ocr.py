import hashlib
import io
import logging
import random
import re

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlmtune.data import latex_ocr
from vlmtune.data.latex_ocr import make_latex_ocr, random_formula, render_formula

N_SEEDS = 200
N_SAMPLES, TEST_FRACTION = 12, 0.25  # 9 train + 3 test rows


@pytest.fixture(scope="module")
def formulas() -> list[str]:
    return [random_formula(random.Random(seed)) for seed in range(N_SEEDS)]


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("latex_ocr")
    make_latex_ocr(N_SAMPLES, out_dir, seed=0, test_fraction=TEST_FRACTION)
    return out_dir


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- random_formula ---------------------------------------------------------------------------------------


def test_every_formula_renders(formulas):
    for formula in formulas:
        png = render_formula(formula, fontsize=10, dpi=80)
        with Image.open(io.BytesIO(png)) as image:
            assert image.format == "PNG" and image.mode == "RGB", formula


def test_formula_lengths_vary_within_bounds(formulas):
    lengths = [len(formula) for formula in formulas]
    assert min(lengths) >= latex_ocr.MIN_CHARS
    assert max(lengths) <= latex_ocr.MAX_CHARS
    # Both short formulas and ones near the cap must come up, not one typical length.
    assert min(lengths) <= 10
    assert max(lengths) >= 120


@pytest.mark.parametrize(
    "family, pattern",
    [
        ("fraction", r"\\frac\{"),
        ("square root", r"\\sqrt\{"),
        ("n-th root", r"\\sqrt\["),
        ("sum with limits", r"\\sum_\{.+?\}\^\{"),
        ("integral with limits", r"\\int_\{.+?\}\^\{"),
        ("product with limits", r"\\prod_\{.+?\}\^\{"),
        ("greek letter", r"\\(alpha|beta|gamma|theta|lambda|pi|sigma|omega|Delta|Omega)"),
        ("subscript", r"_\{"),
        ("superscript", r"\^\{"),
        ("accent", r"\\(hat|bar|vec|dot|tilde)\{"),
        ("function", r"\\(sin|cos|log|ln|exp|tan)\b"),
        ("limit", r"\\lim_\{\w \\to "),
        ("partial derivative", r"\\partial"),
        ("relation", r"\\(leq|geq|neq|approx)"),
        ("operator", r"\\(cdot|times|pm)"),
        ("infinity", r"\\infty"),
        ("stretchy delimiters", r"\\left.+\\right"),
        ("matrix", r"\\substack\{.+\\\\.+\} \\quad \\substack"),
    ],
)
def test_each_construct_family_appears(formulas, family, pattern):
    assert any(re.search(pattern, formula) for formula in formulas), family


def test_random_formula_uses_only_the_given_rng():
    random.seed(1)  # the global generator must not matter
    first = [random_formula(random.Random(7)) for _ in range(3)]
    random.seed(2)
    assert [random_formula(random.Random(7)) for _ in range(3)] == first
    assert random_formula(random.Random(8)) != first[0]


# --- render_formula ---------------------------------------------------------------------------------------


def test_render_is_byte_deterministic_without_metadata():
    latex = r"\frac{\alpha}{\sqrt[3]{x_{i}^{2}}} \leq \sum_{k=1}^{n} \hat{y}_{k}"
    png = render_formula(latex, fontsize=14, dpi=100)
    assert render_formula(latex, fontsize=14, dpi=100) == png
    # matplotlib's default "Software: Matplotlib version ..." text chunk would tie the bytes to its version.
    assert b"tEXt" not in png and b"Matplotlib" not in png


def test_render_is_black_on_white_and_scales_with_fontsize_and_dpi():
    latex = r"\int_{0}^{\infty} e^{-x} \, dx = 1"
    with Image.open(io.BytesIO(render_formula(latex, fontsize=10, dpi=80))) as small:
        small_size = small.size
        (lightest, darkest) = (max(small.getdata()), min(small.getdata()))
    with Image.open(io.BytesIO(render_formula(latex, fontsize=20, dpi=150))) as large:
        large_size = large.size
    assert lightest == (255, 255, 255)
    assert max(darkest) < 64  # anti-aliased glyph cores are (near) black
    assert large_size[0] > small_size[0] and large_size[1] > small_size[1]


def test_render_rejects_what_mathtext_cannot_parse():
    with pytest.raises(ValueError):
        render_formula(r"\begin{matrix} a & b \end{matrix}", fontsize=12, dpi=100)


# --- make_latex_ocr ---------------------------------------------------------------------------------------


def test_same_seed_gives_identical_files(dataset_dir, tmp_path):
    paths = make_latex_ocr(N_SAMPLES, tmp_path, seed=0, test_fraction=TEST_FRACTION)
    assert paths == {"train": tmp_path / "train.parquet", "test": tmp_path / "test.parquet"}
    for split, path in paths.items():
        assert _sha256(path) == _sha256(dataset_dir / f"{split}.parquet"), split


def test_different_seed_gives_different_files(dataset_dir, tmp_path):
    paths = make_latex_ocr(N_SAMPLES, tmp_path, seed=1, test_fraction=TEST_FRACTION)
    for split, path in paths.items():
        assert _sha256(path) != _sha256(dataset_dir / f"{split}.parquet"), split


def test_parquet_schema_matches_hub_latex_ocr(dataset_dir):
    for split in ("train", "test"):
        schema = pq.read_schema(dataset_dir / f"{split}.parquet")
        assert schema.names == ["image", "text"]
        assert schema.field("image").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])
        assert schema.field("text").type == pa.string()
        image_paths = pq.read_table(dataset_dir / f"{split}.parquet").column("image").combine_chunks().field("path")
        assert image_paths.null_count == len(image_paths)


def test_load_dataset_decodes_images_and_text(dataset_dir, tmp_path):
    loaded = datasets.load_dataset(
        "parquet",
        data_files={split: str(dataset_dir / f"{split}.parquet") for split in ("train", "test")},
        cache_dir=str(tmp_path),
    )
    assert {split: loaded[split].num_rows for split in loaded} == {"train": 9, "test": 3}
    assert loaded["train"].column_names == ["image", "text"]
    assert isinstance(loaded["train"].features["image"], datasets.Image)
    rows = list(loaded["train"]) + list(loaded["test"])
    sizes = set()
    for row in rows:
        assert isinstance(row["image"], Image.Image)
        assert row["image"].mode == "RGB"
        assert row["text"].strip() and "$" not in row["text"]
        sizes.add(row["image"].size)
    assert len(sizes) > N_SAMPLES // 2  # per-sample fontsize/dpi plus formula length vary the size


def test_zero_test_fraction_writes_an_empty_test_split(tmp_path):
    paths = make_latex_ocr(3, tmp_path, seed=0, test_fraction=0.0)
    assert pq.read_metadata(paths["train"]).num_rows == 3
    assert pq.read_metadata(paths["test"]).num_rows == 0
    assert pq.read_schema(paths["test"]).names == ["image", "text"]


def test_train_split_keeps_at_least_one_sample(tmp_path):
    paths = make_latex_ocr(2, tmp_path, seed=0, test_fraction=0.9)
    assert pq.read_metadata(paths["train"]).num_rows == 1
    assert pq.read_metadata(paths["test"]).num_rows == 1


def test_unrenderable_formula_is_redrawn_and_logged(tmp_path, monkeypatch, caplog):
    real_render = latex_ocr.render_formula
    calls = []

    def render_failing_once(latex, fontsize, dpi):
        calls.append(latex)
        if len(calls) == 1:
            raise ValueError("Unknown symbol")
        return real_render(latex, fontsize, dpi)

    monkeypatch.setattr(latex_ocr, "render_formula", render_failing_once)
    with caplog.at_level(logging.WARNING, logger=latex_ocr.__name__):
        paths = make_latex_ocr(2, tmp_path, seed=0, test_fraction=0.0)
    texts = pq.read_table(paths["train"]).column("text").to_pylist()
    assert len(calls) == 3
    assert texts == calls[1:]  # the rejected formula is not written
    assert "could not render" in caplog.text


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"n": 0}, "n"),
        ({"n": -3}, "n"),
        ({"n": 2.5}, "n"),
        ({"n": 4, "test_fraction": 1.0}, "test_fraction"),
        ({"n": 4, "test_fraction": -0.1}, "test_fraction"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(tmp_path, kwargs, argument):
    with pytest.raises(ValueError, match=rf"^{argument} must"):
        make_latex_ocr(out_dir=tmp_path, **kwargs)
    assert not (tmp_path / "train.parquet").exists()
