"""Loading: dtypes, quantisation of the language tower only, pre-quantised checkpoints as they are."""

import bitsandbytes as bnb
import pytest
import torch

import vlmtune
from vlmtune.data.collator import Collator
from vlmtune.loading import compute_dtype


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


def test_prequantized_checkpoint_round_trip(tiny_qwen, latex_data, tmp_path):
    model, processor, adapter = vlmtune.load(tiny_qwen, quant="nf4")
    model.save_pretrained(tmp_path / "bnb4")
    processor.save_pretrained(tmp_path / "bnb4")

    reloaded, processor, adapter = vlmtune.load(tmp_path / "bnb4")  # no quant asked: it is already 4-bit
    four_bit = sorted(n for n, m in reloaded.named_modules() if isinstance(m, bnb.nn.Linear4bit))
    assert len(four_bit) == 14 and all(n.startswith("model.language_model.layers.") for n in four_bit)
    assert reloaded.model.visual.blocks[0].attn.qkv.weight.dtype == torch.float32
    for name, param in reloaded.named_parameters():
        assert param.dtype in (torch.float32, torch.uint8), name  # no 16-bit upcast, no fp32 copy of 4-bit

    state = model.model.language_model.layers[0].mlp.down_proj.weight
    again = reloaded.model.language_model.layers[0].mlp.down_proj.weight
    assert torch.equal(state.data, again.data)  # the packed nf4 bytes survive the round trip

    tuned = vlmtune.apply_tuning(reloaded, adapter, vlmtune.TuningConfig(vision="frozen"))
    rows = vlmtune.load_rows("latex_ocr", split="train", path=latex_data)
    batch = Collator(adapter, processor, tuned.config)([{"index": 0, "row": rows[0]}])
    loss = tuned(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for n, p in tuned.named_parameters() if ".lora_B." in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
