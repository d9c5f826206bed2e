"""Which ``scaled_dot_product_attention`` backend runs at the vision towers' head dims, and how fast each one is.

    python -m benchmarks.sdpa_backends --out $OUT      # on a CUDA machine: prints a table, writes sdpa_backends.json

Run from the repository root. Gemma-3's and MiniCPM-V's SigLIP use head dim 72 (1152 / 16), Qwen2.5-VL's ViT 80
(1280 / 16); neither is a power of two, which rules some kernels out. For each shape (batch, heads, sequence,
head dim) the case runs forward and forward + backward, unmasked, in bf16, once with the backend torch picks by
itself (``default``) and once forced to each backend (``torch.nn.attention.sdpa_kernel``): the mean of
``--reps`` runs queued back to back after a warm-up, and the names of the attention kernels the profiler saw, so
the record says which backend ``default`` is. A backend that cannot run a shape records the reason.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

SHAPES = (
    (8, 16, 4096, 72),  # Gemma-3-4B: 8 images of 896x896 = 64x64 patches of 14 px
    (1, 16, 16384, 72),  # the same patches as one long sequence
    (8, 16, 1024, 80),  # Qwen2.5-VL-7B's ViT at 448x448 (32x32 patches), one sequence per image
)
BACKENDS = {
    "default": None,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}
_ATTENTION_KERNEL = ("attention", "fmha", "flash", "sdpa")


def _mean_ms(fn, reps: int) -> float:
    """Milliseconds per run of ``reps`` runs queued back to back (as in a training step), synchronised around."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / reps


def measure(shape: tuple[int, int, int, int], backend: SDPBackend | None, reps: int) -> dict:
    """Forward and forward + backward milliseconds of one shape under one backend, and its kernels' names."""
    q, k, v = (torch.randn(*shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))

    def forward():
        F.scaled_dot_product_attention(q, k, v)

    def forward_backward():
        F.scaled_dot_product_attention(q, k, v).sum().backward()

    with sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext():
        for _ in range(3):
            forward_backward()
        record = {"forward_ms": _mean_ms(forward, reps), "forward_backward_ms": _mean_ms(forward_backward, reps)}
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            forward_backward()
            torch.cuda.synchronize()
    names = {e.name for e in prof.events() if any(word in e.name.lower() for word in _ATTENTION_KERNEL)}
    record["kernels"] = sorted(name[:100] for name in names)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sdpa_backends", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results", help="folder of sdpa_backends.json")
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    results = {}
    for shape in SHAPES:
        for name, backend in BACKENDS.items():
            key = "x".join(map(str, shape)) + "/" + name
            try:
                results[key] = measure(shape, backend, args.reps)
            except RuntimeError as err:  # the backend refuses this shape, head dim or device
                results[key] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
            row = results[key]
            timing = f"{row['forward_ms']:.2f} / {row['forward_backward_ms']:.2f} ms" if "forward_ms" in row else row
            print(f"{key:32s} {timing} {row.get('kernels', '')}", flush=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sdpa_backends.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
