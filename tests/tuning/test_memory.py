"""Memory options: CPU-resident embeddings, activation offload, vision micro-batches, a frozen vision tower that
records no autograd graph, vision checkpointing on or off; each gives the plain path's numbers."""

import copy
import io

import pytest
import torch
from transformers.modeling_layers import GradientCheckpointingLayer

import vlmtune
from vlmtune.data.collator import Collator
from vlmtune.testing import collate, init_lora_b, noise, single
from vlmtune.tiny import BUILDERS
from vlmtune.tuning import TuningConfig, apply_tuning, original_name

FAMILIES = sorted(BUILDERS)


def test_embeddings_stay_where_they_are_on_the_cpu(tiny_qwen):
    model, _, adapter = vlmtune.load(tiny_qwen, device="cpu")
    model = apply_tuning(model, adapter, TuningConfig())
    assert not vlmtune.tuning.keep_embeddings_on_cpu(model)  # nothing to move off: the model is on the CPU
    assert "_vlmtune_cpu_embedding" not in model.get_input_embeddings().__dict__


@pytest.mark.gpu
def test_embeddings_on_cpu_same_numbers_generate_and_trainer(tiny_qwen, tiny_gemma, latex_data, tmp_path):
    rows = vlmtune.load_rows("latex_ocr", split="train", path=latex_data)

    def step(embeddings_on_cpu):
        model, processor, adapter = vlmtune.load(tiny_qwen, device="cuda")
        model = apply_tuning(model, adapter, TuningConfig(embeddings_on_cpu=embeddings_on_cpu)).train()
        batch = Collator(adapter, processor, model.config)([{"index": i, "row": rows[i]} for i in range(2)])
        loss = model(**{k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}).loss
        loss.backward()
        return (
            model,
            processor,
            adapter,
            loss.detach(),
            {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
        )

    model, processor, adapter, loss, grads = step(True)
    _, _, _, plain_loss, plain_grads = step(False)
    assert model.get_input_embeddings().weight.device.type == "cpu"
    assert model.get_output_embeddings().weight.device.type == "cuda" and model.device.type == "cuda"
    torch.testing.assert_close(loss, plain_loss, rtol=0, atol=0)
    assert grads.keys() == plain_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], rtol=0, atol=0, msg=name)
    # generation reads the embedding every step
    inputs = processor.tokenizer(["x^{2} +"], return_tensors="pt").to("cuda")
    out = model.eval().generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 3)
    # Trainer moves an unquantised model to the GPU as a whole; train() moves the embedding back off it.
    result = vlmtune.train(
        model.train(),
        processor,
        adapter,
        rows[:4],
        vlmtune.TrainConfig(max_steps=2, batch_size=2, output_dir=str(tmp_path)),
    )
    assert result.model.get_input_embeddings().weight.device.type == "cpu" and result.kept_rows == 4
    # Gemma-3 ties lm_head to the embedding: it stays on the GPU.
    gemma, _, gemma_adapter = vlmtune.load(tiny_gemma, device="cuda")
    gemma = apply_tuning(gemma, gemma_adapter, TuningConfig())
    assert gemma.get_input_embeddings().weight.device.type == "cuda"


@pytest.mark.parametrize("family", FAMILIES)
def test_activation_offload_gives_the_same_loss_and_gradients(family, loaded, monkeypatch):
    packed = []  # tensors that went through save_on_cpu, so the offloaded run is known to have offloaded

    class CountingSaveOnCpu(torch.autograd.graph.save_on_cpu):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            pack = self.pack_hook
            self.pack_hook = lambda tensor: packed.append(tensor.shape) or pack(tensor)

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", CountingSaveOnCpu)
    results, packed_per_run = [], []
    for offload in (False, True):
        model, adapter, batch = loaded(family)
        tuned = apply_tuning(model, adapter, TuningConfig(offload_activations=offload)).train()
        init_lora_b(tuned)
        loss = tuned(**batch).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in tuned.named_parameters() if p.requires_grad}))
        packed_per_run.append(len(packed))
    assert packed_per_run[0] == 0 and packed_per_run[1] > 0
    # Exact: offloading copies the saved tensors to CPU memory and back; the same ops run on the same values.
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
    assert results[1][1].keys() == results[0][1].keys()
    for name, grad in results[0][1].items():
        assert grad is not None, name
        torch.testing.assert_close(results[1][1][name], grad, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("vision", ["lora", "frozen"])
def test_vision_micro_batch_gives_the_same_loss_and_gradients(vision, tiny_gemma):
    def run(micro_batch):
        model, processor, adapter = vlmtune.load(tiny_gemma, device="cpu")
        model = apply_tuning(model, adapter, TuningConfig(vision=vision, vision_micro_batch=micro_batch)).train()
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".lora_B." in name:
                    param.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(name)))
        calls = []
        tower = model.get_base_model().get_submodule(adapter.towers["vision"][0])
        tower.embeddings.register_forward_hook(lambda m, args, out: calls.append(out.shape[0]))
        collator = Collator(adapter, processor, model.config)
        rows = [(single(f"Q{i}", f"a_{i}"), [noise((40 + 8 * i, 64), i)]) for i in range(3)]
        loss = model(**collate(collator, *rows)).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, calls

    loss, grads, calls = run(None)
    chunked_loss, chunked_grads, chunked_calls = run(2)
    assert calls == [3] and chunked_calls == [2, 1]  # three images: one pass, then passes of two and one
    torch.testing.assert_close(chunked_loss, loss, rtol=1e-6, atol=0)
    assert chunked_grads.keys() == grads.keys() and any(".vision_tower." in n for n in grads) == (vision == "lora")
    for name, grad in grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-5, atol=1e-8, msg=name)


