"""Compiled layers (vlmtune.compile) on the tiny Qwen2.5-VL with its kernels: one graph for every layer, no graph
break, no recompile for a new sequence length, the eager loss and LoRA gradients, and the fallback warnings.

The counting backend runs ``aot_eager`` (no code generation) and counts the graphs dynamo hands it; the kernels run
in Triton's interpreter on the CPU, as in tests/kernels.
"""

import dataclasses
import logging
import os
import re

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
    make_latex_ocr(8, out, seed=0)
    rows = load_rows(DataSpec(source_type="parquet", path=str(out)), "train")
    set_seed(0)
    model, processor, family = vlmtune.load(tiny_qwen, quant="none", dtype="float32")
    model = vlmtune.apply_tuning(model, family, vlmtune.TuningConfig(vision="frozen", language="lora"))
    init_lora_b(model, std=0.05, seed_per_matrix=True)
    collator = Collator(family, processor, model.config, image_options={"max_pixels": 56 * 56})
    # Three batches of two samples, three lengths (a batch of one would be a graph of its own: dynamo specialises
    # sizes 0 and 1, and a training run's batch size is fixed).
    batches = [collator([{"index": i, "row": rows[i]} for i in indices]) for indices in ((0, 1), (2, 3), (4, 5))]
    assert len({b["input_ids"].shape[1] for b in batches}) == 3
    return model.train(), family, batches


