"""apply_kernels on the tiny models: kernels on ≡ off (loss, LoRA gradients, training losses), revert is exact.

On the CPU every kernel runs in Triton's interpreter (tests/kernels/conftest.py sets TRITON_INTERPRET), one
Python call per program instance, so a patched step costs seconds where the plain one costs milliseconds:
the batches here are two short samples, and the 30-step runs are marked slow (a 5-step run is in the default
set).

Tolerances (fp32): the kernels reassociate sums that torch orders differently (the RMSNorm reduction, the LoRA
product accumulated into the base output with addmm_, the chunked logsumexp of the fused cross-entropy), so
single ops differ from Hugging Face's by a few fp32 ulps; through two layers and backward that grows to
~1e-6 relative. Losses are checked to 1e-5 relative and gradients to 1e-4 relative (plus an absolute floor
of 1e-6 of the largest gradient for entries that are nearly zero); after 5 Adam steps the losses to 1e-4.
"""

import contextlib
import copy
import dataclasses
import importlib.util
import inspect
import sys

import pytest
import torch
from peft.tuners.lora import LoraLayer
from transformers import set_seed

import vlmtune
from vlmtune.data.collator import Collator
from vlmtune.data.latex_ocr import make_latex_ocr
from vlmtune.data.spec import DataSpec, load_rows
from vlmtune.kernels import lora_mlp
from vlmtune.kernels.patch import ALL_OPS, apply_kernels, kernels_available, kernels_run_on
from vlmtune.testing import init_lora_b
from vlmtune.train import use_kernels

# Qwen's smallest images (2x2 merged patches per image) keep the interpreted steps short.
IMAGE_OPTIONS = {"qwen2_5_vl": {"max_pixels": 56 * 56}, "gemma3": {}, "minicpmv": {}}
LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-4
TRAIN_RTOL = 1e-4


@pytest.fixture(scope="module")
def latex_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("latex_ocr_patch")
    make_latex_ocr(16, out, seed=0)
    return load_rows(DataSpec(source_type="parquet", path=str(out)), "train")


@pytest.fixture
def family_path(request, tiny_qwen, tiny_gemma):
    return {"qwen2_5_vl": tiny_qwen, "gemma3": tiny_gemma}[request.param]


def _tuned(path, quant="none", **tuning):
    set_seed(0)  # the same LoRA init in every model built from the same arguments
    model, processor, family = vlmtune.load(path, quant=quant, dtype="float32")
    model = vlmtune.apply_tuning(model, family, vlmtune.TuningConfig(**tuning))
    init_lora_b(model, std=0.05, seed_per_matrix=True)  # every LoRA factor then gets a gradient to check
    return model.train(), processor, family


def _batch(model, processor, family, rows, n=2):
    collator = Collator(family, processor, model.config, image_options=IMAGE_OPTIONS[family.name])
    batch = collator([{"index": i, "row": rows[i]} for i in range(n)])
    # On a CUDA machine the model loads there (the Trainer would move the batch; a direct call does not).
    device = next((p.device for p in model.parameters() if p.device.type == "cuda"), torch.device("cpu"))
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _loss_and_grads(model, batch, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(**batch, **kwargs)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out, grads


def _assert_same_grads(got: dict, want: dict) -> None:
    assert got.keys() == want.keys() and want
    floor = 1e-6 * max(g.abs().max().item() for g in want.values())
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=GRAD_RTOL, atol=floor, msg=name)


def _instance_forwards(model) -> dict:
    return {name: m.__dict__.get("forward") for name, m in model.named_modules()}


def _check_on_off_and_revert(model, batch):
    """Plain, patched, reverted: patched ≈ plain, reverted == plain bit for bit, forwards restored."""
    forwards = _instance_forwards(model)
    modeling = sys.modules[type(model.get_base_model().get_decoder()).__module__]  # where attention finds RoPE
    rope_function = modeling.apply_rotary_pos_emb
    plain, plain_grads = _loss_and_grads(model, batch)
    patch = apply_kernels(model, vlmtune.detect(model.config))
    patched, patched_grads = _loss_and_grads(model, batch)
    # No op writes a module global (RoPE runs in a copy of the attention forward with its own globals).
    assert modeling.apply_rotary_pos_emb is rope_function
    patch.revert()
    reverted, reverted_grads = _loss_and_grads(model, batch)

    assert patched.logits is None  # the fused loss never built them
    torch.testing.assert_close(patched.loss, plain.loss, rtol=LOSS_RTOL, atol=0)
    _assert_same_grads(patched_grads, plain_grads)

    now = _instance_forwards(model)
    assert all(now[name] is forwards[name] for name in forwards)
    assert not any("_vlmtune_kernel" in m.__dict__ for m in model.modules())
    assert torch.equal(reverted.loss, plain.loss) and torch.equal(reverted.logits, plain.logits)
    assert all(torch.equal(reverted_grads[n], plain_grads[n]) for n in plain_grads)
    return patch


