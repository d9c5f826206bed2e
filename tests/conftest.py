"""Shared fixtures: tiny checkpoints of every family, built once per test session (offline, a few seconds)."""

import os
import tempfile

import torch

# Triton reads TRITON_INTERPRET when it is first imported, and collecting any test that imports transformers' models
# imports it: set it here, before anything else, so CPU runs interpret the kernels (the Makefile sets it too).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# matplotlib renders the LaTeX-OCR images from the fonts its cache lists; a cache left by another install (a removed
# virtual environment's font paths) silently falls back to other fonts and other pixels. A session's own cache
# (built in a second or two) keeps the committed losses reproducible; each pytest-xdist worker gets its own.
os.environ.setdefault("MPLCONFIGDIR", tempfile.mkdtemp(prefix="vlmtune-mpl-"))

import pytest  # noqa: E402

from vlmtune.tiny import build  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """``tiny_checkpoint(family)``: the folder of that family's tiny checkpoint, built on first use in the session."""
    folders = {}

    def folder(family: str):
        if family not in folders:
            folders[family] = build(family, tmp_path_factory.mktemp(f"tiny_{family}"))
        return folders[family]

    return folder


@pytest.fixture(scope="session")
def tiny_qwen(tiny_checkpoint):
    """Folder of the tiny Qwen2.5-VL checkpoint (2 text layers, 2 vision blocks, 56-224 px images)."""
    return tiny_checkpoint("qwen2_5_vl")


@pytest.fixture(scope="session")
def tiny_qwen2_vl(tiny_checkpoint):
    return tiny_checkpoint("qwen2_vl")


@pytest.fixture(scope="session")
def tiny_qwen3_vl(tiny_checkpoint):
    return tiny_checkpoint("qwen3_vl")


@pytest.fixture(scope="session")
def tiny_minicpmv(tiny_checkpoint):
    return tiny_checkpoint("minicpmv")


@pytest.fixture(scope="session")
def tiny_minicpmv4_6(tiny_checkpoint):
    return tiny_checkpoint("minicpmv4_6")


@pytest.fixture(scope="session")
def tiny_gemma(tiny_checkpoint):
    """Folder of the tiny Gemma-3 checkpoint (2 text layers, 2 SigLIP layers, 64 px, 16 soft tokens)."""
    return tiny_checkpoint("gemma3")


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


@pytest.fixture(scope="session")
def parse_report():
    """``parse_report(html)``: the values, predictions and images of a ``report.html`` (see vlmtune/report.py)."""
    import json
    from html.parser import HTMLParser
    from types import SimpleNamespace

    class Reader(HTMLParser):
        def __init__(self):
            super().__init__()
            self.values, self.predictions, self.sources, self._code = {}, [], [], None

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if "src" in attrs or "href" in attrs:
                self.sources.append((tag, attrs.get("class"), attrs.get("src") or attrs.get("href")))
            if tag == "td" and "data-key" in attrs:
                self.values[(attrs["data-key"], attrs.get("data-step"))] = json.loads(attrs["data-value"])
            if tag == "td" and "prediction" in (attrs.get("class") or "") and "data-step" in attrs:
                self.predictions.append({"step": int(attrs["data-step"]), "index": int(attrs["data-index"])})
                self.predictions[-1]["cer"] = json.loads(attrs["data-cer"])
            if tag == "code" and self.predictions and "text" not in self.predictions[-1]:
                self._code = []

        def handle_data(self, data):
            if self._code is not None:
                self._code.append(data)

        def handle_endtag(self, tag):
            if tag == "code" and self._code is not None:
                self.predictions[-1]["text"] = "".join(self._code)
                self._code = None

    def parse(html: str):
        reader = Reader()
        reader.feed(html)
        return SimpleNamespace(values=reader.values, predictions=reader.predictions, sources=reader.sources)

    return parse


@pytest.fixture(scope="session")
def random_export(tiny_checkpoint, tmp_path_factory):
    """``random_export(family)``: ``(export_folder, base_folder)`` of an adapter with random LoRA B (no training)
    on that family's tiny checkpoint, exported once per test session."""
    import vlmtune
    from vlmtune.testing import init_lora_b

    exports = {}

    def export(family: str):
        if family not in exports:
            base = tiny_checkpoint(family)
            model, processor, descriptor = vlmtune.load(base)
            model = vlmtune.apply_tuning(model, descriptor, vlmtune.TuningConfig(vision="lora", language="lora"))
            init_lora_b(model, std=0.05)
            out = vlmtune.export(model, processor, tmp_path_factory.mktemp(f"export_{family}"))
            exports[family] = (out, base)
        return exports[family]

    return export
