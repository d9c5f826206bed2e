"""CPU smoke test of benchmarks/kernels.py (the kernels against their references; no timing asserted): every
case of the table builds at real-size names, the smoke cases run under the interpreter, and --tokens names rows."""

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "kernels.py"


def _load():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_kernels", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_table_covers_every_kernel_at_real_sizes():
    names = set(_load().cases(smoke=False))
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


def test_smoke_cases_run_kernel_and_reference():
    module = _load()
    for build in module.cases(smoke=True).values():
        kernel, reference = build(torch.device("cpu"), torch.float32)
        kernel()
        reference()


def test_only_and_tokens_select_and_name_rows():
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--only", "swiglu,dequant", "--tokens", "2048,4096"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)},
    ).stdout
    rows = [line.split("  ")[0].strip() for line in out.splitlines() if "ran in" in line]
    # Smoke sizes ignore the token count, but the rows are still named per count.
    assert rows == ["swiglu", "dequantize_nf4", "swiglu @ 4096", "dequantize_nf4 @ 4096"]
