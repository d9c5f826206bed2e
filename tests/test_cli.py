"""The `vlmtune` command line: make-data, tiny, train (forwarded to the recipe), report, demo (slow)."""

import hashlib

import pytest

from vlmtune.cli import main


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_make_data_writes_deterministic_parquet(tmp_path, capsys):
    for name in ("a", "b"):
        main(["make-data", "latex-ocr", "--n", "6", "--out", str(tmp_path / name), "--seed", "3"])
    assert "train.parquet" in capsys.readouterr().out
    for split in ("train.parquet", "test.parquet"):
        assert _digest(tmp_path / "a" / split) == _digest(tmp_path / "b" / split)


def test_tiny_writes_a_loadable_checkpoint(tmp_path):
    from transformers import AutoConfig

    main(["tiny", "--family", "gemma3", "--out", str(tmp_path / "g")])
    assert AutoConfig.from_pretrained(tmp_path / "g").model_type == "gemma3"


def test_train_forwards_to_the_recipe(tiny_gemma, latex_data, tmp_path, capsys):
    main(
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


@pytest.mark.slow
def test_demo_loss_falls(tmp_path, capsys):
    main(["demo", "--out", str(tmp_path)])
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
    main(["report", str(tmp_path)])
    assert f"wrote {tmp_path / 'report.html'}" in capsys.readouterr().out
    assert 'data-value="2.0"' in (tmp_path / "report.html").read_text()
