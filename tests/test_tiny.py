"""Every tiny checkpoint builds offline, loads with the classes a user would use, and runs a training forward.

Run: `.venv/bin/python -m pytest tests/test_tiny.py -q`
"""

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from vlmtune.data.collator import Collator
from vlmtune.families import detect
from vlmtune.loading import read_config
from vlmtune.tiny import BUILDERS, build

# family -> (model class name, processor class name); MiniCPM-V 2.6's layout loads through vlmtune's own classes.
EXPECTED = {
    "qwen2_vl": ("Qwen2VLForConditionalGeneration", "Qwen2VLProcessor"),
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor"),
    "qwen3_vl": ("Qwen3VLForConditionalGeneration", "Qwen3VLProcessor"),
    "gemma3": ("Gemma3ForConditionalGeneration", "Gemma3Processor"),
    "minicpmv4_6": ("MiniCPMV4_6ForConditionalGeneration", "MiniCPMV4_6Processor"),
    "minicpmv": ("MiniCPMV", "MiniCPMVProcessor"),
}


def test_every_builder_is_covered():
    assert set(BUILDERS) == set(EXPECTED)


def test_unknown_family_names_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match="unknown tiny family 'llava'.*qwen3_vl"):
        build("llava", tmp_path)


def load(path):
    adapter = detect(read_config(path))  # as vlmtune.load does: no Auto class before the family is known
    if adapter.load_model is not None:
        return adapter.load_model(path), adapter.load_processor(path), adapter
    return AutoModelForImageTextToText.from_pretrained(path), AutoProcessor.from_pretrained(path), adapter


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_folder_loads_and_runs_a_forward(family, tmp_path):
    folder = build(family, tmp_path / family)
    model, processor, adapter = load(folder)
    assert (type(model).__name__, type(processor).__name__) == EXPECTED[family]
    assert family in adapter.model_types or adapter.name == family
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (40, 90, 3), dtype=np.uint8))
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Write the LaTeX."}]},
        {"role": "assistant", "content": [{"type": "text", "text": r"\frac{a}{b}"}]},
    ]
    batch = Collator(adapter, processor, model.config)([{"index": 0, "row": {"messages": messages, "images": [image]}}])
    model.train()
    out = model(**batch)
    assert torch.isfinite(out.loss) and out.loss > 0
    assert out.logits.shape[:2] == batch["input_ids"].shape
    out.loss.backward()
    assert model.get_output_embeddings().weight.grad.abs().sum() > 0


def test_builds_are_deterministic(tmp_path):
    digests = []
    for run in ("a", "b"):
        folder = build("qwen3_vl", tmp_path / run, seed=3)
        digests.append(hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest())
    assert digests[0] == digests[1]
