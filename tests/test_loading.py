"""Loading: dtypes, quantisation of the language tower only, pre-quantised checkpoints as they are."""

import bitsandbytes as bnb
import pytest
import torch

import vlmtune
from vlmtune.data.collator import Collator
from vlmtune.loading import compute_dtype
from vlmtune.testing import collate, init_lora_b, noise, single
from vlmtune.tiny import BUILDERS
from vlmtune.train import TrainConfig, make_optimizer

FAMILIES = sorted(BUILDERS)


def test_auto_dtype_is_fp32_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("CPU rule")
    assert compute_dtype("auto") == torch.float32
    assert compute_dtype("bfloat16") == torch.bfloat16


@pytest.mark.parametrize(
    ("kwargs", "message"), [(dict(quant="fp3"), "quant must be one of"), (dict(dtype="x"), "dtype")]
)
def test_bad_arguments_raise(tiny_qwen, kwargs, message):
    with pytest.raises(ValueError, match=message):
        vlmtune.load(tiny_qwen, **kwargs)


def test_missing_folder_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        vlmtune.load(tmp_path / "nope")


def test_unsupported_model_type_lists_the_supported(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="not supported by vlmtune; supported: .*gemma3"):
        vlmtune.load(tmp_path)


def language_linears(model: torch.nn.Module, adapter) -> set[str]:
    """The language tower's linears but the output head: what QLoRA quantises."""
    return {
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and adapter.tower_of(n) == "language" and n.rsplit(".", 1)[-1] != "lm_head"
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_nf4_quantises_the_language_linears_and_keeps_the_rest_in_the_compute_dtype(family, tiny_checkpoint):
    # bf16, not the CPU's fp32 default, so that the compute dtype and LoRA's fp32 can be told apart.
    model, _, adapter = vlmtune.load(tiny_checkpoint(family), quant="nf4", dtype="bfloat16")
    four_bit = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert four_bit.keys() == language_linears(model, adapter) and four_bit
    assert {m.weight.quant_state.quant_type for m in four_bit.values()} == {"nf4"}
    packed = {id(m.weight) for m in four_bit.values()}
    tuned = vlmtune.apply_tuning(model, adapter, vlmtune.TuningConfig())
    dtypes = {}
    for name, param in tuned.named_parameters():
        # Packed 4-bit bytes; LoRA in fp32 (TuningConfig.lora_dtype); vision, projector, embeddings, norms, biases,
        # lm_head in the compute dtype.
        expected = torch.uint8 if id(param) in packed else torch.float32 if ".lora_" in name else torch.bfloat16
        assert param.dtype == expected, name
        dtypes[expected] = dtypes.get(expected, 0) + 1
    assert dtypes.keys() == {torch.uint8, torch.float32, torch.bfloat16}


@pytest.mark.parametrize("family", FAMILIES)
def test_prequantized_checkpoint_round_trip(family, tiny_checkpoint, tmp_path):
    model, processor, adapter = vlmtune.load(tiny_checkpoint(family), quant="nf4")
    model.save_pretrained(tmp_path / "bnb4")
    processor.save_pretrained(tmp_path / "bnb4")

    reloaded, processor, adapter = vlmtune.load(tmp_path / "bnb4")  # no quant asked: it is already 4-bit
    four_bit = {n: m for n, m in reloaded.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert four_bit.keys() == language_linears(reloaded, adapter) and four_bit
    saved = dict(model.named_parameters())
    assert dict(reloaded.named_parameters()).keys() == saved.keys()
    for name, param in reloaded.named_parameters():
        assert param.dtype in (torch.float32, torch.uint8), name  # no 16-bit upcast, no fp32 copy of 4-bit
        assert torch.equal(param, saved[name]), name  # the packed nf4 bytes and every other weight survive
    for name, module in four_bit.items():  # and so does the quantisation state (double-quantised absmax ...)
        original = model.get_submodule(name).weight
        torch.testing.assert_close(
            bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state),
            bnb.functional.dequantize_4bit(original.data, original.quant_state),
            rtol=0,
            atol=0,
            msg=name,
        )

    config = vlmtune.TuningConfig(vision="frozen")
    tuned = vlmtune.apply_tuning(reloaded, adapter, config).train()
    init_lora_b(tuned)
    before = {n: p.detach().clone() for n, p in tuned.named_parameters()}
    optimizer = make_optimizer(tuned, adapter, config, TrainConfig(lr=1e-3))
    batch = collate(Collator(adapter, processor, tuned.config), (single("Read this.", r"x^{2}"), [noise((64, 48))]))
    loss = tuned(**batch).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    for name, param in tuned.named_parameters():  # every LoRA weight moved, nothing else did
        assert torch.equal(param, before[name]) != (".lora_" in name), name
