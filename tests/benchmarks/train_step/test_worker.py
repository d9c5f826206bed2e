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