def _count_fused_mlp_backwards(monkeypatch, kernel="gated_backward") -> list:
    """Count the fused LoRA MLP's backward passes (one per MLP per step, recomputation or not), or with
    ``kernel="gated_forward"`` its forwards."""
    calls = []
    real = getattr(lora_mlp, kernel)

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(lora_mlp, kernel, counting)
    return calls


@pytest.mark.parametrize("family_path", ["qwen2_5_vl", "gemma3"], indirect=True)
def test_kernels_on_equal_off_and_revert_restores(family_path, latex_rows, monkeypatch):
    model, processor, family = _tuned(family_path, vision="lora", language="lora")
    fused_mlp = _count_fused_mlp_backwards(monkeypatch)
    patch = _check_on_off_and_revert(model, _batch(model, processor, family, latex_rows))

    n_layers = model.config.get_text_config().num_hidden_layers
    # Qwen: input + post-attention norms per layer; Gemma-3: four, plus q_norm and k_norm; both: the final norm.
    norms_per_layer = {"rms": 2, "rms_gemma": 6}[family.norm_kind]
    assert len(patch.patched["rms_norm"]) == norms_per_layer * n_layers + 1
    assert len(patch.patched["rope"]) == len(patch.patched["mlp"]) == n_layers
    assert len(fused_mlp) == n_layers  # LoRA on gate, up and down: each MLP ran as one Function
    lora_layers = [n for n, m in model.get_base_model().named_modules() if isinstance(m, LoraLayer)]
    vision_lora = [n for n in lora_layers if family.tower_of(n) == "vision"]
    assert len(vision_lora) > 0 and len(lora_layers) == 7 * n_layers + len(vision_lora)
    assert sorted(patch.patched["lora_linear"]) == sorted(lora_layers) and not patch.skipped
    assert patch.patched["cross_entropy"] == [""]
    # In the vision tower only LoRA layers, Qwen's attention loop over images / windows and SigLIP's LayerNorms and
    # MLPs change (tests/kernels/test_patch_vision.py checks those).
    n_vision = model.config.vision_config.depth if family.vision_attention_kind else 0
    assert len(patch.patched["vision_attention"]) == n_vision
    vision_ops = ("vision_attention", "lora_linear", "layer_norm", "fc_mlp")
    patched = [n for op, names in patch.patched.items() if op not in vision_ops for n in names]
    assert all(family.tower_of(n) == "language" for n in patched if n)
    assert len(patch.patched["sdpa_backend"]) == n_layers


@pytest.mark.parametrize("family_path", ["qwen2_5_vl", "gemma3"], indirect=True)
def test_language_attention_runs_sdpa_without_cudnn(family_path, latex_rows):
    """Inside each patched language attention cuDNN's SDPA is off (forward and recomputation); outside, and in the
    vision tower, the global setting is untouched."""
    model, processor, family = _tuned(family_path, vision="lora", language="lora")
    base = model.get_base_model()
    seen = {"language": [], "vision": []}
    hooks = [
        module.register_forward_hook(
            lambda *_, tower=tower: seen[tower].append(torch.backends.cuda.cudnn_sdp_enabled())
        )
        for name, module in base.named_modules()
        if (tower := family.tower_of(name)) in seen and name.endswith(("q_proj", "self_attn.qkv", "attn.qkv"))
    ]
    patch = apply_kernels(model, family, ("sdpa_backend",))
    try:
        before = torch.backends.cuda.cudnn_sdp_enabled()
        model(**_batch(model, processor, family, latex_rows)).loss.backward()
        assert torch.backends.cuda.cudnn_sdp_enabled() is before is True
    finally:
        patch.revert()
        for hook in hooks:
            hook.remove()
    n_layers = model.config.get_text_config().num_hidden_layers
    assert seen["language"] == [False] * len(seen["language"]) and len(seen["language"]) >= n_layers
    assert seen["vision"] and all(seen["vision"])
    assert not any("_vlmtune_sdpa_backend" in m.__dict__ for m in base.modules())


