"""The epoch benchmark at tiny size on the CPU: both stacks train one epoch of the same rows and are reported."""

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from benchmarks import epoch
from vlmtune.evaluate import answer_of

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
    vlmtune = results["vlmtune"]  # no probe on the CPU; its training steps are part of its epoch
    assert vlmtune["probe_s"] is None and 0 < vlmtune["train_s"] < vlmtune["epoch_s"]
    # The same 4 held-out rows scored after each epoch: seed EVAL_SEED, none of the epoch's rows.
    held_out = epoch._data(SimpleNamespace(), tmp_path / "cache" / "latex_ocr_eval_4")
    trained = epoch._data(SimpleNamespace(), rendered)
    assert len(held_out) == 4 and not {answer_of(r) for r in held_out} & {answer_of(r) for r in trained}
    for r in results.values():
        assert 0 < r["held_out_loss"] < 30 and r["held_out_loss"] != r["final_loss"]
    assert "| held-out loss |" in epoch.table(list(results.values()))


def test_the_held_out_loss_counts_every_supervised_token_once():
    # Two batches of unequal supervised counts: the loss per token, not the mean of the batches' means.
    class Constant(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = []

        def forward(self, labels, **kwargs):
            self.calls.append(labels.shape[0])
            return SimpleNamespace(loss=torch.tensor(float(len(self.calls))))  # 1.0, then 2.0

    class Collate:
        def __call__(self, items):
            labels = torch.tensor([[-100, 5, 5, 5]] * len(items))  # 3 supervised tokens a row
            return {"labels": labels}

    model = Constant()
    prepared = [{"index": i} for i in range(5)]  # batches of 4 rows (12 tokens) and 1 row (3 tokens)
    loss = epoch.held_out_loss(model, Collate(), prepared, "cpu")
    assert model.calls == [4, 1] and loss == (1.0 * 12 + 2.0 * 3) / 15


def test_a_stopped_baseline_keeps_the_rate_of_the_rows_it_trained():
    progress = {"rows": 640, "epoch_s": 20.0, "batch_size": 128, "losses": [3.0] * 9 + [1.0]}
    lines = ["[  4.2 s] unsloth set up", epoch.PROGRESS + json.dumps(progress), "Traceback ..."]
    record = epoch.record_from_log("unsloth", "stopped after 230 s", lines)
    assert record["status"] == "partial" and record["rows"] == 640 and record["rows_per_s"] == 32.0
    assert record["steps"] == 10 and record["final_loss"] == 1.0 and record["step"] == {"batch_size": 128}
    assert "stopped after 230 s" in record["reason"]
    assert "(stopped after 640 rows)" in epoch.table([record])
    failed = epoch.record_from_log("vlmtune", "exit 1", ["Traceback ...", "OutOfMemoryError"])
    assert failed["status"] == "error" and "OutOfMemoryError" in failed["reason"] and "| error" in epoch.table([failed])
