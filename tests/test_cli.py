"""The `vlmtune` command line: make-data, tiny, train (forwarded to the recipe), demo (slow)."""

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
    assert "first loss" in capsys.readouterr().out
    assert (tmp_path / "o" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_demo_loss_falls(tmp_path, capsys):
    main(["demo", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if "[demo] loss:" in line)
    first, last = (float(x) for x in line.split("first ")[1].split(" over")[0].split(" -> last "))
    assert last < first - 1.0