def test_qlora_nf4_kernels_on_equal_off(tiny_qwen, latex_rows, monkeypatch):
    model, processor, family = _tuned(tiny_qwen, quant="nf4", vision="frozen", language="lora")
    fused_mlp = _count_fused_mlp_backwards(monkeypatch)
    patch = _check_on_off_and_revert(model, _batch(model, processor, family, latex_rows))
    assert len(patch.patched["lora_linear"]) == 14 and not patch.skipped
    assert len(fused_mlp) == 2


@pytest.mark.parametrize(
    "ops, adapter_off", [(("mlp",), False), (("mlp", "lora_linear"), True), (("mlp", "lora_linear"), False)]
)
def test_mlp_fuses_only_over_three_kernel_lora_projections(tiny_qwen, latex_rows, monkeypatch, ops, adapter_off):
    """Without the lora_linear op, under ``disable_adapter()``, or with a hook on a projection, the MLP runs
    its projections one by one (the activation kernel between them) and gives the same numbers."""
    model, processor, family = _tuned(tiny_qwen, vision="frozen", language="lora")
    batch = _batch(model, processor, family, latex_rows, n=1)
    fused_mlp = _count_fused_mlp_backwards(monkeypatch)
    fused_forwards = _count_fused_mlp_backwards(monkeypatch, "gated_forward")
    hooked = model.get_base_model().model.language_model.layers[0].mlp.up_proj
    hook_calls = []
    handle = hooked.register_forward_hook(lambda module, args, out: hook_calls.append("forward" in module.__dict__))
    # With the adapter off nothing trains: losses only.
    run = (lambda: (model(**batch), None)) if adapter_off else (lambda: _loss_and_grads(model, batch))
    with model.disable_adapter() if adapter_off else contextlib.nullcontext():
        plain, plain_grads = run()
        hook_calls.clear()
        patch = apply_kernels(model, family, ops)
        patched, patched_grads = run()
        patch.revert()
    handle.remove()
    # The hooked projection is still called as a module, so its hook fires, with the LoRA kernel's forward swapped
    # in when that op is on; revert takes the swap away.
    assert hook_calls and all(swapped == ("lora_linear" in ops) for swapped in hook_calls)
    assert "forward" not in hooked.__dict__
    # Fused in the second layer only when LoRA is on and the lora_linear op patched the projections.
    fused = not adapter_off and "lora_linear" in ops
    assert len(fused_mlp) == (1 if fused else 0) and (len(fused_forwards) > 0) == fused
    torch.testing.assert_close(patched.loss, plain.loss, rtol=LOSS_RTOL, atol=0)
    if not adapter_off:
        _assert_same_grads(patched_grads, plain_grads)


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_frozen_language_mlps_run_fused_and_pass_gradients_to_the_vision_lora(
    tiny_qwen, latex_rows, monkeypatch, quant
):
    """Vision LoRA under a frozen language tower: its MLPs have no LoRA, yet backward must cross them."""
    model, processor, family = _tuned(tiny_qwen, quant=quant, vision="lora", language="frozen")
    fused_mlp = _count_fused_mlp_backwards(monkeypatch)
    batch = _batch(model, processor, family, latex_rows, n=1)
    plain, plain_grads = _loss_and_grads(model, batch)
    patch = apply_kernels(model, family, ("mlp",))
    patched, patched_grads = _loss_and_grads(model, batch)
    patch.revert()
    assert plain_grads and not any("language_model" in n for n in plain_grads)
    assert len(fused_mlp) == model.config.get_text_config().num_hidden_layers
    torch.testing.assert_close(patched.loss, plain.loss, rtol=LOSS_RTOL, atol=0)
    _assert_same_grads(patched_grads, plain_grads)


def test_trained_full_mlps_keep_their_own_projections(tiny_qwen, latex_rows, monkeypatch):
    """language="full" trains the MLP weights themselves: the fused node (no base-weight gradient) must not run."""
    model, processor, family = _tuned(tiny_qwen, vision="lora", language="full")
    fused_mlp = _count_fused_mlp_backwards(monkeypatch)
    batch = _batch(model, processor, family, latex_rows, n=1)
    plain, plain_grads = _loss_and_grads(model, batch)
    patch = apply_kernels(model, family, ("mlp", "lora_linear"))
    patched, patched_grads = _loss_and_grads(model, batch)
    patch.revert()
    assert not fused_mlp and any("mlp.down_proj.weight" in n for n in plain_grads)
    torch.testing.assert_close(patched.loss, plain.loss, rtol=LOSS_RTOL, atol=0)
    _assert_same_grads(patched_grads, plain_grads)


