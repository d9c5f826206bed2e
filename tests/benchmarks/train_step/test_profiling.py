"""benchmarks/train_step/profiling.py: the profile's arithmetic on CUDA-shaped events, and the kernel kinds."""

import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def profiling(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))  # benchmarks is not installed: it imports from the repository root
    return importlib.import_module("benchmarks.train_step.profiling")


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


def test_profile_summary_of_cuda_events(profiling):
    profile = profiling
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
def test_kernel_kinds(profiling, name, kind):
    assert profiling.kernel_kind(name) == kind
