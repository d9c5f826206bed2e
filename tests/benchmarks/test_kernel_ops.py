"""CPU smoke test of benchmarks/kernel_ops.py (the kernels against their references; no timing asserted): every
case of the table builds at real-size names, the smoke cases run under the interpreter, and --tokens names rows."""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def kernel_ops(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))  # benchmarks is not installed: it imports from the repository root
    return importlib.import_module("benchmarks.kernel_ops")


def test_table_covers_every_kernel_at_real_sizes(kernel_ops):
    names = set(kernel_ops.cases(smoke=False))
    for expected in (
        "rms_norm llama 3584",
        "rms_norm gemma 2560",
        "mrope 28/4 x 128",
        "swiglu 18944",
        "geglu_tanh 10240",
        "dequantize_nf4 18944x3584 (fwd)",
        "lora_linear nf4 3584->18944 r16",
        "lora_gated_mlp nf4 2560/10240 r16",
        "frozen gated_mlp nf4 3584/18944",
        "fused_linear_ce 2560 x 262208 cap",
    ):
        assert expected in names


def test_smoke_cases_run_kernel_and_reference(kernel_ops):
    for build in kernel_ops.cases(smoke=True).values():
        kernel, reference = build(torch.device("cpu"), torch.float32)
        kernel()
        reference()


def test_only_and_tokens_select_and_name_rows():
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.kernel_ops", "--smoke", "--only", "swiglu,dequant", "--tokens", "2048,4096"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,  # as users run it: from the repository root
        env={**os.environ, "TRITON_INTERPRET": "1"},
    ).stdout
    rows = [line.split("  ")[0].strip() for line in out.splitlines() if "ran in" in line]
    # Smoke sizes ignore the token count, but the rows are still named per count.
    assert rows == ["swiglu", "dequantize_nf4", "swiglu @ 4096", "dequantize_nf4 @ 4096"]