# --- every combination of tower modes: LoRA modules, trainable parameters and optimizer state agree -----------


def tensors_in(value):
    """Every tensor in a module output (tensors, tuples, dicts and ModelOutputs, nested)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from tensors_in(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from tensors_in(v)


@pytest.mark.parametrize(("vision", "projector"), [("frozen", "frozen"), ("frozen", "full"), ("lora", "frozen")])
@pytest.mark.parametrize("family", FAMILIES)
def test_frozen_vision_tower_records_no_autograd_graph(family, vision, projector, loaded):
    model, adapter, batch = loaded(family)
    modes = dict(vision=vision, projector=projector, language="lora")
    tuned = apply_tuning(model, adapter, TuningConfig(**modes)).train()  # checkpointing on, as in training
    init_lora_b(tuned)
    calls = []  # (module, whether its output is part of an autograd graph), in the order the forwards finish
    for name, module in tuned.get_base_model().named_modules():
        if adapter.tower_of(name) in ("vision", "projector"):
            module.register_forward_hook(
                lambda _m, _args, out, name=name: calls.append(
                    (name, any(t.requires_grad or t.grad_fn is not None for t in tensors_in(out)))
                )
            )
    loss = tuned(**batch).loss
    # Both towers ran (Qwen3-VL's adapter names three deepstack mergers; the tiny model has one).
    towers = {n for n, _ in model.named_modules()} & {*adapter.towers["vision"], *adapter.towers["projector"]}
    assert towers and {n for n, _ in calls} >= towers
    first_projector = next(i for i, (n, _) in enumerate(calls) if adapter.tower_of(n) == "projector")
    before_projector = [n for n, graph in calls[:first_projector] if graph]
    if vision == "lora":  # the hooks see the graph when the tower trains: the checks below are not vacuous
        assert before_projector
    elif projector == "frozen":
        assert [n for n, graph in calls if graph] == []
    else:  # a trained projector: the frozen blocks before it record nothing (MiniCPM-V 4.6's vit_merger sits
        # between vision layers, so the layers after it must carry its gradient back)
        assert before_projector == []
    loss.backward()
    for name, param in tuned.named_parameters():
        assert (param.grad is not None) == param.requires_grad, name
        if ".lora_" in name:
            assert param.grad.abs().sum() > 0, name
    trained = {
        adapter.tower_of(original_name(n.split(".lora_")[0])) for n, p in tuned.named_parameters() if p.requires_grad
    }
    assert trained == {t for t, mode in modes.items() if mode != "frozen"}


@pytest.mark.parametrize("family", ["qwen2_5_vl", "gemma3"])
def test_vision_checkpointing_can_be_switched_off_alone(family, tiny_qwen, tiny_gemma, latex_data):
    path = {"qwen2_5_vl": tiny_qwen, "gemma3": tiny_gemma}[family]
    results = []
    for vision_checkpointing in (True, False):
        model, processor, adapter = vlmtune.load(path, device="cpu")
        config = TuningConfig(vision_checkpointing=vision_checkpointing)
        tuned = apply_tuning(model, adapter, config)
        flags: dict[str, set[bool]] = {}
        for name, module in model.named_modules():
            if isinstance(module, GradientCheckpointingLayer):
                flags.setdefault(adapter.tower_of(name), set()).add(module.gradient_checkpointing)
        assert flags == {"vision": {vision_checkpointing}, "language": {True}}
        rows = vlmtune.load_rows("latex_ocr", split="train", path=latex_data)
        batch = Collator(adapter, processor, model.config)([{"index": 0, "row": rows[0]}])
        tuned.train()
        loss = tuned(**batch).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in tuned.named_parameters() if p.requires_grad}))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-6, atol=1e-7, msg=name)


# --- a tied lm_head stays tied -----------------------------------------------------------------------------


def test_memory_swaps_copy_pickle_and_undo_with_the_model(tiny_gemma):
    from vlmtune.patching import restore, swap_of, swapped_modules
    from vlmtune.tuning.memory import MICRO_BATCH, NO_GRAD, OFFLOAD

    model, processor, family = vlmtune.load(tiny_gemma, device="cpu")
    plain_forwards = {n: m.__dict__.get("forward") for n, m in model.named_modules()}
    config = TuningConfig(vision="frozen", vision_micro_batch=1, offload_activations=True)
    model = apply_tuning(model, family, config).train()
    tower = model.get_base_model().get_submodule(family.towers["vision"][0])
    assert swapped_modules(model, OFFLOAD) == [""]
    assert swap_of(tower, MICRO_BATCH).data == 1 and swap_of(tower, NO_GRAD) is not None
    batch = collate(
        Collator(family, processor, model.config),
        (single("Q", "a"), [noise((40, 64), 0)]),
        (single("Q2", "b"), [noise((64, 48), 1)]),
    )
    loss = model(**batch).loss

    clone = copy.deepcopy(model)
    clone_tower = clone.get_base_model().get_submodule(family.towers["vision"][0])
    assert clone_tower.forward.module is clone_tower and swap_of(clone_tower, NO_GRAD).inner.module is clone_tower
    assert torch.equal(clone(**batch).loss, loss)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer, weights_only=False)(**batch).loss, loss)

    for key, module in ((OFFLOAD, model), (NO_GRAD, tower), (MICRO_BATCH, tower)):  # newest first
        restore(module, key)
    assert swap_of(clone_tower, NO_GRAD) is not None  # the copy keeps its own
    base = model.get_base_model()
    assert all(m.__dict__.get("forward") is plain_forwards[n] for n, m in base.named_modules() if n in plain_forwards)
