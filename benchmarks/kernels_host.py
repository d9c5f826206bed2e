"""Where the host time of a standalone activation call goes: the Python wrapper against aten's autograd.

    python -m benchmarks.kernels_host            # on a CUDA machine; prints a table of median microseconds

Run from the repository root. ``benchmarks/kernel_ops.py`` times :func:`vlmtune.kernels.swiglu` at 2048 tokens
host-bound: its forward + backward is ~0.13-0.23 ms of GPU work, less than the host needs to queue it. This script
measures the host side alone, on tiny CUDA tensors (so the GPU is never the bottleneck), piece by piece:

- the whole forward + backward of the kernel, of the reference (``silu(g) * u``), of an autograd Function that
  does nothing but allocate its outputs, and of the harness alone (``ones_like`` + ``backward`` of a sum);
- inside the kernel's Function: ``gated_forward`` as the forward runs it and ``gated_backward`` as the autograd
  engine's device thread runs it, against the same calls made directly on the main thread;
- single launches: ``gated_forward`` (allocation + launch), ``torch.empty_like``, an aten ``silu`` and ``mul``.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from collections.abc import Callable

import torch

from vlmtune.kernels import gated_mlp


def _median_us(fn: Callable[[], object], reps: int = 3000, warmup: int = 300) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for i in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        if i % 64 == 0:
            torch.cuda.synchronize()  # keep the launch queue short
    torch.cuda.synchronize()
    return statistics.median(times) * 1e6


class _NoOp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return torch.empty_like(gate)

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        return torch.empty_like(gate), torch.empty_like(up)


_PIECES: dict[str, list[float]] = defaultdict(list)


class _Timed(torch.autograd.Function):
    """The kernel's Function with its launches timed where they run."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        start = time.perf_counter()
        y = gated_mlp.gated_forward(gate, up, "silu")
        _PIECES["gated_forward inside forward"].append(time.perf_counter() - start)
        return y

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        start = time.perf_counter()
        grads = gated_mlp.gated_backward(dy, gate, up, "silu")
        _PIECES["gated_backward inside backward"].append(time.perf_counter() - start)
        return grads


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("needs CUDA: the point is the host cost of CUDA launches")
    gate = torch.randn(8, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    up = torch.randn(8, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g, u = gate.detach(), up.detach()
    dy = torch.ones_like(g)

    def fwd_bwd(fn):
        def step():
            out = fn(gate, up)
            torch.autograd.backward([out], [torch.ones_like(out)])
            gate.grad = up.grad = None

        return step

    rows = {
        "reference silu(g) * u, fwd + bwd": fwd_bwd(gated_mlp.swiglu_reference),
        "swiglu kernel, fwd + bwd": fwd_bwd(gated_mlp.swiglu),
        "no-op autograd Function, fwd + bwd": fwd_bwd(_NoOp.apply),
        "harness alone (ones_like + backward of a sum)": fwd_bwd(lambda a, b: a.sum()),
        "gated_forward on the main thread": lambda: gated_mlp.gated_forward(g, u, "silu"),
        "gated_backward on the main thread": lambda: gated_mlp.gated_backward(dy, g, u, "silu"),
        "torch.empty_like": lambda: torch.empty_like(g),
        "aten silu (no grad)": lambda: torch.nn.functional.silu(g),
        "aten mul (no grad)": lambda: g * u,
    }
    results = {name: _median_us(fn) for name, fn in rows.items()}
    _median_us(fwd_bwd(_Timed.apply))
    results.update({name: statistics.median(v) * 1e6 for name, v in _PIECES.items()})
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; median host microseconds")
    for name, us in results.items():
        print(f"{name:48s} {us:8.2f}")


if __name__ == "__main__":
    main()
