"""``batch_size`` / ``max_tokens_per_step`` = "auto" in a run: the probe under a fake memory meter on the CPU.

The meter stands in for CUDA's peak-memory counter: it runs the probe step for real (forward, backward, optimiser
step on the tiny model) and reports 1 GiB of weights plus 1 GiB per padded row, or per 100 packed tokens.
"""

import json
import logging

import pytest
import torch

import vlmtune
from vlmtune import step_probe
from vlmtune.data.budget import BudgetBins
from vlmtune.step_search import GIB, NothingFits


def per_row(run, batch):
    run()
    return int(GIB * (1 + batch["input_ids"].shape[0]))


def per_100_tokens(run, batch):
    run()
    return int(GIB * (1 + batch["input_ids"].numel() / 100))


@pytest.fixture
def fake_meter(monkeypatch):
    def use(meter):
        monkeypatch.setattr(step_probe, "default_meter", lambda model: meter)

    return use


@pytest.fixture(scope="module")
def rows(latex_data):
    return vlmtune.load_rows("latex_ocr", split="train", path=latex_data)


def _train(path, rows, out, **overrides):
    torch.manual_seed(0)
    model, processor, family = vlmtune.load(path, dtype="float32")
    tuning = vlmtune.TuningConfig(vision="frozen", gradient_checkpointing=False)
    model = vlmtune.apply_tuning(model, family, tuning)
    settings = dict(output_dir=str(out), max_steps=2, lr=5e-3, logging_steps=1, seed=0) | overrides
    return vlmtune.train(model, processor, family, rows, vlmtune.TrainConfig(**settings), tuning), processor


def test_auto_batch_fits_the_cap_leaks_nothing_and_is_recorded(tiny_qwen, rows, tmp_path, fake_meter):
    fake_meter(per_row)
    # 5 GiB, 90% usable: 3 rows (4 GiB) fit, 4 (5 GiB) do not.
    auto, processor = _train(tiny_qwen, rows, tmp_path / "auto", batch_size="auto", memory_limit_gib=5.0)
    record = step_probe.step_size_of(auto.model)
    assert record["value"] == 3 and record["how"] == "probe" and record["knob"] == "batch_size"
    assert record["chosen_as"] == "largest that fits" and record["probe_s"] > 0
    # After 1 and 2 fit, the line through their peaks puts the cap at 3.5 rows: 3 is probed, fits, and ends it.
    assert [size for size, _ in record["probes"]] == [1, 2, 3]
    # The probes' optimiser steps, gradients and RNG draws are gone: the run is the one of batch_size=3.
    fixed, _ = _train(tiny_qwen, rows, tmp_path / "fixed", batch_size=3)
    assert auto.losses == fixed.losses and len(auto.losses) == 2
    exported = vlmtune.export(auto.model, processor, tmp_path / "export")
    assert json.loads((exported / "vlmtune.json").read_text())["step_size"]["value"] == 3
    lines = [json.loads(line) for line in (tmp_path / "auto" / "metrics.jsonl").read_text().splitlines()]
    collate = [line["collate_s"] for line in lines if line.get("kind") == "train"]
    assert len(collate) == 2 and all(s > 0 for s in collate)  # the collator's cost per batch, every log line


def test_auto_token_budget_packs_under_the_chosen_budget(tiny_qwen, rows, tmp_path, fake_meter, monkeypatch):
    fake_meter(per_100_tokens)
    seen = []
    real = BudgetBins.__init__

    def spy(self, prepared, budget, *args):
        real(self, prepared, budget, *args)
        seen.append(self)

    monkeypatch.setattr(BudgetBins, "__init__", spy)
    result, _ = _train(
        tiny_qwen, rows, tmp_path, packing=True, max_tokens_per_step="auto", memory_limit_gib=10.0, max_steps=1
    )
    record = step_probe.step_size_of(result.model)
    budget = record["value"]
    # 90% of 10 GiB = 9 GiB: at most 800 tokens (1 GiB + 8 GiB), within the search's granularity of it.
    assert 800 - step_probe.TOKEN_GRANULARITY < budget <= 800
    bins = seen[0]
    assert bins.budget == budget and all(bins.tokens(i) <= budget for i in range(len(bins)))


def test_a_cap_no_sample_fits_stops_the_run_naming_it(tiny_qwen, rows, tmp_path, fake_meter):
    fake_meter(per_row)
    with pytest.raises(NothingFits, match=r"batch_size=1 \(the longest sample, \d+ tokens\), needs 2.00 GiB") as err:
        _train(tiny_qwen, rows, tmp_path, batch_size="auto", memory_limit_gib=1.5)
    assert "memory_limit_gib=1.50" in str(err.value)


def test_auto_without_cuda_takes_the_documented_default(tiny_qwen, rows, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="vlmtune.step_probe"):
        result, _ = _train(tiny_qwen, rows, tmp_path, batch_size="auto", max_steps=1)
    assert step_probe.step_size_of(result.model)["value"] == step_probe.CPU_BATCH_SIZE == 4
    assert "without a CUDA device" in caplog.text


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"max_tokens_per_step": 512}, "set packing=True"),
        ({"packing": True, "batch_size": "auto"}, "max_tokens_per_step='auto'"),
        ({"batch_size": 0}, "batch_size must be >= 1 or 'auto'"),
        ({"packing": True, "max_tokens_per_step": "many"}, "max_tokens_per_step must be"),
        ({"memory_limit_gib": 0.0}, "memory_limit_gib must be positive"),
    ],
)
def test_bad_step_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        vlmtune.TrainConfig(output_dir="unused", **settings)


@pytest.mark.parametrize("knob", ["batch_size", "max_tokens_per_step"])
def test_auto_is_refused_under_a_launch_of_several_processes(knob, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    config = vlmtune.TrainConfig(max_steps=1, packing=knob == "max_tokens_per_step", **{knob: "auto"})
    with pytest.raises(ValueError, match=f"{knob}='auto' probes one device, and this launch has 2 processes"):
        step_probe.resolve_step_size(config, None, None, None, lambda: None)


def test_a_smaller_step_is_chosen_only_where_it_trains_clearly_faster():
    probes = [(1000, 2 * GIB), (2000, 3 * GIB), (4000, 5 * GIB), (8000, None)]
    usable = 6 * GIB
    # Tokens/s peaks at 2000 (attention over the whole row): 2000 beats the largest fit, 4000, by 30%.
    assert step_probe.fastest_fit(probes, {1000: 900.0, 2000: 1300.0, 4000: 1000.0}, usable) == 2000
    # Within the 10% margin the largest fit stays.
    assert step_probe.fastest_fit(probes, {1000: 900.0, 2000: 1050.0, 4000: 1000.0}, usable) is None
    # A probe over the usable share never counts, however fast.
    assert step_probe.fastest_fit(probes, {1000: 900.0, 2000: 1300.0, 4000: 1000.0}, 4 * GIB) is None
