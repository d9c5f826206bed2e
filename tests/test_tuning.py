"""Tuning controls: flag vocabularies, validation, LoRA dtype, activation offload; on every tiny family, every
combination of tower modes and a frozen vision tower that records no autograd graph."""

import copy
import itertools
import re

import pytest
import torch
from transformers.modeling_layers import GradientCheckpointingLayer

import vlmtune
from vlmtune.data.collator import Collator
from vlmtune.testing import collate, init_lora_b, noise, single
from vlmtune.tiny import BUILDERS
from vlmtune.train import TrainConfig, make_optimizer
from vlmtune.tuning import TuningConfig, apply_tuning, lora_target_names, original_name

FAMILIES = sorted(BUILDERS)


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    """``loaded(family)``: a fresh copy of the family's tiny model, its adapter and a fresh two-image batch."""
    cache = {}

    def get(family: str):
        if family not in cache:
            model, processor, adapter = vlmtune.load(tiny_checkpoint(family))
            cache[family] = model, adapter, Collator(adapter, processor, model.config)
        model, adapter, collator = cache[family]
        return copy.deepcopy(model), adapter, image_batch(collator)

    return get


def image_batch(collator) -> dict:
    """Two samples of different lengths, one image each: every tower runs, and the batch is padded."""
    return collate(
        collator,
        (single("Read this.", r"\frac{1}{2}"), [noise((64, 48), 0)]),
        (single("And this one, please.", r"x^{2} + y"), [noise((48, 80), 1)]),
    )


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({}, dict(vision="lora", language="lora", attention=True, mlp=True)),
        (dict(finetune_vision_layers=False), dict(vision="frozen", language="lora", attention=True, mlp=True)),
        (dict(finetune_language_layers=False), dict(vision="lora", language="frozen", attention=True, mlp=True)),
        (dict(finetune_mlp_modules=False), dict(vision="lora", language="lora", attention=True, mlp=False)),
        (dict(finetune_attention_modules=False), dict(vision="lora", language="lora", attention=False, mlp=True)),
    ],
)
def test_unsloth_flags_map_onto_tower_modes(flags, expected):
    config = TuningConfig.from_unsloth(**flags, r=8, lora_alpha=32, lora_dropout=0.05)
    assert {k: getattr(config, k) for k in expected} == expected
    assert (config.r, config.alpha, config.dropout, config.projector) == (8, 32, 0.05, "frozen")


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (dict(tune_vision=True, use_lora=True), dict(vision="full", projector="full", language="lora")),
        (dict(tune_vision=False, use_lora=True), dict(vision="frozen", projector="full", language="lora")),
    ],
)
def test_minicpmv_flags_map_onto_tower_modes(flags, expected):
    config = TuningConfig.from_minicpmv(**flags)
    assert {k: getattr(config, k) for k in expected} == expected


def test_minicpmv_full_finetuning_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="use_lora=True"):
        TuningConfig.from_minicpmv(use_lora=False, tune_llm=True)


def test_both_vocabularies_select_the_same_modules(tiny_qwen):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen)
    adapter = vlmtune.detect(model.config)
    unsloth = TuningConfig.from_unsloth(finetune_vision_layers=False)
    native = TuningConfig(vision="frozen", language="lora")
    assert lora_target_names(model, adapter, unsloth) == lora_target_names(model, adapter, native)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(vision="half"), "vision must be one of"),
        (dict(r=0), "r must be >= 1"),
        (dict(dropout=1.0), "dropout must be in"),
        (dict(attention=False, mlp=False), "attention and mlp are both off"),
        (dict(last_n_layers=0), "last_n_layers"),
        (dict(lora_dtype="int4"), "lora_dtype"),
        (dict(vision_lr=-1.0), "vision_lr must be positive"),
        (dict(vision_micro_batch=0), "vision_micro_batch must be >= 1"),
    ],
)
def test_bad_settings_raise_naming_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TuningConfig(**kwargs)


def test_embeddings_stay_on_the_gpu_without_one(tiny_qwen):
    model, _, adapter = vlmtune.load(tiny_qwen)
    model = apply_tuning(model, adapter, TuningConfig())
    assert not vlmtune.tuning.keep_embeddings_on_cpu(model)  # nothing to move off: no GPU here
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


def test_lora_dtype_compute_keeps_adapters_in_the_model_dtype(tiny_qwen):
    model, _, adapter = vlmtune.load(tiny_qwen, dtype="bfloat16")
    model = apply_tuning(model, adapter, TuningConfig(lora_dtype="compute"))
    dtypes = {p.dtype for n, p in model.named_parameters() if ".lora_" in n}
    assert dtypes == {torch.bfloat16}
    model32, _, adapter = vlmtune.load(tiny_qwen, dtype="bfloat16")
    model32 = apply_tuning(model32, adapter, TuningConfig())
    assert {p.dtype for n, p in model32.named_parameters() if ".lora_" in n} == {torch.float32}


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
        model, processor, adapter = vlmtune.load(tiny_gemma)
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

MODE_COMBINATIONS = [modes for modes in itertools.product(("frozen", "lora", "full"), repeat=3) if "lora" in modes]


def tagged_linears(model: torch.nn.Module, adapter, tower: str) -> set[str]:
    """The linears the adapter tags as LoRA targets of ``tower`` (attention and MLP, or the projector pattern)."""
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if tower == "projector":
        pattern = adapter.lora_targets.projector
        return {n for n in linears if pattern and re.fullmatch(pattern, n)}
    return {n for kind in ("attention", "mlp") for n in adapter.lora_module_names(linears, tower, kind)}


