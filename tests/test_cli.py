"""The `vlmtune` command line, run in-process: every sub-command (the report and the demo too), and user errors as one
message, a hint, exit 2."""

import hashlib
import json

import pytest
from PIL import Image

from vlmtune.cli import main


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _train(model, data, out, *extra):
    args = [
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--eval-samples",
        "0",
        "--logging-steps",
        "1",
        "--vision",
        "frozen",
    ]
    return main(["train", "--model", str(model), "--data", str(data), "--out", str(out), *args, *extra])


def _user_error(capsys, status):
    """The stderr of a run that must have ended as a user error: status 2, a hint, no traceback."""
    err = capsys.readouterr().err
    assert status == 2, err
    assert "Traceback" not in err and "\nhint: " in err and "--debug" in err
    return err


def _chat_rows(folder, rows):
    """Write ``train.jsonl`` of chat rows ``(image_name, answer)`` with a white PNG ``good.png`` beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 20), "white").save(folder / "good.png")
    (folder / "corrupt.png").write_bytes(b"this is not a png")
    lines = []
    for image, answer in rows:
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ]
        lines.append(json.dumps({"messages": messages, "images": [image]}))
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    return folder


THREE_BAD = [
    ("good.png", "a page"),
    ("missing.png", "x"),
    ("good.png", "a page"),
    ("corrupt.png", "y"),
    ("good.png", ""),
]


def test_make_data_writes_deterministic_parquet(tmp_path, capsys):
    for name in ("a", "b"):
        assert main(["make-data", "latex-ocr", "--n", "6", "--out", str(tmp_path / name), "--seed", "3"]) == 0
    assert "train.parquet" in capsys.readouterr().out
    for split in ("train.parquet", "test.parquet"):
        assert _digest(tmp_path / "a" / split) == _digest(tmp_path / "b" / split)


def test_tiny_writes_a_loadable_checkpoint(tmp_path):
    from transformers import AutoConfig

    assert main(["tiny", "--family", "gemma3", "--out", str(tmp_path / "g")]) == 0
    assert AutoConfig.from_pretrained(tmp_path / "g").model_type == "gemma3"


def test_train_forwards_to_the_recipe(tiny_gemma, latex_data, tmp_path, capsys):
    status = main(
        [
            "train",
            "--model",
            str(tiny_gemma),
            "--data",
            str(latex_data),
            "--out",
            str(tmp_path / "o"),
            "--max-steps",
            "2",
            "--batch-size",
            "2",
            "--eval-samples",
            "1",
            "--no-tune-vision",
            "--logging-steps",
            "1",
        ]
    )
    out = capsys.readouterr().out
    assert status == 0
    assert "first loss" in out and f"report: {tmp_path / 'o'}/report.html" in out
    assert (tmp_path / "o" / "adapter_model.safetensors").exists()
    _assert_a_whole_report(tmp_path / "o", steps=[1, 2], evaluations=[0, 2])


def _assert_a_whole_report(out, steps, evaluations):
    """metrics.jsonl has these steps and evaluations; report.html has every part, with a drawn formula or a mark."""
    from vlmtune import run_files

    lines = run_files.read_lines(out / "metrics.jsonl")
    assert [r["step"] for r in lines if r["kind"] == "train"] == steps
    assert [r["step"] for r in lines if r["kind"] == "eval"] == evaluations
    html = (out / "report.html").read_text()
    for part in ("Summary", "Data", "Curves", "Evaluations", "Held-out samples", "Versions and configuration"):
        assert f"<h2>{part}</h2>" in html
    assert html.count('class="plot"') == 4 and 'class="input"' in html
    assert 'class="formula"' in html or "not a drawable formula" in html


def test_tiny_family_is_a_choice(tmp_path, capsys):
    assert main(["tiny", "--family", "llava", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'llava'" in err and "qwen2_5_vl" in err and "minicpmv" in err and "Traceback" not in err


def test_train_runs_the_recipe_and_says_what_it_did(tiny_gemma, latex_data, tmp_path, capsys, caplog):
    caplog.set_level("INFO", logger="vlmtune")
    assert _train(tiny_gemma, latex_data, tmp_path / "o", "--eval-samples", "1") == 0
    assert "first loss" in capsys.readouterr().out
    assert (tmp_path / "o" / "adapter_model.safetensors").exists()
    assert "prepared 18 of 18 training rows; skipped 0" in caplog.text
    assert f"exported adapter and processor to {tmp_path / 'o'}" in caplog.text


def test_train_help_lists_the_recipe_config(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: vlmtune train --model PATH")
    for flag in ("--on-bad-row {error,skip}", "--overflow {drop,error}", "--vision {frozen,lora,full}", "--packing"):
        assert flag in out
    assert "--epochs FLOAT" in out and "--warmup-ratio FLOAT" in out and "--vision-lr FLOAT" in out
    flat = " ".join(out.split())  # the help wraps at the terminal's width
    assert "--max-steps INT optimiser steps (overrides epochs when > 0). (default: 200)" in flat


def test_a_wrong_column_is_one_message(tiny_qwen, latex_data, tmp_path, capsys):
    spec = tmp_path / "formula.yaml"
    spec.write_text("name: formula\nsource: {type: parquet}\ncolumns: {image: image, text: formula}\n")
    err = _user_error(capsys, _train(tiny_qwen, latex_data, tmp_path / "o", "--spec", str(spec)))
    assert "names column(s) ['formula'] that the data does not have; available columns: ['image', 'text']" in err


def test_a_missing_model_folder_is_one_message(latex_data, tmp_path, capsys):
    err = _user_error(capsys, _train(tmp_path / "nope", latex_data, tmp_path / "o"))
    assert f"checkpoint folder {str(tmp_path / 'nope')!r} does not exist" in err


def test_an_unsupported_model_type_is_one_message(latex_data, tmp_path, capsys):
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    err = _user_error(capsys, _train(tmp_path / "llama", latex_data, tmp_path / "o"))
    assert "model_type 'llama' is not supported by vlmtune; supported: [" in err and "'qwen2_5_vl'" in err


def test_an_invalid_config_value_is_one_message(tiny_qwen, latex_data, tmp_path, capsys):
    err = _user_error(capsys, _train(tiny_qwen, latex_data, tmp_path / "o", "--r", "0"))
    assert "error: r must be >= 1, got 0" in err


def test_every_bad_row_is_listed_and_written(tiny_qwen, tmp_path, capsys):
    data = _chat_rows(tmp_path / "data", THREE_BAD)
    err = _user_error(capsys, _train(tiny_qwen, data, tmp_path / "o", "--spec", "chat"))
    assert f"row 1: image file {str(data / 'missing.png')!r} not found" in err
    assert "row 3: cannot decode image (UnidentifiedImageError" in err
    assert "row 4: assistant turn (message 1) is empty" in err
    assert "3 bad row(s) of 5 (missing image 1, unreadable image 1, empty answer 1)" in err
    assert "--on-bad-row skip" in err
    written = [json.loads(line) for line in (tmp_path / "o" / "bad_rows.jsonl").read_text().splitlines()]
    assert [(r["row"], r["kind"]) for r in written] == [
        (1, "missing image"),
        (3, "unreadable image"),
        (4, "empty answer"),
    ]
    assert not (tmp_path / "o" / "adapter_model.safetensors").exists()


def test_skipped_rows_are_named_too_long_ones_included(tiny_qwen, tmp_path, caplog):
    caplog.set_level("INFO", logger="vlmtune")
    rows = [*THREE_BAD, ("good.png", "word " * 300)]
    data = _chat_rows(tmp_path / "data", rows)
    status = _train(tiny_qwen, data, tmp_path / "o", "--spec", "chat", "--on-bad-row", "skip", "--max-length", "256")
    assert status == 0
    written = [json.loads(line) for line in (tmp_path / "o" / "bad_rows.jsonl").read_text().splitlines()]
    assert [(r["row"], r["kind"]) for r in written] == [
        (1, "missing image"),
        (3, "unreadable image"),
        (4, "empty answer"),
        (5, "too long"),
    ]
    assert "row 5: has " in caplog.text and "more than max_length=256" in caplog.text
    assert "prepared 2 of 6 training rows" in caplog.text


def test_debug_shows_the_traceback(latex_data, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(["--debug", "train", "--model", str(tmp_path / "nope"), "--data", str(latex_data)])


@pytest.mark.slow
def test_demo_loss_falls(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if "[demo] loss:" in line)
    first, last = (float(x) for x in line.split("first ")[1].split(" over")[0].split(" -> last "))
    assert last < first - 1.0
    assert f"[demo] report: {tmp_path / 'out' / 'report.html'}" in out
    _assert_a_whole_report(tmp_path / "out", steps=list(range(10, 101, 10)), evaluations=[0, 25, 50, 75, 100])


def test_report_rebuilds_a_runs_report(tmp_path, capsys):
    from vlmtune import run_files

    run_files.append_line(
        tmp_path / "metrics.jsonl", {"kind": "eval", "step": 0, "eval_loss": 2.0, "eval_s": 1.0, "elapsed_s": 1.0}
    )
    run_files.write_json(tmp_path / "run.json", {"base_model": "m"})
    assert main(["report", str(tmp_path)]) == 0
    assert f"wrote {tmp_path / 'report.html'}" in capsys.readouterr().out
    assert 'data-value="2.0"' in (tmp_path / "report.html").read_text()


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "gemma3", "minicpmv4_6", "minicpmv"])
def test_export_merged_generate_and_eval_work_for_every_family(family, random_export, latex_data, tmp_path, capsys):
    import vlmtune

    out, _ = random_export(family)
    assert main(["export", "--adapter", str(out), "--merged", str(tmp_path / "merged")]) == 0
    merged, _, detected = vlmtune.load(tmp_path / "merged")
    assert detected.name == vlmtune.detect(merged.config).name and merged.config.model_type == family
    image = tmp_path / "formula.png"
    Image.new("RGB", (64, 32), "white").save(image)
    assert main(["generate", "--adapter", str(out), "--image", str(image), "--max-new-tokens", "3"]) == 0
    assert main(["eval", "--adapter", str(out), "--data", str(latex_data), "--n", "1", "--max-new-tokens", "3"]) == 0
    metrics = capsys.readouterr().out.strip().splitlines()[-1]
    assert "'exact_match'" in metrics and "'cer'" in metrics and "'bleu'" in metrics


def test_a_relative_model_works_from_another_folder(tiny_checkpoint, latex_data, tmp_path, monkeypatch, capsys):
    import shutil

    shutil.copytree(tiny_checkpoint("qwen2_5_vl"), tmp_path / "a" / "tiny" / "qwen")
    monkeypatch.chdir(tmp_path / "a")
    assert _train("tiny/qwen", latex_data, "out") == 0
    recorded = json.loads((tmp_path / "a" / "out" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str(tmp_path / "a" / "tiny" / "qwen")
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "b")
    Image.new("RGB", (64, 32), "white").save("formula.png")
    capsys.readouterr()
    assert main(["generate", "--adapter", "../a/out", "--image", "formula.png", "--max-new-tokens", "2"]) == 0
    # The same export once the base has moved away: one message naming the recorded folder, no hub lookup.
    (tmp_path / "a" / "tiny").rename(tmp_path / "a" / "elsewhere")
    err = _user_error(capsys, main(["generate", "--adapter", "../a/out", "--image", "formula.png"]))
    assert f"base model folder {recorded!r} does not exist" in err and "--base" in err
