"""CPU smoke test of benchmarks/eval_cost.py on the tiny Qwen2.5-VL (no timing asserted): it trains with
evaluation, and its record and printed lines come from the run's metrics.jsonl."""

import importlib
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def eval_cost(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))  # benchmarks is not installed: it imports from the repository root
    return importlib.import_module("benchmarks.eval_cost")


def test_a_tiny_run_records_step_and_evaluation_times(eval_cost, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OUT", str(tmp_path / "records"))
    argv = ["--model", "tiny-qwen", "--steps", "2", "--eval-steps", "1", "--batch", "2", "--rows", "6"]
    argv += ["--eval-rows", "2", "--eval-samples", "1", "--max-new-tokens", "3", "--warmup", "0"]
    assert eval_cost.main([*argv, "--cache", str(tmp_path / "cache")]) == 0
    printed = capsys.readouterr().out
    assert "training step" in printed and "one evaluation =" in printed
    record = json.loads((tmp_path / "records" / "eval_cost.json").read_text())
    assert [e["step"] for e in record["evaluations"]] == [0, 1, 2]
    assert record["kernels"] is False and record["eval_rows"] == 2  # CPU: the plain path
    assert record["eval_s_mean"] == pytest.approx(sum(e["eval_s"] for e in record["evaluations"][1:]) / 2)
    assert record["eval_in_steps"] == pytest.approx(record["eval_s_mean"] / record["step_s_median"])
    assert Path(record["report"]).exists()