@pytest.mark.parametrize(("vision", "projector", "language"), MODE_COMBINATIONS)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_tower_mode_combination(family, vision, projector, language, loaded):
    model, adapter, batch = loaded(family)
    modes = dict(vision=vision, projector=projector, language=language)
    # Checkpointing changes no parameter set and costs a second forward: off here.
    config = TuningConfig(**modes, gradient_checkpointing=False)
    expected_lora = set().union(*(tagged_linears(model, adapter, t) for t, mode in modes.items() if mode == "lora"))
    # A tied lm_head (Gemma-3) is listed once, under the embedding: "full" trains one copy of the tied matrix.
    base_params = [n for n, _ in model.named_parameters()]
    assert all(adapter.tower_of(n) for n in base_params)  # every parameter has a tower: the sets below are complete
    nested = any(p.startswith(v + ".") for p in adapter.towers["projector"] for v in adapter.towers["vision"])
    if not expected_lora:  # Gemma-3's projector is a bare weight matrix: "lora" there alone gives no adapter
        with pytest.raises(ValueError, match="nothing to train|no tower is set to 'lora'"):
            apply_tuning(model, adapter, config)
        return
    if nested and vision == "full" and projector == "lora":
        # Qwen-VL's merger and MiniCPM-V 4.6's vit_merger sit inside the vision module, which "full" copies whole
        # (modules_to_save): PEFT would skip their LoRA and train them in full.
        with pytest.raises(ValueError, match="projector set to 'lora', but its LoRA targets .* trains in full"):
            apply_tuning(model, adapter, config)
        return
    tuned = apply_tuning(model, adapter, config).train()

    trainable = {n: p for n, p in tuned.named_parameters() if p.requires_grad}
    lora = {n for n, _ in tuned.named_parameters() if ".lora_" in n}
    assert lora == {f"base_model.model.{m}.lora_{ab}.default.weight" for m in expected_lora for ab in "AB"}
    assert lora <= trainable.keys()
    full = sorted(original_name(n) for n in trainable if n not in lora)  # a list: a second trained copy would show
    assert full == sorted(n for n in base_params if modes[adapter.tower_of(n)] == "full")

    optimizer = make_optimizer(tuned, adapter, config, TrainConfig(lr=1e-3))
    frozen = {n: p.detach().clone() for n, p in tuned.named_parameters() if not p.requires_grad}
    tuned(**batch).loss.backward()
    optimizer.step()
    # Every trainable parameter gets a gradient from an image + text batch (lora_A's is all zero on this first
    # step, as lora_B starts at zero, but it exists), so AdamW holds state for each one of them and nothing else.
    assert {n for n, p in trainable.items() if p.grad is not None} == trainable.keys()
    in_state = {id(p) for p in optimizer.state}
    assert {n for n, p in trainable.items() if id(p) in in_state} == trainable.keys()
    assert len(in_state) == len(trainable)
    for name, param in tuned.named_parameters():
        if not param.requires_grad:
            assert param.grad is None and torch.equal(param, frozen[name]), name


# --- a frozen vision tower runs without autograd ----------------------------------------------------------


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


def test_int8_loading_quantises_the_language_linears_only(tiny_qwen):
    import bitsandbytes as bnb

    model, _, adapter = vlmtune.load(tiny_qwen, quant="int8")
    eight_bit = {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear8bitLt)}
    assert eight_bit and all(adapter.tower_of(n) == "language" and "layers." in n for n in eight_bit)
    assert not isinstance(model.lm_head, bnb.nn.Linear8bitLt)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "gemma3"])
def test_vision_checkpointing_can_be_switched_off_alone(family, tiny_qwen, tiny_gemma, latex_data):
    path = {"qwen2_5_vl": tiny_qwen, "gemma3": tiny_gemma}[family]
    results = []
    for vision_checkpointing in (True, False):
        model, processor, adapter = vlmtune.load(path)
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


@pytest.mark.parametrize(
    ("towers", "tied"),
    [
        (dict(language="full"), True),  # the tower's copy holds the embedding; lm_head gets its own copy
        (dict(language="lora", modules_to_save=["lm_head", "embed_tokens"]), True),  # PEFT's suffix names
        (dict(language="lora", modules_to_save=["lm_head"]), False),  # only the head trains: untied, with a warning
    ],
    ids=["language-full", "both-in-modules-to-save", "head-only"],
)
def test_tied_lm_head_trains_as_one_matrix_with_the_embedding(loaded, towers, tied, caplog):
    model, adapter, batch = loaded("gemma3")
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # Gemma-3 ties them
    config = TuningConfig(vision="lora", gradient_checkpointing=False, **towers)
    with caplog.at_level("WARNING", logger="vlmtune.tuning"):
        tuned = apply_tuning(model, adapter, config)
    modules = dict(tuned.named_modules())
    head = modules["base_model.model.lm_head.modules_to_save.default"]
    # the trained embedding: inside the language tower's copy, or its own copy (PEFT's two layouts)
    embedding = modules.get(
        "base_model.model.model.language_model.modules_to_save.default.embed_tokens"
    ) or modules.get("base_model.model.model.language_model.embed_tokens.modules_to_save.default")
    assert (embedding is not None and head.weight is embedding.weight) == tied
    assert ("come out untied" in caplog.text) == (not tied)
    if tied:  # one parameter, trained by both uses: the optimizer holds it once
        optimizer = make_optimizer(tuned, adapter, config, TrainConfig(lr=1e-3))
        before = head.weight.detach().clone()
        tuned(**batch).loss.backward()
        optimizer.step()
        assert sum(p is head.weight for group in optimizer.param_groups for p in group["params"]) == 1
        assert not torch.equal(head.weight, before) and head.weight is embedding.weight