def test_minicpmv_loss_is_fused_in_its_llm(tiny_minicpmv, latex_rows, monkeypatch):
    """MiniCPM-V's forward hands the loss to its ``llm`` (a Qwen2ForCausalLM): that is where the fused loss goes."""
    model, processor, family = _tuned(tiny_minicpmv, vision="frozen", language="lora")
    fused_mlp = _count_fused_mlp_backwards(monkeypatch)
    patch = _check_on_off_and_revert(model, _batch(model, processor, family, latex_rows))
    assert patch.patched["cross_entropy"] == ["llm"]
    n_layers = model.config.get_text_config().num_hidden_layers
    assert len(patch.patched["mlp"]) == len(fused_mlp) == n_layers


def test_lm_head_in_modules_to_save_trains_through_the_fused_loss(tiny_qwen, latex_rows):
    model, processor, family = _tuned(tiny_qwen, vision="frozen", modules_to_save=["lm_head"])
    batch = _batch(model, processor, family, latex_rows, n=1)
    ops = ("cross_entropy",)
    plain, plain_grads = _loss_and_grads(model, batch)
    patch = apply_kernels(model, family, ops)
    patched, patched_grads = _loss_and_grads(model, batch)
    patch.revert()
    assert any("lm_head.modules_to_save" in n for n in plain_grads)
    torch.testing.assert_close(patched.loss, plain.loss, rtol=LOSS_RTOL, atol=0)
    _assert_same_grads(patched_grads, plain_grads)


def test_loss_kwargs_and_fallbacks_match_the_plain_forward(tiny_gemma, latex_rows):
    model, processor, family = _tuned(tiny_gemma, vision="frozen", language="lora")
    batch = _batch(model, processor, family, latex_rows)
    n_items = torch.tensor(97)  # Trainer's count over the whole accumulated batch
    labels = batch["labels"].clone()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        plain = model(**batch)
        plain_summed = model(**batch, num_items_in_batch=n_items)
        plain_logits = model(**inputs).logits
        patch = apply_kernels(model, family, ("cross_entropy",))
        summed = model(**batch, num_items_in_batch=n_items)
        as_tuple = model(**batch, return_dict=False)
        positional = model.get_base_model()(batch["input_ids"], **{k: v for k, v in batch.items() if k != "input_ids"})
        no_labels = model(**inputs)
        with_logits = model(**batch, return_logits=True)
    patch.revert()

    torch.testing.assert_close(summed.loss, plain_summed.loss, rtol=LOSS_RTOL, atol=0)
    assert type(summed) is type(plain) and summed.logits is None
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], positional.loss)
    torch.testing.assert_close(positional.loss, plain.loss, rtol=LOSS_RTOL, atol=0)
    # No labels, or logits asked for: the original forward, bit for bit.
    assert torch.equal(no_labels.logits, plain_logits)
    assert torch.equal(with_logits.loss, plain.loss) and torch.equal(with_logits.logits, plain.logits)
    assert torch.equal(batch["labels"], labels)  # the caller's labels are not shifted in place


def test_patched_model_generates_the_plain_models_tokens(tiny_qwen, latex_rows, monkeypatch):
    """Decoding runs the fused MLP on one new token at a time under no_grad, with a KV cache."""
    model, processor, family = _tuned(tiny_qwen, vision="lora", language="lora")
    fused_forwards = _count_fused_mlp_backwards(monkeypatch, "gated_forward")
    batch = _batch(model, processor, family, latex_rows, n=1)
    prompt = {k: v for k, v in batch.items() if k not in ("labels", "position_ids")}
    kwargs = {"max_new_tokens": 6, "do_sample": False}
    model.eval()
    with torch.no_grad():
        plain = model.generate(**prompt, **kwargs)
        patch = apply_kernels(model, family)
        patched = model.generate(**prompt, **kwargs)
        patch.revert()
    assert plain.shape[1] > prompt["input_ids"].shape[1]
    assert torch.equal(patched, plain)
    n_layers = model.config.get_text_config().num_hidden_layers
    assert len(fused_forwards) == n_layers * (plain.shape[1] - prompt["input_ids"].shape[1])  # one per new token


