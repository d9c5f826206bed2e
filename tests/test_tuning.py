"""Tuning controls: flag vocabularies, validation, LoRA dtype, activation offload."""

import copy

import pytest
import torch
from transformers.modeling_layers import GradientCheckpointingLayer

import vlmtune
from vlmtune.data.collator import Collator
from vlmtune.tuning import TuningConfig, apply_tuning, lora_target_names


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
    assert result.model.get_input_embeddings().weight.device.type == "cpu" and len(result.losses) == 2
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


def test_activation_offload_gives_the_same_loss_and_gradients(tiny_gemma, latex_data):
    model, processor, adapter = vlmtune.load(tiny_gemma)
    plain = apply_tuning(model, adapter, TuningConfig())
    with torch.no_grad():
        for name, param in plain.named_parameters():
            if ".lora_B." in name:
                param.normal_(0, 0.02)  # non-zero B so every LoRA factor gets a gradient
    offloaded = copy.deepcopy(plain)
    vlmtune.tuning.enable_activation_offload(offloaded)
    rows = vlmtune.load_rows("latex_ocr", split="train", path=latex_data)
    batch = Collator(adapter, processor, model.config)([{"index": i, "row": rows[i]} for i in range(2)])
    results = []
    for m in (plain, offloaded):
        m.train()
        loss = m(**batch).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    assert results[0][1].keys() == results[1][1].keys()
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("vision", ["lora", "frozen"])
def test_vision_micro_batch_gives_the_same_loss_and_gradients(vision, tiny_gemma):
    from vlmtune.testing import collate, noise, single

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

MODE_COMBINATIONS = [
    (v, p, lang)
    for v in ("frozen", "lora", "full")
    for p in ("frozen", "full")
    for lang in ("frozen", "lora", "full")
    if "lora" in (v, lang)  # without a LoRA tower there is no adapter to export (refused, tested elsewhere)
]


@pytest.mark.parametrize(("vision", "projector", "language"), MODE_COMBINATIONS)
@pytest.mark.parametrize("family", ["qwen2_5_vl", "gemma3"])
def test_every_tower_mode_combination(family, vision, projector, language, tiny_qwen, tiny_gemma):
    from transformers import AutoModelForImageTextToText

    from vlmtune.train import TrainConfig, make_optimizer
    from vlmtune.tuning import original_name

    path = {"qwen2_5_vl": tiny_qwen, "gemma3": tiny_gemma}[family]
    model = AutoModelForImageTextToText.from_pretrained(path)
    adapter = vlmtune.detect(model.config)
    config = TuningConfig(vision=vision, projector=projector, language=language, gradient_checkpointing=False)
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    targets = set(lora_target_names(model, adapter, config))
    tuned = apply_tuning(model, adapter, config)

    lora_modules = {original_name(n.split(".lora_A.")[0]) for n, _ in tuned.named_parameters() if ".lora_A." in n}
    expected_lora = {n for n in linears if getattr(config, adapter.tower_of(n) or "language") == "lora"}
    expected_lora &= targets
    assert lora_modules == expected_lora
    assert all(adapter.tower_of(n) in ("vision", "language") for n in lora_modules)  # projector: never by accident

    trainable = {n for n, p in tuned.named_parameters() if p.requires_grad}
    for name in trainable:
        tower = adapter.tower_of(original_name(name.split(".lora_")[0])) or "language"
        mode = getattr(config, tower)
        assert mode == ("lora" if ".lora_" in name else "full"), (name, tower, mode)
    for tower in ("vision", "projector", "language"):
        has = {n for n in trainable if (adapter.tower_of(original_name(n.split(".lora_")[0])) or "language") == tower}
        assert bool(has) == (
            getattr(config, tower) != "frozen"
            and bool(getattr(config, tower) == "full" or any(adapter.tower_of(m) == tower for m in lora_modules))
        ), tower

    optimizer = make_optimizer(tuned, adapter, config, TrainConfig(lr=1e-3))
    in_optimizer = {
        n for n, p in tuned.named_parameters() if any(p is q for g in optimizer.param_groups for q in g["params"])
    }
    assert in_optimizer == trainable


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
