"""Known-harmless warnings of vlmtune's own calls stay quiet; other warnings still show."""

import logging
import warnings

import vlmtune
from vlmtune.quiet import install


def test_the_bitsandbytes_cpu_kernel_fetch_warning_is_dropped_and_nothing_else(caplog):
    install()
    install()  # idempotent: one filter
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    assert len(logger.filters) == 1
    logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "no module")
    logger.warning("some other warning")
    assert [r.getMessage() for r in caplog.records] == ["some other warning"]


def test_tuning_training_and_reloading_warn_nothing(tiny_qwen, latex_data, tmp_path, caplog):
    rows = vlmtune.load_rows("latex_ocr", split="train", path=latex_data)
    config = vlmtune.TrainConfig(output_dir=str(tmp_path), max_steps=1, batch_size=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, processor, family = vlmtune.load(tiny_qwen)
        model = vlmtune.apply_tuning(model, family, vlmtune.TuningConfig(vision="frozen"))
        vlmtune.train(model, processor, family, rows, config)
        vlmtune.load_exported(vlmtune.export(model, processor, tmp_path / "out"))
    assert [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, UserWarning))] == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
