"""The epoch benchmark at tiny size on the CPU: both stacks train one epoch of the same rows and are reported."""

import json
import os
import sys
from pathlib import Path

from benchmarks import epoch

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_epoch_runs_every_stack_on_the_same_rows(tmp_path, monkeypatch):
    # The workers are `python -m benchmarks.epoch` children: this checkout first on their path.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.delenv("OUT", raising=False)
    argv = ["--tiny", "--rows", "4", "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")]
    argv += ["--render-workers", "2"]
    assert epoch.main(argv) == 0, sys.stderr
    record = json.loads((tmp_path / "out" / "epoch_tiny-qwen.json").read_text())
    results = {r["stack"]: r for r in record["results"]}
    assert set(results) == {"vlmtune", "hf_bf16"}
    for stack in results:  # each stack's output streamed to its log, with the phases
        assert "epoch done" in (tmp_path / "out" / f"epoch_tiny-qwen_{stack}.log").read_text()
    rendered = tmp_path / "cache" / "latex_ocr_epoch_4_w2"  # two parts of 2 rows, joined
    assert sorted(p.name for p in rendered.iterdir()) == ["part0", "part1", "train.parquet"]
    for r in results.values():
        assert r["rows"] == 4 and r["epoch_s"] > 0 and r["rows_per_s"] == 4 / r["epoch_s"]
        assert r["final_loss"] > 0 and r["peak_alloc_gib"] is None  # no CUDA: no peak to read
    # vlmtune packs the 4 rows under one max_length budget (the CPU default of "auto"); hf_bf16 runs batch 4.
    assert results["vlmtune"]["step"] == {"max_tokens_per_step": 2048} and results["vlmtune"]["steps"] == 1
    assert results["hf_bf16"]["step"] == {"batch_size": 4} and results["hf_bf16"]["steps"] == 1
