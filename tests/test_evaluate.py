"""OCR metrics checked against hand-computed values, and greedy generation through the processor."""

import math

import pytest

import vlmtune
from vlmtune.evaluate import answer_of, bleu, character_error_rate, edit_distance, generate, ocr_metrics


@pytest.mark.parametrize(
    ("a", "b", "d"), [("", "", 0), ("abc", "", 3), ("kitten", "sitting", 3), (r"\frac{a}{b}", r"\frac{a}{c}", 1)]
)
def test_edit_distance(a, b, d):
    assert edit_distance(a, b) == d


def test_cer_is_total_edits_over_total_reference_length():
    assert character_error_rate(["kitten", "abc"], ["sitting", "abc"]) == pytest.approx(3 / 10)


def test_bleu_perfect_zero_and_hand_computed():
    assert bleu(["a b c d"], ["a b c d"]) == pytest.approx(1.0)
    assert bleu(["x y z"], ["a b c"]) == 0.0
    # pred "a b c e" vs ref "a b c d": p1=3/4, p2=(2+1)/(3+1), p3=(1+1)/(2+1), p4=(0+1)/(1+1), equal lengths.
    expected = math.exp((math.log(3 / 4) + math.log(3 / 4) + math.log(2 / 3) + math.log(1 / 2)) / 4)
    assert bleu(["a b c e"], ["a b c d"]) == pytest.approx(expected)


def test_ocr_metrics_normalise_whitespace_for_exact_match():
    scores = ocr_metrics([" x ^ 2 ", "y"], ["x ^ 2", "z"])
    assert scores["exact_match"] == 0.5
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        ocr_metrics(["a", "b"], ["a"])


def test_generate_returns_one_string_per_row(tiny_gemma, latex_data):
    model, processor, _ = vlmtune.load(tiny_gemma)
    rows = vlmtune.load_rows("latex_ocr", split="test", path=latex_data)
    rows = [rows[0], rows[1]]
    out = generate(model, processor, rows, max_new_tokens=5)
    assert len(out) == 2 and all(isinstance(p, str) for p in out)
    assert answer_of(rows[0]) == rows[0]["messages"][-1]["content"][0]["text"]
