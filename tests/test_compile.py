"""Compiled layers (vlmtune.compile) on the tiny Qwen2.5-VL with its kernels: one graph for every layer, no graph
break, no recompile for a new sequence length, the eager loss and LoRA gradients, and the fallback warnings.

The counting backend runs ``aot_eager`` (no code generation) and counts the graphs dynamo hands it; the kernels run
in Triton's interpreter on the CPU, as in tests/kernels.
"""

import dataclasses
import logging
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402
from transformers import set_seed  # noqa: E402

import vlmtune  # noqa: E402
from vlmtune import compile as compile_module  # noqa: E402
from vlmtune.compile import compile_layers  # noqa: E402
from vlmtune.data.collator import Collator  # noqa: E402
from vlmtune.data.latex_ocr import make_latex_ocr  # noqa: E402
from vlmtune.data.spec import DataSpec, load_rows  # noqa: E402
from vlmtune.kernels.patch import apply_kernels  # noqa: E402
from vlmtune.testing import init_lora_b  # noqa: E402
from vlmtune.train import TrainConfig  # noqa: E402

LANGUAGE_OPS = ("rms_norm", "rope", "mlp", "lora_linear")


@pytest.fixture(scope="module")
def qwen(tiny_qwen, tmp_path_factory):
    """The tiny Qwen2.5-VL with language LoRA (checkpointing on) and its language kernels; two batches of different
    lengths."""
    out = tmp_path_factory.mktemp("latex_ocr_compile")
    make_latex_ocr(4, out, seed=0)
    rows = load_rows(DataSpec(source_type="parquet", path=str(out)), "train")
    set_seed(0)
    model, processor, family = vlmtune.load(tiny_qwen, quant="none", dtype="float32")
    model = vlmtune.apply_tuning(model, family, vlmtune.TuningConfig(vision="frozen", language="lora"))
    init_lora_b(model, std=0.05, seed_per_matrix=True)
    collator = Collator(family, processor, model.config, image_options={"max_pixels": 56 * 56})
    batches = [collator([{"index": i, "row": rows[i]} for i in indices]) for indices in ((0,), (1, 2))]
    assert batches[0]["input_ids"].shape[1] != batches[1]["input_ids"].shape[1]
    return model.train(), family, batches


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.slow  # about 4 minutes in the interpreter on 2 cores
def test_compiled_layers_match_eager_without_graph_breaks(qwen):
    model, family, batches = qwen
    patch = apply_kernels(model, family, LANGUAGE_OPS)
    try:
        want = [_loss_and_grads(model, b) for b in batches]
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        counter = CompileCounterWithBackend("aot_eager")
        compiled = compile_layers(model, family, "language", backend=counter)
        try:
            got = [_loss_and_grads(model, b) for b in batches]
            assert compiled.layers == {"language": [f"model.language_model.layers.{i}" for i in range(2)]}
            assert not torch._dynamo.utils.counters["graph_break"]
            frames = counter.frame_count
            for (loss, grads), (want_loss, want_grads) in zip(got, want, strict=True):
                torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=0)
                assert grads.keys() == want_grads.keys() and any("lora_A" in n for n in grads)
                for name, grad in grads.items():
                    torch.testing.assert_close(grad, want_grads[name], rtol=1e-5, atol=1e-7, msg=name)
            # Evaluation runs the eager layers: no new graph.
            with torch.no_grad():
                model.eval()
                model(**batches[0])
                model.train()
            assert counter.frame_count == frames
        finally:
            compiled.revert()
    finally:
        patch.revert()
    assert all(m._compiled_call_impl is None for m in model.modules())


def test_a_family_without_layers_warns_once_and_stays_eager(qwen, caplog):
    model, family, _ = qwen
    bare = dataclasses.replace(family, layers={"language": family.layers["language"]})
    with caplog.at_level(logging.WARNING, logger="vlmtune.compile"):
        compiled = compile_layers(model, bare, "both", backend="eager")
    compiled.revert()
    assert list(compiled.skipped) == ["vision"] and "no layers entry" in compiled.skipped["vision"]
    assert len(compiled.layers["language"]) == 2
    assert [r.getMessage() for r in caplog.records] == [
        f"compile='both': the vision tower stays eager: {compiled.skipped['vision']}"
    ]


def test_an_old_torch_warns_once_and_compiles_nothing(qwen, caplog, monkeypatch):
    model, family, _ = qwen
    monkeypatch.setattr(compile_module, "MIN_TORCH", compile_module.Version("99.0"))
    with caplog.at_level(logging.WARNING, logger="vlmtune.compile"):
        compiled = compile_layers(model, family, "language", backend="eager")
    assert not compiled.layers and list(compiled.skipped) == ["language"]
    assert len(caplog.records) == 1 and "older than 99.0" in caplog.records[0].getMessage()
    assert all(m._compiled_call_impl is None for m in model.modules())


def test_compile_setting_is_checked():
    assert TrainConfig(max_steps=1).compile is None
    with pytest.raises(ValueError, match="compile must be None or one of"):
        TrainConfig(max_steps=1, compile="decoder")
    with pytest.raises(ValueError, match="compile must be one of"):
        compile_layers(torch.nn.Linear(1, 1), None, "all")
