"""benchmarks/train_step/checkpoints.py: the real-size builders give the released parameter counts."""

import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def checkpoints(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))  # benchmarks is not installed: it imports from the repository root
    return importlib.import_module("benchmarks.train_step.checkpoints")


@pytest.mark.parametrize(("name", "billions"), [("minicpmv2_6-8b", 8.10), ("minicpmv4_6-1.3b", 1.30)])
def test_real_size_specs_build_the_released_parameter_count(tmp_path, checkpoints, name, billions):
    torch = pytest.importorskip("torch")
    from vlmtune.tiny import build

    spec = checkpoints.MODELS[name]  # specs.MODELS, as the builders see it
    model_class, config, _ = checkpoints.REAL_BUILDERS[spec.family](spec, build(spec.family, tmp_path / "tiny"))
    with torch.device("meta"):
        model = model_class._from_config(config, dtype=torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, abs=0.01)
