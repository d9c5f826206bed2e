"""Known-harmless warnings of vlmtune's own calls stay quiet; other warnings still show."""

import logging
import warnings

import pytest

import vlmtune
from vlmtune.evaluate import generate
from vlmtune.quiet import install


def test_the_bitsandbytes_cpu_kernel_fetch_warning_is_dropped_and_nothing_else(caplog):
    install()
    install()  # idempotent: one filter
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    assert len(logger.filters) == 1
    logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "no module")
    logger.warning("some other warning")
    assert [r.getMessage() for r in caplog.records] == ["some other warning"]


@pytest.mark.parametrize("family", ["qwen2_5_vl", "minicpmv4_6", "minicpmv"])
def test_tuning_training_reloading_and_generating_warn_nothing(family, tiny_checkpoint, latex_data, tmp_path, caplog):
    rows = vlmtune.load_rows("latex_ocr", split="train", path=latex_data)
    config = vlmtune.TrainConfig(output_dir=str(tmp_path), max_steps=1, batch_size=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, processor, descriptor = vlmtune.load(tiny_checkpoint(family))
        model = vlmtune.apply_tuning(model, descriptor, vlmtune.TuningConfig(vision="frozen"))
        vlmtune.train(model, processor, descriptor, rows, config)
        reloaded, processor = vlmtune.load_exported(vlmtune.export(model, processor, tmp_path / "out"))
        generate(reloaded, processor, [rows[0]], max_new_tokens=2)
    assert [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, UserWarning))] == []
    # transformers' "falling back to the reference implementation; install causal_conv1d / flash-linear-attention"
    # (MiniCPM-V 4.6's DeltaNet layers) says how to get a faster run: actionable, so it stays.
    logged = [
        r for r in caplog.records if r.levelno >= logging.WARNING and r.name != "transformers.integrations.hub_kernels"
    ]
    assert [r.getMessage() for r in logged] == []
