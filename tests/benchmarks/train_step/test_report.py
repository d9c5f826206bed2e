"""benchmarks/train_step/report.py: ratios to the baselines, the targets met or missed, n/a rows in the table."""

import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def report(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))  # benchmarks is not installed: it imports from the repository root
    return importlib.import_module("benchmarks.train_step.report")


def test_ratios_and_targets(report):
    script = report

    def ok(name, tokens, memory):
        return {
            "config": name,
            "status": "ok",
            "tokens_per_s": tokens,
            "step_s": 1000 / tokens,
            "images_per_s": 1.0,
            "peak_alloc_gib": memory,
            "peak_reserved_gib": memory,
            "loss_first": 2.0,
            "loss_last": 1.0,
            "warmup_s": 10.0,
        }

    results = [
        ok("hf_qlora", 1000, 20.0),
        ok("hf_qlora_noupcast", 2000, 16.0),
        ok("unsloth", 2500, 8.0),
        ok("vlmtune_qlora_kernels", 4000, 8.0),
        {"config": "hf_qlora_liger", "status": "n/a", "reason": "liger-kernel is not importable"},
        ok("vlmtune_qlora_kernels_packed", 5000, 7.0),
    ]
    script.add_ratios(results)
    ours = results[3]["ratios"]
    assert ours["hf_qlora"]["tokens_per_s"] == pytest.approx(4.0)
    assert ours["hf_qlora_noupcast"]["peak_alloc_gib"] == pytest.approx(0.5)
    assert "ratios" not in results[4]
    lines = script.targets(results)
    assert any(line.strip().startswith("MET") and "÷ unsloth: 1.60" in line for line in lines)
    assert any(line.strip().startswith("MET") and "÷ hf_qlora: 0.40" in line for line in lines)
    assert any(
        line.strip().startswith("MET") and "packed ÷ padded (same samples per step): 1.25" in line for line in lines
    )
    assert "n/a: liger-kernel is not importable" in script.table(results)
