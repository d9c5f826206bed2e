"""Shared fixtures: tiny checkpoints of every family, built once per test session (offline, a few seconds)."""

import os

import torch

# Triton reads TRITON_INTERPRET when it is first imported, and collecting any test that imports transformers' models
# imports it: set it here, before anything else, so CPU runs interpret the kernels (the Makefile sets it too).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from vlmtune.tiny import build  # noqa: E402


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory):
    """Folder of the tiny Qwen2.5-VL checkpoint (2 text layers, 2 vision blocks, 56-224 px images)."""
    return build("qwen2_5_vl", tmp_path_factory.mktemp("tiny_qwen2_5_vl"))


@pytest.fixture(scope="session")
def tiny_gemma(tmp_path_factory):
    """Folder of the tiny Gemma-3 checkpoint (2 text layers, 2 SigLIP layers, 64 px, 16 soft tokens)."""
    return build("gemma3", tmp_path_factory.mktemp("tiny_gemma3"))


@pytest.fixture(params=["qwen2_5_vl", "gemma3"])
def tiny_paths(request):
    """Each tiny checkpoint folder in turn, for tests that hold for every family."""
    return request.getfixturevalue({"qwen2_5_vl": "tiny_qwen", "gemma3": "tiny_gemma"}[request.param])


@pytest.fixture(scope="session")
def latex_data(tmp_path_factory):
    """Folder with train/test parquet of 24 generated LaTeX-OCR samples (seed 0)."""
    from vlmtune.data.latex_ocr import make_latex_ocr

    out = tmp_path_factory.mktemp("latex_ocr")
    make_latex_ocr(24, out, seed=0, test_fraction=0.25)
    return out