def _graphs_per_step(model, family, towers: dict, batches) -> list[dict]:
    """Train-mode forwards (gradients on: the compiled graphs run) of ``batches``; after each, tower -> the graphs
    its counting backend has compiled so far (graphs holding no operation, which dynamo hands over for the
    checkpoint's wrapper, left out). ``towers``: mode -> tower name."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    counters = {tower: CompileCounterWithBackend("eager") for tower in towers.values()}
    compiled = [compile_layers(model, family, mode, backend=counters[tower]) for mode, tower in towers.items()]
    try:
        steps = []
        for batch in batches:
            model(**batch)
            steps.append({t: sum(_has_ops(g) for g in c.graphs) for t, c in counters.items()})
        assert not torch._dynamo.utils.counters["graph_break"]
        return steps
    finally:
        for c in compiled:
            c.revert()


def _has_ops(graph: torch.fx.GraphModule) -> bool:
    return any(node.op in ("call_function", "call_method", "call_module") for node in graph.graph.nodes)


def test_a_tower_compiles_once_for_all_its_layers_and_lengths(qwen):
    """Two decoder layers (the first with hidden states from frozen embeddings), three sequence lengths: one graph."""
    model, family, batches = qwen
    patch = apply_kernels(model, family, LANGUAGE_OPS)
    try:
        steps = _graphs_per_step(model, family, {"language": "language"}, batches)
    finally:
        patch.revert()
    assert steps == [{"language": 1}] * 3


@pytest.fixture(scope="module")
def gemma(tiny_gemma, tmp_path_factory):
    """The tiny Gemma-3 with LoRA on both towers and every kernel; three batches of two of different lengths."""
    out = tmp_path_factory.mktemp("latex_ocr_compile_gemma")
    make_latex_ocr(8, out, seed=0)
    rows = load_rows(DataSpec(source_type="parquet", path=str(out)), "train")
    set_seed(0)
    model, processor, family = vlmtune.load(tiny_gemma, quant="none", dtype="float32")
    model = vlmtune.apply_tuning(model, family, vlmtune.TuningConfig(vision="lora", language="lora"))
    init_lora_b(model, std=0.05, seed_per_matrix=True)
    collator = Collator(family, processor, model.config)
    batches = [collator([{"index": i, "row": rows[i]} for i in indices]) for indices in ((0, 1), (2, 3), (4, 5))]
    assert len({b["input_ids"].shape[1] for b in batches}) == 3
    patch = apply_kernels(model, family)
    yield model.train(), family, batches
    patch.revert()


@pytest.mark.slow  # about 65 s in the interpreter on 2 cores
def test_gemma_compiles_one_vision_graph_and_one_per_attention_kind(gemma):
    """SigLIP's layers share one graph; Gemma's decoder layers two, sliding-window and full attention (their masks
    differ in shape), whatever the sequence length."""
    model, family, batches = gemma
    steps = _graphs_per_step(model, family, {"vision": "vision", "language": "language"}, batches)
    assert steps == [{"vision": 1, "language": 2}] * 3


def test_a_compiled_vision_layer_with_kernels_has_no_graph_break(gemma):
    model, family, _ = gemma
    base = model.get_base_model()
    layer = next(m for n, m in base.named_modules() if re.fullmatch(family.layers["vision"], n))
    hidden = torch.randn(2, 16, model.config.vision_config.hidden_size, requires_grad=True)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(layer)(hidden, None)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    # The layer's body sits in the checkpoint's subgraph.
    subgraphs = [m for g in explained.graphs for m in g.modules() if isinstance(m, torch.fx.GraphModule)]
    ops = {str(n.target) for m in subgraphs for n in m.graph.nodes if n.op == "call_function"}
    assert {"vlmtune.layer_norm.default", "vlmtune.fc_mlp.default"} <= ops, ops


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
        want = [_loss_and_grads(model, b) for b in batches[:2]]
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        counter = CompileCounterWithBackend("aot_eager")
        compiled = compile_layers(model, family, "language", backend=counter)
        try:
            got = [_loss_and_grads(model, b) for b in batches[:2]]
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


def test_torch_compile_of_a_whole_patched_model_matches_eager(qwen):
    # What a user may do instead of TrainConfig.compile: the kernels trace as custom ops; transformers' own
    # data-dependent checks (placeholder counts, image grids) break the graph, which dynamo handles.
    model, family, batches = qwen
    patch = apply_kernels(model, family, LANGUAGE_OPS)
    try:
        want_loss, want_grads = _loss_and_grads(model, batches[0])
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager")
        model.zero_grad(set_to_none=True)
        loss = compiled(**batches[0]).loss
        loss.backward()
        loss, grads = loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    finally:
        patch.revert()
        torch._dynamo.reset()
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=0)
    assert grads.keys() == want_grads.keys() and any("lora_A" in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want_grads[name], rtol=1e-5, atol=1e-7, msg=name)


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


def test_train_with_compile_language_trains_and_evaluates(tiny_qwen, latex_data, tmp_path, monkeypatch):
    """``compile="language"`` through ``vlmtune.train`` (aot_eager: no code generation on the CPU): the steps run the
    compiled graph, evaluation and generation between them the eager layers (no graph of their own), and the model
    comes back uncompiled."""
    monkeypatch.setattr(compile_module, "BACKEND", "aot_eager")
    model, processor, family = vlmtune.load(tiny_qwen)
    model = vlmtune.apply_tuning(model, family, vlmtune.TuningConfig(vision="frozen"))
    rows = vlmtune.load_rows("latex_ocr", split="train", path=latex_data)
    held_out = list(vlmtune.load_rows("latex_ocr", split="test", path=latex_data))[:2]
    config = TrainConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        batch_size=2,
        logging_steps=1,
        compile="language",
        eval_rows=held_out,
        eval_steps=1,
        eval_samples=1,
        eval_max_new_tokens=3,
    )
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    result = vlmtune.train(model, processor, family, rows, config)
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    assert [e["step"] for e in result.evaluations] == [0, 1, 2]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert not torch._dynamo.utils.counters["graph_break"]
    assert all(m._compiled_call_impl is None for m in model.modules())


def _compiled_matches_eager(model, family, mode, batch, rtol=1e-5, atol=1e-7):
    """Loss and every trained gradient of ``batch``, compiled (aot_eager) against eager, with no graph break."""
    want_loss, want_grads = _loss_and_grads(model, batch)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = compile_layers(model, family, mode, backend="aot_eager")
    try:
        loss, grads = _loss_and_grads(model, batch)
    finally:
        compiled.revert()
    assert not torch._dynamo.utils.counters["graph_break"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=0)
    assert grads.keys() == want_grads.keys() and any("lora_A" in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want_grads[name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.slow  # about 3 minutes in the interpreter on 2 cores
def test_compiled_gemma_towers_match_eager_with_kernels_and_checkpointing(gemma):
    model, family, batches = gemma
    _compiled_matches_eager(model, family, "both", batches[0])


@pytest.mark.slow  # about 100 s in the interpreter on 2 cores
def test_compiled_qlora_matches_eager_on_a_packed_batch(tiny_qwen, tmp_path):
    from vlmtune.data.packing import PackedCollator

    make_latex_ocr(4, tmp_path, seed=1)
    rows = load_rows(DataSpec(source_type="parquet", path=str(tmp_path)), "train")
    set_seed(0)
    model, processor, family = vlmtune.load(tiny_qwen, quant="nf4", dtype="float32")
    model = vlmtune.apply_tuning(model, family, vlmtune.TuningConfig(vision="frozen", language="lora"))
    init_lora_b(model, std=0.05, seed_per_matrix=True)
    collator = Collator(family, processor, model.config, image_options={"max_pixels": 56 * 56})
    packed = PackedCollator(collator, attn_implementation=model.config._attn_implementation or "sdpa")
    batch = packed.pack([collator.encode(rows[i], i) for i in range(3)])
    patch = apply_kernels(model, family, LANGUAGE_OPS)
    try:
        _compiled_matches_eager(model.train(), family, "language", batch, rtol=1e-4, atol=1e-6)
    finally:
        patch.revert()