def test_patched_forward_keeps_the_signature_trainer_and_generate_read(tiny_gemma):
    model, _, family = vlmtune.load(tiny_gemma, dtype="float32")
    before = inspect.signature(model.forward)
    patch = apply_kernels(model, family, ("cross_entropy",))
    assert inspect.signature(model.forward) == before
    patch.revert()


def test_lora_layers_keep_peft_path_when_the_kernel_does_not_apply(tiny_qwen):
    model, _, family = _tuned(tiny_qwen, vision="frozen", dropout=0.1)
    patch = apply_kernels(model, family, ("lora_linear",))
    assert not patch.patched["lora_linear"]
    assert len(patch.skipped) == 14 and set(patch.skipped.values()) == {"lora_dropout > 0"}
    assert not any("forward" in m.__dict__ for m in model.modules() if isinstance(m, LoraLayer))
    patch.revert()


def test_softcap_matches_gemma3_for_causal_lm(tiny_gemma, device):
    # Gemma3ForCausalLM soft-caps its logits (the multimodal class does not): a text-only tiny model with a
    # cap small enough to bite checks the fused loss caps exactly where Hugging Face does.
    from transformers import AutoConfig, Gemma3ForCausalLM

    text_config = AutoConfig.from_pretrained(tiny_gemma).text_config
    text_config.final_logit_softcapping = 2.0
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(text_config).to(device).train()
    family = dataclasses.replace(
        vlmtune.detect(AutoConfig.from_pretrained(tiny_gemma)),
        towers={"vision": (), "projector": (), "language": ("model", "lm_head")},
    )
    input_ids = torch.randint(3, text_config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    input_ids = input_ids.to(device)
    labels = input_ids.clone()
    labels[:, :4] = -100
    batch = {"input_ids": input_ids, "labels": labels}
    plain, plain_grads = _loss_and_grads(model, batch)
    patch = apply_kernels(model, family, ("rms_norm", "rope", "mlp", "cross_entropy"))
    patched, patched_grads = _loss_and_grads(model, batch)
    patch.revert()
    torch.testing.assert_close(patched.loss, plain.loss, rtol=LOSS_RTOL, atol=0)
    _assert_same_grads(patched_grads, plain_grads)  # every weight trains here: norm, MLP and lm_head grads too


def test_rope_outside_the_kernel_shapes_falls_back_to_transformers():
    from transformers.models.gemma3 import modeling_gemma3

    from vlmtune.kernels.hf.rope import _rope_or_fallback
    from vlmtune.kernels.rope import apply_rope

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 5, 4, 8, generator=g), torch.randn(2, 5, 2, 8, generator=g)  # (B, T, H, D)
    cos, sin = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    hf = modeling_gemma3.apply_rotary_pos_emb
    got = _rope_or_fallback(q, k, cos, sin, unsqueeze_dim=2, kernel=apply_rope, fallback=hf)
    want = hf(q, k, cos, sin, unsqueeze_dim=2)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_deep_copy_of_a_patched_model_is_patched_on_its_own(tiny_gemma):
    model, _, family = vlmtune.load(tiny_gemma, dtype="float32")
    patch = apply_kernels(model, family, ("rms_norm", "mlp"))
    clone = copy.deepcopy(model)
    patch.revert()
    mlp = clone.model.language_model.layers[0].mlp
    assert mlp.forward.module is mlp and mlp._vlmtune_kernel.inner.__self__ is mlp
    assert "forward" not in model.model.language_model.layers[0].mlp.__dict__


def test_refuses_unknown_ops_and_double_patching(tiny_gemma):
    model, _, family = vlmtune.load(tiny_gemma, dtype="float32")
    with pytest.raises(ValueError, match="unknown kernel op"):
        apply_kernels(model, family, ("rms_norm", "flash_attention"))
    patch = apply_kernels(model, family, ("mlp",))
    with pytest.raises(ValueError, match="already applied"):
        apply_kernels(model, family, ALL_OPS)
    patch.revert()
    patch.revert()  # idempotent
    apply_kernels(model, family, ("mlp",)).revert()


def test_kernels_available_needs_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels_available()
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not kernels_available()


