"""apply_tuning on every tiny family: every combination of tower modes, LoRA dtype, int8 loading, tied heads."""

import itertools
import re

import pytest
import torch
from PIL import Image

import vlmtune
from vlmtune.tiny import BUILDERS
from vlmtune.train import TrainConfig, make_optimizer
from vlmtune.tuning import TuningConfig, apply_tuning, original_name

FAMILIES = sorted(BUILDERS)


def test_lora_dtype_compute_keeps_adapters_in_the_model_dtype(tiny_qwen):
    model, _, adapter = vlmtune.load(tiny_qwen, dtype="bfloat16")
    model = apply_tuning(model, adapter, TuningConfig(lora_dtype="compute"))
    dtypes = {p.dtype for n, p in model.named_parameters() if ".lora_" in n}
    assert dtypes == {torch.bfloat16}
    model32, _, adapter = vlmtune.load(tiny_qwen, dtype="bfloat16")
    model32 = apply_tuning(model32, adapter, TuningConfig())
    assert {p.dtype for n, p in model32.named_parameters() if ".lora_" in n} == {torch.float32}


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


def test_int8_loading_quantises_the_language_linears_only(tiny_qwen):
    import bitsandbytes as bnb

    model, _, adapter = vlmtune.load(tiny_qwen, quant="int8")
    eight_bit = {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear8bitLt)}
    assert eight_bit and all(adapter.tower_of(n) == "language" and "layers." in n for n in eight_bit)
    assert not isinstance(model.lm_head, bnb.nn.Linear8bitLt)


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


class _CountAttention(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts SDPA's fused attention ops as they run."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from vlmtune.tuning.prepare import _ATTENTION_OPS

        self.calls += func in _ATTENTION_OPS
        return func(*args, **(kwargs or {}))


def test_vision_checkpointing_attention_keeps_the_attention_out_of_the_recomputation(tiny_gemma):
    from vlmtune.data.collator import Collator
    from vlmtune.testing import init_lora_b

    grads, attention_in_backward = {}, {}
    for mode in (True, "attention"):
        torch.manual_seed(0)
        model, processor, family = vlmtune.load(tiny_gemma, dtype="float32")
        model = apply_tuning(model, family, TuningConfig(vision="lora", vision_checkpointing=mode)).train()
        init_lora_b(model, std=0.05, seed_per_matrix=True)
        row = {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]},
                            {"role": "assistant", "content": [{"type": "text", "text": "x^2"}]}],
               "images": [Image.new("RGB", (32, 32), (200, 40, 90))]}  # fmt: skip
        batch = Collator(family, processor, model.config)([{"index": 0, "row": row}])
        loss = model(**batch).loss
        with _CountAttention() as counter:
            loss.backward()
        attention_in_backward[mode] = counter.calls
        grads[mode] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    layers = model.config.vision_config.num_hidden_layers
    # Full checkpointing runs each vision layer's attention again in backward; "attention" takes it from the
    # forward (the language tower still recomputes its own).
    assert attention_in_backward[True] - attention_in_backward["attention"] == layers
    assert grads[True].keys() == grads["attention"].keys()
    for name, grad in grads[True].items():
        torch.testing.assert_close(grads["attention"][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_vision_checkpointing_takes_only_its_modes():
    with pytest.raises(ValueError, match="vision_checkpointing must be True, False or 'attention'"):
        TuningConfig(vision_checkpointing="selective")


def test_a_4bit_weight_keeps_its_nf4_layout_through_an_evaluation(tiny_qwen):
    # bitsandbytes repacks a CPU weight for inference at an eval-mode call where the CPU has AVX512-BF16 (forced
    # here, so the test means the same on every CPU), and its training path cannot use that layout.
    from bitsandbytes.nn import Linear4bit

    from vlmtune.tuning.prepare import keep_nf4_layout

    model, _, family = vlmtune.load(tiny_qwen, quant="nf4", device="cpu")
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert layers
    packed, fresh = layers[0], layers[1]
    nf4 = packed.weight.data.clone()
    packed.support_avx512bf16_for_cpu = True
    packed.eval()
    with torch.no_grad():
        packed(torch.randn(2, packed.in_features))
    assert packed.weight.quant_state.packing_format_for_cpu
    fresh.support_avx512bf16_for_cpu = True
    keep_nf4_layout(model)
    assert not packed.weight.quant_state.packing_format_for_cpu and torch.equal(packed.weight.data, nf4)
    assert not any(m.support_avx512bf16_for_cpu for m in layers)
    fresh.eval()
    with torch.no_grad():
        fresh(torch.randn(2, fresh.in_features))
    assert not getattr(fresh.weight.quant_state, "packing_format_for_cpu", False)
