"""The LaTeX-OCR recipe end to end on the tiny Qwen2.5-VL at a fixed seed reproduces a committed loss list."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

import vlmtune

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "latex_ocr.py"

# Recorded with torch 2.14.1 (CPU), transformers 5.23, peft 0.21 on the tiny checkpoint (seed 0) and 24 generated
# samples (seed 0); a change in any of them, the tokenizer corpus or the collator shows up here first.
EXPECTED_LOSSES = [7.3441, 6.7269, 6.3740, 6.1718, 5.8001, 5.7112, 5.6087, 5.4696]


def _recipe():
    spec = importlib.util.spec_from_file_location("latex_ocr_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_recipe_reproduces_the_committed_losses(tiny_qwen, latex_data, tmp_path):
    recipe = _recipe()
    config = recipe.parse_args(
        [
            "--model",
            str(tiny_qwen),
            "--data",
            str(latex_data),
            "--out",
            str(tmp_path / "out"),
            "--max-steps",
            "8",
            "--batch-size",
            "2",
            "--lr",
            "5e-3",
            "--logging-steps",
            "1",
            "--eval-samples",
            "2",
            "--seed",
            "0",
        ]
    )
    config.training.eval_max_new_tokens = 8
    summary = recipe.main(config)
    print(json.dumps(summary["losses"]))
    assert summary["losses"] == pytest.approx(EXPECTED_LOSSES, rel=1e-3)  # evaluating while training changes nothing
    assert set(summary["metrics"]) == {"exact_match", "cer", "bleu"}
    assert summary["eval_loss"] < 8
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()
    assert {"metrics.jsonl", "report.html", "run.json"} <= {p.name for p in (tmp_path / "out").iterdir()}
    record = json.loads((tmp_path / "out" / "vlmtune.json").read_text())
    assert record["recipe"]["model"] == str(tiny_qwen)


def test_recipe_flags_map_to_the_config():
    recipe = _recipe()
    config = recipe.parse_args(["--model", "m", "--qlora", "--no-tune-vision", "--no-mlp", "--max-pixels", "50176"])
    assert config.quant == "nf4"
    assert (config.eval_rows, config.training.eval_steps, config.training.eval_samples) == (200, 0, 16)
    assert config.training.report_latex and config.training.eval_max_new_tokens == 96
    evaluating = recipe.parse_args(["--model", "m", "--eval-steps", "5", "--save-steps", "10", "--best-metric", "cer"])
    assert (evaluating.training.eval_steps, evaluating.training.best_metric) == (5, "cer")
    assert (config.tuning.vision, config.tuning.language, config.tuning.mlp) == ("frozen", "lora", False)
    assert config.training.image_options == {"max_pixels": 50176}
    assert isinstance(config.tuning, vlmtune.TuningConfig)


def test_resume_flags_map_to_the_config():
    recipe = _recipe()
    assert recipe.parse_args(["--model", "m"]).training.resume is None
    assert recipe.parse_args(["--model", "m", "--resume"]).training.resume is True  # the newest complete one
    config = recipe.parse_args(["--model", "m", "--resume", "out/checkpoints/checkpoint-50", "--resume-force"])
    assert (config.training.resume, config.training.resume_force) == ("out/checkpoints/checkpoint-50", True)
    assert recipe.parse_args(["--model", "m", "--save-total-limit", "2"]).training.save_total_limit == 2


@pytest.mark.parametrize("quant", ["none", "nf4"])
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "gemma3", "minicpmv4_6", "minicpmv"])
def test_every_family_trains_and_exports_through_the_recipe(family, quant, latex_data, tmp_path):
    from vlmtune.tiny import build

    model = build(family, tmp_path / "tiny")
    recipe = _recipe()
    config = recipe.parse_args(
        [
            "--model",
            str(model),
            "--data",
            str(latex_data),
            "--out",
            str(tmp_path / "out"),
            "--max-steps",
            "2",
            "--batch-size",
            "2",
            "--lr",
            "5e-3",
            "--logging-steps",
            "1",
            "--eval-rows",
            "2",
            "--eval-samples",
            "1",
            "--max-new-tokens",
            "2",
        ]
    )
    config.quant = quant
    summary = recipe.main(config)
    assert len(summary["losses"]) == 2 and all(loss == loss for loss in summary["losses"])  # finite, not NaN
    assert summary["eval_loss"] == summary["eval_loss"] and set(summary["metrics"]) == {"exact_match", "cer", "bleu"}
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()
    assert (tmp_path / "out" / "vlmtune.json").exists()
