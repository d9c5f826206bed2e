"""CPU smoke test of benchmarks/train_step.py: the harness runs end to end on a tiny model (no timing asserted)."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "train_step.py"
FIELDS = (
    "step_s",
    "tokens_per_s",
    "images_per_s",
    "peak_alloc_gib",
    "peak_reserved_gib",
    "loss_first",
    "loss_last",
    "warmup_s",
    "load_s",
    "lora_modules",
    "trainable_params",
    "versions",
)


def _load_script(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))  # the script imports its helpers as benchmarks.*
    spec = importlib.util.spec_from_file_location("train_step_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_harness_runs_end_to_end_on_cpu(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(SCRIPT), "--model", "tiny-qwen", "--shape", "fixed", "--device", "cpu"]
    cmd += ["--configs", "hf_bf16,vlmtune_bf16,hf_qlora,unsloth", "--batch", "2", "--warmup", "0", "--steps", "2"]
    cmd += ["--out", str(out), "--cache", str(tmp_path / "cache")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "| configuration |" in run.stdout

    data = json.loads((out / "tiny-qwen_fixed_cpu.json").read_text())
    assert data["meta"]["model"] == "tiny-qwen" and data["meta"]["data"]["batch_size"] == 2
    results = {r["config"]: r for r in data["results"]}
    assert list(results) == ["hf_bf16", "vlmtune_bf16", "hf_qlora", "unsloth"]
    for name in ("hf_bf16", "vlmtune_bf16"):
        record = results[name]
        assert record["status"] == "ok", record.get("reason")
        assert all(field in record for field in FIELDS), sorted(set(FIELDS) - set(record))
        assert len(record["losses"]) == 2 and all(math.isfinite(x) for x in record["losses"])
        assert record["tokens_per_step"] == sum(data["meta"]["data"]["tokens_per_batch"])
    # Same placement of LoRA on both stacks, same data: the first losses agree.
    assert results["hf_bf16"]["lora_modules"] == results["vlmtune_bf16"]["lora_modules"] > 0
    assert results["hf_bf16"]["loss_first"] == pytest.approx(results["vlmtune_bf16"]["loss_first"], rel=1e-4)
    # bitsandbytes 4-bit and Unsloth need CUDA: reported, not run.
    assert results["hf_qlora"]["status"] == results["unsloth"]["status"] == "skipped"


def test_ratios_and_targets(monkeypatch):
    script = _load_script(monkeypatch)

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
    ]
    script.add_ratios(results)
    ours = results[3]["ratios"]
    assert ours["hf_qlora"]["tokens_per_s"] == pytest.approx(4.0)
    assert ours["hf_qlora_noupcast"]["peak_alloc_gib"] == pytest.approx(0.5)
    assert "ratios" not in results[4]
    lines = script.targets(results)
    assert any(line.strip().startswith("MET") and "÷ unsloth: 1.60" in line for line in lines)
    assert any(line.strip().startswith("MET") and "÷ hf_qlora: 0.40" in line for line in lines)
    assert "n/a: liger-kernel is not importable" in script.table(results)