def test_a_model_off_cuda_is_refused_without_the_interpreter(tiny_gemma, monkeypatch):
    model, _, family = vlmtune.load(tiny_gemma, dtype="float32", device="cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a CUDA machine, the model left on its CPU
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert kernels_available() and not kernels_run_on(model)
    with pytest.raises(RuntimeError, match="the model is on cpu.*model.cuda"):
        apply_kernels(model, family, ("mlp",))
    assert not any("forward" in m.__dict__ for m in model.modules())
    # train()'s default follows the model, not the machine
    assert not use_kernels(vlmtune.TrainConfig(output_dir="unused"), model)
    assert use_kernels(vlmtune.TrainConfig(output_dir="unused", kernels=True), model)


def _train_losses(path, rows, tmp_path, kernels, steps):
    set_seed(0)
    model, processor, family = vlmtune.load(path, dtype="float32")
    # Checkpointing off: the recomputation would run every interpreted kernel twice. The checks above run
    # with it on (apply_tuning's default).
    tuning = vlmtune.TuningConfig(vision="frozen", language="lora", gradient_checkpointing=False)
    model = vlmtune.apply_tuning(model, family, tuning)
    config = vlmtune.TrainConfig(
        output_dir=str(tmp_path / f"kernels_{kernels}"),
        max_steps=steps,
        batch_size=2,
        lr=5e-3,
        logging_steps=1,
        image_options=IMAGE_OPTIONS[family.name],
        kernels=kernels,  # train() applies apply_kernels after tuning and reverts after training
    )
    return vlmtune.train(model, processor, family, rows, config, tuning).losses


def _check_training(path, rows, tmp_path, steps):
    plain = _train_losses(path, rows, tmp_path, kernels=False, steps=steps)
    fused = _train_losses(path, rows, tmp_path, kernels=True, steps=steps)
    assert len(plain) == len(fused) == steps
    torch.testing.assert_close(torch.tensor(fused), torch.tensor(plain), rtol=TRAIN_RTOL, atol=0)
    assert plain[-1] < plain[0]


def test_five_training_steps_kernels_on_equal_off(tiny_qwen, latex_rows, tmp_path):
    _check_training(tiny_qwen, latex_rows, tmp_path, steps=5)


@pytest.mark.slow
@pytest.mark.parametrize("family_path", ["qwen2_5_vl", "gemma3"], indirect=True)
def test_thirty_training_steps_kernels_on_equal_off(family_path, latex_rows, tmp_path):
    _check_training(family_path, latex_rows, tmp_path, steps=30)


@pytest.mark.parametrize("family_path", ["qwen2_5_vl", "gemma3"], indirect=True)
def test_rope_runs_the_kernel_without_touching_the_modeling_global(family_path, latex_rows, monkeypatch):
    from vlmtune.kernels import rope as rope_kernels

    calls = []
    real = rope_kernels.apply_rope
    monkeypatch.setattr(rope_kernels, "apply_rope", lambda *a, **k: calls.append(1) or real(*a, **k))
    model, processor, family = _tuned(family_path, vision="frozen", language="lora")
    batch = _batch(model, processor, family, latex_rows)
    modeling = sys.modules[type(model.get_base_model().get_decoder()).__module__]
    original = modeling.apply_rotary_pos_emb
    seen = []  # the global as o_proj runs, i.e. after the attention rotated q / k
    layer = model.get_base_model().get_decoder().layers[0]
    layer.self_attn.o_proj.register_forward_pre_hook(lambda *_: seen.append(modeling.apply_rotary_pos_emb))
    patch = apply_kernels(model, family, ("rope",))
    model(**batch).loss.backward()
    patch.revert()
    assert len(patch.patched["rope"]) == model.config.get_text_config().num_hidden_layers
    assert calls and seen and all(function is original for function in seen)
    assert modeling.apply_rotary_pos_emb is original


def test_train_and_eval_switches_keep_the_kernels(tiny_qwen):
    # transformers 5.25 kernelises again at every train()/eval() switch when the `kernels` library is installed,
    # which reset the swapped forwards; a model loaded elsewhere may have its hub kernels on.
    model, _, family = _tuned(tiny_qwen, vision="frozen", language="lora")
    if importlib.util.find_spec("kernels") is not None:
        model.get_base_model().use_kernels = True
    forwards = _instance_forwards(model)
    patch = apply_kernels(model, family, ("rms_norm", "mlp"))
    swapped = {n: m.__dict__.get("forward") for n, m in model.named_modules() if "_vlmtune_kernel" in m.__dict__}
    model.train()
    model.eval()
    model.train()
    assert swapped and all(model.get_submodule(n).__dict__.get("forward") is f for n, f in swapped.items())
    patch.revert()
    assert all(_instance_forwards(model)[n] is forwards[n] for n in forwards)
