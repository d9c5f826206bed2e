"""CPU smoke test of benchmarks/train_step.py: the harness runs end to end on a tiny model (no timing asserted),
profile and report included; the packed configurations on the real shape; the MiniCPM-V models; the profile's
arithmetic on CUDA-shaped events; the suites' settings; the real-size specs."""

import importlib
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "train_step.py"
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


def _load_script(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))  # the script imports its helpers as benchmarks.*
    spec = importlib.util.spec_from_file_location("train_step_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _helpers(monkeypatch, name):
    monkeypatch.syspath_prepend(str(ROOT))
    return importlib.import_module(f"benchmarks.{name}")


def test_harness_runs_end_to_end_on_cpu(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(SCRIPT), "--model", "tiny-qwen", "--shape", "fixed", "--device", "cpu"]
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
    report = [sys.executable, str(SCRIPT), "report", "--write", str(page), str(out / "tiny-qwen_fixed_cpu.json")]
    run = subprocess.run(report, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    text = page.read_text()
    assert text.startswith("intro\n") and "\nmiddle\n" in text and text.endswith("end\n") and "old" not in text
    assert "### tiny-qwen, fixed shape (batch 2" in text and "| hf_bf16 |" in text
    assert "| tiny-qwen fixed `vlmtune_bf16` |" in text and "vision tower (projector excluded)" in text


def test_ratios_and_targets(monkeypatch):
    script = _helpers(monkeypatch, "train_step_report")

    def ok(name, tokens, memory):
        return {
            "config": name,
            "status": "ok",
            "tokens_per_s": tokens,
            "step_s": 1000 / tokens,
            "images_per_s": 1.0,
            "peak_alloc_gib": memory,
            "peak_reserved_gib": memory,
            "loss_first": 2.0,
            "loss_last": 1.0,
            "warmup_s": 10.0,
        }

    results = [
        ok("hf_qlora", 1000, 20.0),
        ok("hf_qlora_noupcast", 2000, 16.0),
        ok("unsloth", 2500, 8.0),
        ok("vlmtune_qlora_kernels", 4000, 8.0),
        {"config": "hf_qlora_liger", "status": "n/a", "reason": "liger-kernel is not importable"},
        ok("vlmtune_qlora_kernels_packed", 5000, 7.0),
    ]
    script.add_ratios(results)
    ours = results[3]["ratios"]
    assert ours["hf_qlora"]["tokens_per_s"] == pytest.approx(4.0)
    assert ours["hf_qlora_noupcast"]["peak_alloc_gib"] == pytest.approx(0.5)
    assert "ratios" not in results[4]
    lines = script.targets(results)
    assert any(line.strip().startswith("MET") and "÷ unsloth: 1.60" in line for line in lines)
    assert any(line.strip().startswith("MET") and "÷ hf_qlora: 0.40" in line for line in lines)
    assert any(
        line.strip().startswith("MET") and "packed ÷ padded (same samples per step): 1.25" in line for line in lines
    )
    assert "n/a: liger-kernel is not importable" in script.table(results)


class _Event:
    """A stand-in for the profiler's ``_KinetoEvent``: times in ms (stored in ns)."""

    def __init__(self, name, start_ms, end_ms, cuda=False, annotation=False, thread=1):
        self._name, self._start, self._end = name, int(start_ms * 1e6), int(end_ms * 1e6)
        self._cuda, self._annotation, self._thread = cuda, annotation, thread

    def name(self):
        return self._name

    def start_ns(self):
        return self._start

    def end_ns(self):
        return self._end

    def duration_ns(self):
        return self._end - self._start

    def device_type(self):
        import torch

        return torch.autograd.DeviceType.CUDA if self._cuda else torch.autograd.DeviceType.CPU

    def is_user_annotation(self):
        return self._annotation

    def start_thread_id(self):
        return self._thread


def test_profile_summary_of_cuda_events(monkeypatch):
    profile = _helpers(monkeypatch, "train_step_profile")
    ranges = {
        "step": (0, 1000),
        "forward": (10, 500),
        "vision tower": (20, 200),
        "projector": (150, 190),  # inside the vision tower, as Qwen-VL's merger
        "language tower": (250, 450),
        "loss/head": (450, 500),
        "backward": (510, 900),
        "optimizer": (910, 990),
    }
    events = [_Event("bench/" + name, *span, annotation=True) for name, span in ranges.items()]
    events += [
        _Event("bench/forward", 10, 500, cuda=True, annotation=True),  # Kineto's GPU mirror of a range: not work
        _Event("Optimizer.step#AdamW.step", 911, 989, annotation=True),  # a library's own range: not ours
        _Event("aten::mm", 30, 40),  # host operators do not count on CUDA
        _Event("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n", 30, 130, cuda=True),
        _Event("void kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>", 160, 180, cuda=True),
        _Event("void at::native::vectorized_elementwise_kernel<4, bfloat16_copy_kernel_cuda>", 220, 230, cuda=True),
        _Event("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128>>", 260, 310, cuda=True),
        _Event("_ce_chunk_kernel", 460, 490, cuda=True),
        _Event("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT", 520, 820, cuda=True),
        _Event("void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>", 920, 960, cuda=True),
        _Event("Memcpy HtoD (Pageable -> Device)", 1500, 1510, cuda=True),  # after the step
    ]
    summary = profile.summarise(events, cuda=True)
    parts = {p["part"]: p for p in summary["parts"]}
    wall = {name: p["wall_ms"] for name, p in parts.items()}
    assert wall == pytest.approx(
        {
            "vision tower": 140,
            "projector": 40,
            "forward": 60,
            "language tower": 200,
            "loss/head": 50,
            "backward": 390,
            "optimizer": 80,
            "step": 40,
        }
    )
    device = {name: p["device_ms"] for name, p in parts.items()}
    assert device == pytest.approx(
        {
            "vision tower": 100,
            "projector": 20,
            "forward": 10,
            "language tower": 50,
            "loss/head": 30,
            "backward": 300,
            "optimizer": 40,
            "step": 0,
        }
    )
    assert summary["step_ms"] == pytest.approx(1000) and summary["device_busy_ms"] == pytest.approx(550)
    assert summary["device_outside_step_ms"] == pytest.approx(10)
    assert summary["device_busy_share"] == pytest.approx(0.55) and parts["backward"]["share"] == pytest.approx(0.39)
    kinds = {k["kind"]: k["ms"] for k in summary["kinds"]}
    assert kinds == pytest.approx(
        {"dequantisation": 20, "attention": 50, "GEMM": 400, "copies/casts": 10, "other elementwise": 70}
    )
    assert summary["top_kernels"][0]["name"].startswith("nvjet") and summary["top_kernels"][0]["ms"] == 300


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("void kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>(float*, unsigned char*)", "dequantisation"),
        ("_dequantize_nf4_kernel", "dequantisation"),
        ("fmha_cutlassB_bf16_aligned_64x64_k128_sm80", "attention"),
        ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
        ("cutlass3x_sm90_tensorop_gemm_bf16", "GEMM"),
        ("aten::mm", "GEMM"),
        ("aten::_to_copy", "copies/casts"),
        ("Memset (Device)", "copies/casts"),
        ("void at::native::elementwise_kernel<128, 2, BroadcastOp>", "other elementwise"),
        ("_rms_norm_fwd_kernel", "other elementwise"),
    ],
)
def test_kernel_kinds(monkeypatch, name, kind):
    assert _helpers(monkeypatch, "train_step_profile").kernel_kind(name) == kind


