"""report.html from a run's files, written here by hand: sections, numbers, formulas drawn or marked, no network."""

import base64
import io
import json

import pytest
from PIL import Image

from vlmtune import run_files
from vlmtune.data.latex_ocr import render_formula
from vlmtune.report import build_report, read_run, run_numbers
from vlmtune.report_figures import formula_png, line_plot

REFERENCES = [r"\frac{a}{b}", r"x^{2}"]


def _write_run(out, finished=True, predictions=True, best_step=None):
    (out / run_files.SAMPLES).mkdir(parents=True)
    progress = {"max_steps": 4, "finished": finished, "best_step": best_step, "best_metric": None}
    run = {
        "base_model": "tiny",
        "family": "qwen2_5_vl",
        "towers": {"vision": "frozen", "projector": "frozen", "language": "lora"},
        "lora": {"r": 8, "alpha": 16},
        "trainable_parameters": 100,
        "parameters": 1000,
        "rows": {"train": {"kept": 9, "skipped": {"too long": 1}}, "eval": {"kept": 2, "skipped": {}}},
        "versions": {"torch": "2.x"},
        "config": {"report_latex": True},
        "progress": progress,
    }
    run_files.write_json(out / run_files.RUN, run)
    for step in (1, 2, 3, 4):
        line = {"kind": "train", "step": step, "loss": 2.0 / step, "lr": 1e-3, "grad_norm": 1.0, "tokens": 100 * step}
        line.update(train_s=0.5, step_time_s=0.5, tokens_per_s=200.0, elapsed_s=float(step), gpu_peak_gib=1.5 * step)
        run_files.append_line(out / run_files.METRICS, line)
    for step, cer in ((0, 1.0), (4, 0.25)):
        line = {"kind": "eval", "step": step, "eval_loss": 3.0 - step / 4, "exact_match": 0.5, "cer": cer, "bleu": 0.1}
        line.update(eval_loss_s=0.1, generation_s=0.3, eval_s=0.5, elapsed_s=step + 0.5)
        run_files.append_line(out / run_files.METRICS, line)
    images = []
    for index, latex in enumerate(REFERENCES):
        (out / run_files.SAMPLES / f"{index:02d}.png").write_bytes(render_formula(latex, 14, 80))
        images.append({"reference": latex, "image": f"{index:02d}.png", "images": 1, "prompt": "Read."})
    run_files.write_json(out / run_files.SAMPLES_INDEX, {"samples": images})
    if predictions:
        run_files.append_line(out / run_files.PREDICTIONS, {"step": 0, "predictions": ["}{", "y"]})
        run_files.append_line(out / run_files.PREDICTIONS, {"step": 4, "predictions": [r"\frac{a}{b}", "x^{3}"]})


def test_the_report_shows_the_files_numbers(tmp_path, parse_report):
    _write_run(tmp_path)
    report = parse_report(build_report(tmp_path).read_text())
    values = {key: value for (key, step), value in report.values.items() if step is None}
    assert values["steps"] == 4 and values["wall_time_s"] == 4.5
    assert values["tokens_per_s"] == 400 / 2.0 and values["step_time_s"] == 0.5
    assert values["peak_gpu_gib"] == 6.0 and values["eval_s"] == 0.5
    assert (values["train_kept"], values["train_skipped"], values["eval_kept"]) == (9, 1, 2)
    assert report.values[("cer", "4")] == 0.25 and report.values[("eval_loss", "0")] == 3.0
    assert [(p["step"], p["text"]) for p in report.predictions] == [
        (0, "}{"),
        (4, r"\frac{a}{b}"),
        (0, "y"),
        (4, "x^{3}"),
    ]
    assert [p["cer"] for p in report.predictions] == pytest.approx(
        [9 / 11, 0.0, 1.0, 1 / 5]
    )  # edits / reference length


def test_predictions_are_drawn_as_formulas_or_marked(tmp_path, parse_report):
    _write_run(tmp_path)
    html = build_report(tmp_path).read_text()
    report = parse_report(html)
    kinds = [css for _, css, _ in report.sources]
    # 4 plots, 2 inputs; "}{" cannot be drawn, the other three predictions are.
    assert (kinds.count("plot"), kinds.count("input"), kinds.count("formula")) == (4, 2, 3)
    assert html.count("✗ not a drawable formula") == 1
    for _, _, source in report.sources:
        assert source.startswith("data:image/png;base64,")
        Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))).load()
    assert "http" not in html.replace("<!DOCTYPE html>", "") and "<script" not in html


def test_an_unfinished_run_without_evaluation_still_has_a_report(tmp_path, parse_report):
    _write_run(tmp_path, finished=False, predictions=False)
    (tmp_path / run_files.METRICS).write_text(
        "".join(
            json.dumps(r) + "\n" for r in run_files.read_lines(tmp_path / run_files.METRICS) if r["kind"] == "train"
        )
        + '{"kind": "train", "st'  # torn by a kill
    )
    html = build_report(tmp_path).read_text()
    assert "Not finished" in html and "No evaluation" in html and "not evaluated yet" in html
    assert parse_report(html).values[("steps", None)] == 4


def test_the_after_column_is_the_best_step_when_one_was_kept(tmp_path):
    _write_run(tmp_path, best_step=4)
    files = read_run(tmp_path)
    assert run_numbers(files)["steps"] == 4
    run_files.append_line(tmp_path / run_files.PREDICTIONS, {"step": 6, "predictions": ["a", "b"]})
    assert "(step 4)</th>" in build_report(tmp_path).read_text()


def test_a_folder_without_a_run_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="is it a run's folder"):
        build_report(tmp_path)


def test_figures_are_deterministic_and_skip_missing_values():
    series = [("train", [1, 2, 3], [3.0, None, 1.0], "-")]
    assert line_plot("loss", series) == line_plot("loss", series)
    assert line_plot("loss", [("eval", [1], [None], "o-")]) is None
    assert formula_png(r"\sqrt{x}") is not None
    assert formula_png(r"\frac{a}{b") is None and formula_png("  ") is None and formula_png("x" * 1000) is None
