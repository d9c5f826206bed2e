"""benchmarks/train_step/worker.py: a packed configuration reports why it cannot run on the fixed shape."""

import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def worker(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))  # benchmarks is not installed: it imports from the repository root
    return importlib.import_module("benchmarks.train_step.worker")


def test_packed_config_is_not_available_on_the_fixed_shape(tmp_path, worker):
    torch = pytest.importorskip("torch")
    path = tmp_path / "steps.pt"
    torch.save({"batches": [{"input_ids": torch.ones(2, 3)}], "packed": None, "samples": [2], "images": [2]}, path)
    assert worker.Steps.load(path, packed=False).samples == [2]
    with pytest.raises(worker.NotAvailable, match="packing needs the real shape"):
        worker.Steps.load(path, packed=True)


def test_a_packed_config_trains_on_the_rows_its_model_attends_with(tmp_path, worker):
    torch = pytest.importorskip("torch")
    path = tmp_path / "steps.pt"
    rows = {"sdpa": [{"attention_mask": {"full_attention": torch.ones(1, 1, 3, 3)}}], "varlen": [{"cu": torch.ones(2)}]}
    torch.save({"batches": [{"input_ids": torch.ones(2, 3)}], "packed": rows, "samples": [2], "images": [2]}, path)
    steps = worker.Steps.load(path, packed=True)
    assert list(steps.batches[0]) == ["attention_mask"]  # the model's own SDPA rows unless asked otherwise
    assert list(steps.attending("varlen").batches[0]) == ["cu"] and steps.attending("varlen").samples == [2]
    assert worker.Steps.load(path, packed=False).attending("varlen").batches[0]["input_ids"].shape == (2, 3)