def test_final_suite_settings(monkeypatch):
    script = _load_script(monkeypatch)
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


def test_real_size_qwen2_5_vl_3b_matches_the_release(monkeypatch):
    data = _helpers(monkeypatch, "train_step_data")
    spec = data.MODELS["qwen2_5_vl-3b"]
    # Qwen/Qwen2.5-VL-3B-Instruct config.json
    assert {k: spec.text[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads")} == {
        "hidden_size": 2048,
        "num_hidden_layers": 36,
        "num_attention_heads": 16,
    }
    assert (spec.text["num_key_value_heads"], spec.text["intermediate_size"], spec.text["vocab_size"]) == (
        2,
        11008,
        151936,
    )
    assert spec.top["tie_word_embeddings"] is True
    assert (spec.vision["hidden_size"], spec.vision["depth"], spec.vision["out_hidden_size"]) == (1280, 32, 2048)
    assert {"hf_bf16", "vlmtune_bf16", "vlmtune_bf16_kernels"} <= set(data.CONFIGS)


def _run_harness(tmp_path, model, shape, configs, steps=2):
    """The harness on the CPU at batch 2, no warm-up; the records by configuration and the data description."""
    out = tmp_path / "out"
    cmd = [sys.executable, str(SCRIPT), "--model", model, "--shape", shape, "--device", "cpu", "--configs", configs]
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


def test_packed_config_is_not_available_on_the_fixed_shape(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    worker = _helpers(monkeypatch, "train_step_worker")
    path = tmp_path / "steps.pt"
    torch.save({"batches": [{"input_ids": torch.ones(2, 3)}], "packed": None, "samples": [2], "images": [2]}, path)
    assert worker.Steps.load(path, packed=False).samples == [2]
    with pytest.raises(worker.NotAvailable, match="packing needs the real shape"):
        worker.Steps.load(path, packed=True)


@pytest.mark.parametrize(("name", "billions"), [("minicpmv2_6-8b", 8.10), ("minicpmv4_6-1.3b", 1.30)])
def test_real_size_specs_build_the_released_parameter_count(tmp_path, monkeypatch, name, billions):
    torch = pytest.importorskip("torch")
    data, checkpoints = _helpers(monkeypatch, "train_step_data"), _helpers(monkeypatch, "train_step_checkpoints")
    from vlmtune.tiny import build

    spec = data.MODELS[name]
    model_class, config, _ = checkpoints.REAL_BUILDERS[spec.family](spec, build(spec.family, tmp_path / "tiny"))
    with torch.device("meta"):
        model = model_class._from_config(config, dtype=torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, abs=0.01)


def test_real_size_minicpmv_specs_match_the_releases(monkeypatch):
    data = _helpers(monkeypatch, "train_step_data")
    old, new = data.MODELS["minicpmv2_6-8b"], data.MODELS["minicpmv4_6-1.3b"]
    # openbmb/MiniCPM-V-2_6: Qwen2-7B + SigLIP-400M, 64 queries per view, the last vision layer kept.
    assert (old.text["hidden_size"], old.text["num_hidden_layers"], old.text["num_key_value_heads"]) == (3584, 28, 4)
    assert (old.text["vocab_size"], old.top["query_num"], old.top["drop_vision_last_layer"]) == (151666, 64, False)
    # openbmb/MiniCPM-V-4.6: Qwen3.5-0.8B (3 DeltaNet layers to 1 full-attention layer) + SigLIP2-400M.
    assert (new.text["hidden_size"], new.text["num_hidden_layers"], new.text["head_dim"]) == (1024, 24, 256)
    assert new.text["layer_types"][:4] == ["linear_attention"] * 3 + ["full_attention"]
    assert new.top["insert_layer_id"] == 6 and new.top["downsample_mode"] == "16x"
    for spec in (old, new):
        assert (spec.vision["hidden_size"], spec.vision["num_hidden_layers"], spec.vision["patch_size"]) == (
            1152,
            27,
            14,
        )
    assert set(old.unsupported) == {"hf", "unsloth"} and not new.unsupported
    assert {"vlmtune_qlora_kernels_packed", "vlmtune_bf16_packed"} <= set(data.CONFIGS)


@pytest.mark.parametrize(
    ("fixed_gib", "per_sample_gib", "limits", "want", "most_probes"),
    [
        (6.0, 0.5, [24, 80], {"24GiB": 36, "80GiB": 128}, 6),  # linear: 2 probes + 2 per limit (80 hits the cap)
        (6.0, 0.7, [24, 80], {"24GiB": 25, "80GiB": 105}, 6),
        (30.0, 0.5, [24, 80], {"24GiB": 0, "80GiB": 100}, 12),  # the start itself does not fit in 24 GiB
    ],
)
def test_largest_batch_predicts_from_two_probes_then_verifies(
    monkeypatch, fixed_gib, per_sample_gib, limits, want, most_probes
):
    module = _load_script(monkeypatch)
    probes = []

    def probe(batch, limit):
        probes.append((batch, limit))
        peak = fixed_gib + per_sample_gib * batch
        return peak if peak <= limit else None

    assert module.largest_batch(probe, limits, start=8, cap=128) == want
    assert len(probes) <= most_probes


def test_largest_batch_recovers_when_memory_is_not_linear(monkeypatch):
    module = _load_script(monkeypatch)

    def probe(batch, limit):  # activations grow faster than linearly past 20 (e.g. a longer padded batch)
        peak = 4.0 + 0.5 * batch + (0.1 * (batch - 20) ** 2 if batch > 20 else 0.0)
        return peak if peak <= limit else None

    want = max(b for b in range(1, 129) if probe(b, 24) is not None)
    assert module.largest_batch(probe, [24], start=8, cap=128) == {"24GiB": want}


def test_max_batch_logs_each_probe_as_it_finishes(monkeypatch, tmp_path):
    """A search cut short (each probe reloads the model) must leave its probes behind, not only a final JSON."""
    module = _load_script(monkeypatch)
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
