"""benchmarks/train_step/driver.py: the harness runs end to end on tiny models on the CPU (no timing asserted),
profile and report included; the packed configurations on the real shape; the MiniCPM-V models; the suites'
settings; the largest-batch search."""

import importlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
COMMAND = [sys.executable, "-m", "benchmarks.train_step"]  # run from the repository root, as users do
PARTS = ("vision tower", "projector", "forward", "language tower", "loss/head", "backward", "optimizer", "step")
FIELDS = (
    "step_s",
    "tokens_per_s",
    "images_per_s",
    "peak_alloc_gib",
    "peak_reserved_gib",
    "loss_first",
    "loss_last",
    "warmup_s",
    "load_s",
    "lora_modules",
    "trainable_params",
    "versions",
)


@pytest.fixture
def driver(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))  # benchmarks is not installed: it imports from the repository root
    return importlib.import_module("benchmarks.train_step.driver")


def test_harness_runs_end_to_end_on_cpu(tmp_path):
    out = tmp_path / "out"
    cmd = [*COMMAND, "--model", "tiny-qwen", "--shape", "fixed", "--device", "cpu"]
    cmd += ["--configs", "hf_bf16,vlmtune_bf16,hf_qlora,unsloth", "--batch", "2", "--warmup", "0", "--steps", "2"]
    cmd += ["--out", str(out), "--cache", str(tmp_path / "cache"), "--profile"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "| configuration |" in run.stdout
    assert "where the time goes, vlmtune_bf16" in run.stdout and "| kernel kind |" in run.stdout
    assert "| configuration |" in (out / "tiny-qwen_fixed.log").read_text()

    data = json.loads((out / "tiny-qwen_fixed_cpu.json").read_text())
    assert data["meta"]["model"] == "tiny-qwen" and data["meta"]["data"]["batch_size"] == 2
    results = {r["config"]: r for r in data["results"]}
    assert list(results) == ["hf_bf16", "vlmtune_bf16", "hf_qlora", "unsloth"]
    for name in ("hf_bf16", "vlmtune_bf16"):
        record = results[name]
        assert record["status"] == "ok", record.get("reason")
        assert all(field in record for field in FIELDS), sorted(set(FIELDS) - set(record))
        assert len(record["losses"]) == 2 and all(math.isfinite(x) for x in record["losses"])
        assert record["tokens_per_step"] == sum(data["meta"]["data"]["tokens_per_batch"])
    # Same placement of LoRA on both stacks, same data: the first losses agree.
    assert results["hf_bf16"]["lora_modules"] == results["vlmtune_bf16"]["lora_modules"] > 0
    assert results["hf_bf16"]["loss_first"] == pytest.approx(results["vlmtune_bf16"]["loss_first"], rel=1e-4)
    # bitsandbytes 4-bit and Unsloth need CUDA: reported, not run.
    assert results["hf_qlora"]["status"] == results["unsloth"]["status"] == "skipped"

    # --profile alone on the CPU profiles the bf16 pair: one more step, every range entered once (Qwen-VL's
    # projector, the merger, inside its vision tower), exclusive times that add up to the step.
    for name in ("hf_bf16", "vlmtune_bf16"):
        profile = results[name]["profile"]
        assert profile["status"] == "ok", profile.get("traceback")
        assert len(results[name]["losses"]) == 2  # the profiled step is not one of the timed ones
        parts = {p["part"]: p for p in profile["parts"]}
        assert tuple(parts) == PARTS and all(p["calls"] == 1 for p in parts.values())
        assert all(p["wall_ms"] >= 0 and p["device_ms"] >= 0 for p in parts.values())
        named = sum(p["wall_ms"] for n, p in parts.items() if n != "step")
        assert 0 < named <= profile["step_ms"] and sum(p["wall_ms"] for p in parts.values()) == pytest.approx(
            profile["step_ms"]
        )
        assert parts["vision tower"]["wall_ms"] > 0 and parts["language tower"]["wall_ms"] > 0
        assert parts["backward"]["wall_ms"] > 0
        assert sum(k["ms"] for k in profile["kinds"]) == pytest.approx(profile["device_busy_ms"])
        assert {k["kind"]: k["ms"] for k in profile["kinds"]}["GEMM"] > 0  # aten::mm on the CPU

    # The report fills BENCHMARKS.md's generated blocks and leaves the prose around them.
    page = tmp_path / "BENCHMARKS.md"
    page.write_text(
        "intro\n<!-- report:results -->\nold\n<!-- /report:results -->\nmiddle\n"
        "<!-- report:profile -->\nold\n<!-- /report:profile -->\nend\n"
    )
    report = [*COMMAND, "report", "--write", str(page), str(out / "tiny-qwen_fixed_cpu.json")]
    run = subprocess.run(report, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    text = page.read_text()
    assert text.startswith("intro\n") and "\nmiddle\n" in text and text.endswith("end\n") and "old" not in text
    assert "### tiny-qwen, fixed shape (batch 2" in text and "| hf_bf16 |" in text
    assert "| tiny-qwen fixed `vlmtune_bf16` |" in text and "vision tower (projector excluded)" in text


def test_final_suite_settings(driver):
    script = driver
    args = script.parse_args(["--model", "qwen2_5_vl-3b", "--suite", "final", "--out", "/tmp/x"])
    assert args.configs == [
        "vlmtune_qlora_kernels",
        "hf_qlora",
        "hf_qlora_noupcast",
        "vlmtune_bf16_kernels",
        "hf_bf16",
    ]
    assert args.profile == ["vlmtune_qlora_kernels", "hf_qlora"]
    assert (args.warmup, args.steps) == (2, 3) and args.time_budget > 0
    args = script.parse_args(["--model", "gemma3-4b", "--suite", "final", "--steps", "4", "--time-budget", "99"])
    assert args.configs == args.profile == ["vlmtune_qlora_kernels", "hf_qlora"]
    assert (args.warmup, args.steps, args.time_budget) == (2, 4, 99)
    # --profile alone runs just the profiled pair; profiled configurations join --configs.
    assert script.parse_args(["--model", "gemma3-4b", "--profile"]).configs == ["vlmtune_qlora_kernels", "hf_qlora"]
    args = script.parse_args(["--model", "gemma3-4b", "--configs", "hf_bf16", "--profile", "hf_qlora"])
    assert args.configs == ["hf_bf16", "hf_qlora"] and args.profile == ["hf_qlora"]


def _run_harness(tmp_path, model, shape, configs, steps=2):
    """The harness on the CPU at batch 2, no warm-up; the records by configuration and the data description."""
    out = tmp_path / "out"
    cmd = [*COMMAND, "--model", model, "--shape", shape, "--device", "cpu", "--configs", configs]
    cmd += ["--batch", "2", "--warmup", "0", "--steps", str(steps), "--out", str(out), "--cache", str(tmp_path / "c")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    data = json.loads((out / f"{model}_{shape}_cpu.json").read_text())
    return {r["config"]: r for r in data["results"]}, data["meta"]["data"]


@pytest.mark.parametrize("model", ["tiny-qwen", "tiny-gemma"])
def test_packed_config_trains_on_the_padded_configs_samples(tmp_path, model):
    # Qwen-VL's packed row carries 4-row M-RoPE positions and no attention_mask; Gemma-3's a dict of 4-D masks.
    results, data = _run_harness(tmp_path, model, "real", "vlmtune_bf16,vlmtune_bf16_packed")
    padded, packed = results["vlmtune_bf16"], results["vlmtune_bf16_packed"]
    assert padded["status"] == packed["status"] == "ok", (padded.get("reason"), packed.get("reason"))
    assert data["packed_tokens_per_batch"] == data["tokens_per_batch"]
    assert sum(data["padded_tokens_per_batch"]) > sum(data["tokens_per_batch"])  # the real shape pads
    assert packed["packed"] and packed["tokens_from"].startswith("input_ids")
    assert padded["tokens_from"] == "attention_mask"
    # Qwen-VL's packed row has no attention_mask; Gemma-3's holds its dict of 4-D masks.
    assert ("attention_mask" in packed["batch_keys"]) == (model == "tiny-gemma")
    assert packed["samples_per_step"] == padded["samples_per_step"] == 2
    assert packed["tokens_per_step"] == padded["tokens_per_step"] == sum(data["tokens_per_batch"]) / 2
    assert all(math.isfinite(x) for x in packed["losses"]) and len(packed["losses"]) == 2
    # Same supervised tokens, attention kept inside each sample: the same loss before any update (fp32, CPU).
    assert packed["loss_first"] == pytest.approx(padded["loss_first"], rel=1e-4)


@pytest.mark.parametrize("model", ["tiny-minicpmv", "tiny-minicpmv4_6"])
def test_minicpmv_models_run_on_cpu(tmp_path, model):
    results, data = _run_harness(tmp_path, model, "fixed", "vlmtune_bf16,hf_bf16", steps=1)
    ours = results["vlmtune_bf16"]
    assert ours["status"] == "ok", ours.get("reason")
    assert ours["lora_modules"] > ours["lora_vision_modules"] > 0 and math.isfinite(ours["loss_first"])
    assert ours["samples_per_step"] == 2 and data["images_per_batch"] == [2]
    if model == "tiny-minicpmv":
        # transformers has no class for the 2.6 layout: the baseline reports why instead of failing.
        assert results["hf_bf16"]["status"] == "n/a" and "remote code" in results["hf_bf16"]["reason"]
    else:
        assert results["hf_bf16"]["status"] == "ok", results["hf_bf16"].get("reason")
        assert results["hf_bf16"]["loss_first"] == pytest.approx(ours["loss_first"], rel=1e-4)


@pytest.mark.parametrize(
    ("fixed_gib", "per_sample_gib", "limits", "want", "most_probes"),
    [
        (6.0, 0.5, [24, 80], {"24GiB": 36, "80GiB": 128}, 6),  # linear: 2 probes + 2 per limit (80 hits the cap)
        (6.0, 0.7, [24, 80], {"24GiB": 25, "80GiB": 105}, 6),
        (30.0, 0.5, [24, 80], {"24GiB": 0, "80GiB": 100}, 12),  # the start itself does not fit in 24 GiB
    ],
)
def test_largest_batch_predicts_from_two_probes_then_verifies(
    driver, fixed_gib, per_sample_gib, limits, want, most_probes
):
    module = driver
    probes = []

    def probe(batch, limit):
        probes.append((batch, limit))
        peak = fixed_gib + per_sample_gib * batch
        return peak if peak <= limit else None

    assert module.largest_batch(probe, limits, start=8, cap=128) == want
    assert len(probes) <= most_probes


def test_largest_batch_recovers_when_memory_is_not_linear(driver):
    module = driver

    def probe(batch, limit):  # activations grow faster than linearly past 20 (e.g. a longer padded batch)
        peak = 4.0 + 0.5 * batch + (0.1 * (batch - 20) ** 2 if batch > 20 else 0.0)
        return peak if peak <= limit else None

    want = max(b for b in range(1, 129) if probe(b, 24) is not None)
    assert module.largest_batch(probe, [24], start=8, cap=128) == {"24GiB": want}


def test_max_batch_logs_each_probe_as_it_finishes(driver, monkeypatch, tmp_path):
    """A search cut short (each probe reloads the model) must leave its probes behind, not only a final JSON."""
    module = driver
    prepared = {"device_name": "Fake GPU", "data": {"batches": 1}, "wall_s": 0.0}
    batches = []  # what each probe prepared: its run_config call below trains that batch

    def run_config(args, name, prepared, profile, warmup, steps, memory_limit_gib):
        peak = 4.0 + 0.5 * batches[-1]
        return {"status": "ok", "peak_reserved_gib": peak} if peak <= memory_limit_gib else {"status": "oom"}

    monkeypatch.setattr(module, "prepare", lambda args, batch: batches.append(batch) or prepared)
    monkeypatch.setattr(module, "run_config", run_config)
    args = module.parse_args(
        [
            "--model",
            "qwen2_5_vl-3b",
            "--max-batch",
            "--max-batch-limits",
            "24",
            "--configs",
            "vlmtune_qlora",
            "--device",
            "cpu",
            "--out",
            str(tmp_path),
        ]
    )
    assert module.max_batch(args) == {"vlmtune_qlora": {"24GiB": 40}}
    log = (tmp_path / "qwen2_5_vl-3b_fixed_maxbatch.log").read_text().splitlines()
    probes = [line for line in log if line.startswith("vlmtune_qlora batch")]
    assert probes[0] == "vlmtune_qlora batch 8 in 24.0 GiB: ok (peak reserved 8.0 GiB)"
    assert "vlmtune_qlora batch 41 in 24.0 GiB: oom (peak reserved None GiB)" in probes
    assert log[-1] == "vlmtune_qlora: largest batch {'24GiB': 40}"
    saved = json.loads((tmp_path / "qwen2_5_vl-3b_fixed_fake_gpu_maxbatch.json").read_text())
    assert saved["max_batch"] == {"vlmtune_qlora": {"24GiB": 40}}
