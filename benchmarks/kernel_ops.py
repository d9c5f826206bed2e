"""Time each Triton kernel against its pure-torch reference, forward + backward, at real model sizes.

    python -m benchmarks.kernel_ops            # on a CUDA machine: prints a table, writes
                                               # benchmarks/results/kernels_<device>.json
    python -m benchmarks.kernel_ops --smoke    # anywhere (CPU: Triton interpreter), tiny sizes, no timing
    python -m benchmarks.kernel_ops --only swiglu --profile $OUT   # also where the time goes, per case
    python -m benchmarks.kernel_ops --only swiglu,geglu --tokens 4096,8192   # other token counts
    python -m benchmarks.kernel_ops --only siglip --profile $OUT   # Gemma-3's vision tower ops (8 x 4096 patches)

Run from the repository root.

Each case runs forward and backward of the kernel and of the reference on the same inputs (the NF4
dequantisation, of a frozen weight, forward only). Four times each:

- ``*_ms`` (synced): the median of ``--reps`` runs after ``--warmup`` runs, each started on an idle GPU and
  waited for, measured with CUDA events: it includes the gaps where the GPU waits for Python to launch the next
  kernel, which dominate for the small memory-bound ops at 2048 tokens.
- ``*_queued_ms``: ``--reps`` runs queued back to back, one CUDA-event pair around all of them, divided by
  ``--reps``: how the op runs inside a training step, where the host runs ahead of the GPU (the way
  ``triton.testing.do_bench`` times a kernel). It is the larger of the GPU's time and the host's.
- ``*_host_ms``: the median time Python takes to queue one run (``time.perf_counter``; launches are
  asynchronous): what an op costs when the step is host-bound.
- ``*_gpu_ms``: the sum of the kernels' own durations from the profiler, averaged over ``--reps`` runs.

The ``siglip`` cases run at Gemma-3's vision shape whatever ``--tokens`` says: 8 images x 4096 patches, width
1152, MLP 4304, 16 heads of 72. ``siglip sdpa <backend>`` forces one SDPA backend (a backend that cannot run the
shape is reported and skipped); ``siglip sdpa default`` is what torch picks, and its ``--profile`` kernel table
names the kernel that ran (``flash_fwd`` / ``fmha_cutlass`` / ``cudnn``).

Peak memory is the allocator's peak above what the inputs already hold, for one forward + backward.

``--profile DIR`` writes, per case and side, ``<case>.<triton|reference>.txt``: the profiler's table of CUDA
kernels (which launches the GPU time goes to) and a ``cProfile`` listing of the host time of ``--reps`` runs
(which Python calls the host time goes to).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import re
import statistics
import time
import warnings
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import

import bitsandbytes.functional as bnbf  # noqa: E402

from vlmtune.kernels.fc_mlp import fc_mlp, fc_mlp_reference  # noqa: E402
from vlmtune.kernels.fused_linear_ce import (  # noqa: E402
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_reference,
)
from vlmtune.kernels.gated_mlp import geglu_tanh, geglu_tanh_reference, swiglu, swiglu_reference  # noqa: E402
from vlmtune.kernels.layer_norm import layer_norm, layer_norm_reference  # noqa: E402
from vlmtune.kernels.lora_linear import dequantize_nf4, lora_linear, lora_linear_reference  # noqa: E402
from vlmtune.kernels.lora_mlp import LoraProjection, lora_gated_mlp, lora_gated_mlp_reference  # noqa: E402
from vlmtune.kernels.rms_norm import rms_norm, rms_norm_reference  # noqa: E402
from vlmtune.kernels.rope import apply_mrope, apply_mrope_reference, apply_rope, apply_rope_reference  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
Step = Callable[[], None]


def _leaf(*shape, device, dtype, scale=1.0, grad=True):
    return (scale * torch.randn(*shape, device=device, dtype=torch.float32)).to(dtype).requires_grad_(grad)


def _fwd_bwd(fn, inputs: list[torch.Tensor], *args, **kwargs) -> Step:
    def step():
        out = fn(*args, **kwargs)
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        for t in inputs:
            t.grad = None

    return step


def _fwd_only(fn, *args) -> Step:
    def step():
        fn(*args)

    return step


def _dequant(out_f, in_f, device, dtype):
    """Forward only (the weight is frozen): the kernel against bitsandbytes' own CUDA dequantisation."""
    w = torch.randn(out_f, in_f, device=device, dtype=dtype) / in_f**0.5
    packed, state = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    return _fwd_only(dequantize_nf4, packed, state), _fwd_only(bnbf.dequantize_4bit, packed, state)


def _rms_norm(t, hidden, casting, device, dtype):
    x = _leaf(t, hidden, device=device, dtype=dtype)
    w = _leaf(hidden, device=device, dtype=dtype, scale=0.1, grad=False)  # LoRA training freezes norms
    offset = 1.0 if casting == "gemma" else 0.0
    return (
        _fwd_bwd(rms_norm, [x], x, w, 1e-6, offset, casting),
        _fwd_bwd(rms_norm_reference, [x], x, w, 1e-6, offset, casting),
    )


def _rope(t, n_q, n_k, head_dim, mrope, device, dtype):
    # Attention hands over (B, T, H, D) projections viewed as (B, H, T, D).
    q = _leaf(1, t, n_q, head_dim, device=device, dtype=dtype, grad=False).transpose(1, 2).requires_grad_(True)
    k = _leaf(1, t, n_k, head_dim, device=device, dtype=dtype, grad=False).transpose(1, 2).requires_grad_(True)
    leaves = [q, k]
    axes = (3,) if mrope else ()
    cos = torch.randn(*axes, 1, t, head_dim, device=device).to(dtype)
    sin = torch.randn(*axes, 1, t, head_dim, device=device).to(dtype)
    if mrope:
        section = [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]
        return (
            _fwd_bwd(apply_mrope, leaves, q, k, cos, sin, section),
            _fwd_bwd(apply_mrope_reference, leaves, q, k, cos, sin, section),
        )
    return _fwd_bwd(apply_rope, leaves, q, k, cos, sin), _fwd_bwd(apply_rope_reference, leaves, q, k, cos, sin)


def _gated(t, inter, kind, device, dtype):
    gate, up = _leaf(t, inter, device=device, dtype=dtype), _leaf(t, inter, device=device, dtype=dtype)
    kernel, reference = (swiglu, swiglu_reference) if kind == "swiglu" else (geglu_tanh, geglu_tanh_reference)
    return _fwd_bwd(kernel, [gate, up], gate, up), _fwd_bwd(reference, [gate, up], gate, up)


def _lora_nf4(t, in_f, out_f, rank, device, dtype):
    x = _leaf(t, in_f, device=device, dtype=dtype)
    w = torch.randn(out_f, in_f, device=device, dtype=dtype) / in_f**0.5
    packed, state = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    a = _leaf(rank, in_f, device=device, dtype=dtype, scale=in_f**-0.5)
    b = _leaf(out_f, rank, device=device, dtype=dtype, scale=0.01)
    args = (x, packed, state, None, a, b, 2.0)
    return _fwd_bwd(lora_linear, [x, a, b], *args), _fwd_bwd(lora_linear_reference, [x, a, b], *args)


def _lora_mlp(t, hidden, inter, rank, kind, device, dtype):
    """The gated MLP with LoRA on its three NF4 projections. ``kind`` "fused": :func:`lora_gated_mlp` against
    the reference; "unfused": the same reference against the kernels one by one (three ``lora_linear`` and the
    activation kernel), which is what the fusion saves; "frozen": :func:`lora_gated_mlp` over the NF4
    projections without LoRA (LoRA on the attention only), only ``x`` asking for a gradient."""
    activation = "silu" if inter == 18944 else "gelu_tanh"
    x = _leaf(t, hidden, device=device, dtype=dtype)
    leaves, projections = [x], []
    for out_f, in_f in ((inter, hidden), (inter, hidden), (hidden, inter)):
        w = torch.randn(out_f, in_f, device=device, dtype=dtype) / in_f**0.5
        packed, state = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
        if kind == "frozen":
            projections.append(LoraProjection(packed, state))
            continue
        a = _leaf(rank, in_f, device=device, dtype=dtype, scale=in_f**-0.5)
        b = _leaf(out_f, rank, device=device, dtype=dtype, scale=0.01)
        leaves += [a, b]
        projections.append(LoraProjection(packed, state, a, b, 2.0))

    def unfused(x, gate, up, down, activation):
        act = swiglu if activation == "silu" else geglu_tanh

        def project(inputs, p):
            return lora_linear(inputs, p.weight, p.quant_state, None, p.lora_A, p.lora_B, p.scale)

        return project(act(project(x, gate), project(x, up)), down)

    kernel = unfused if kind == "unfused" else lora_gated_mlp
    return (
        _fwd_bwd(kernel, leaves, x, *projections, activation),
        _fwd_bwd(lora_gated_mlp_reference, leaves, x, *projections, activation),
    )


def _layer_norm(t, hidden, device, dtype):
    x = _leaf(t, hidden, device=device, dtype=dtype)
    w = _leaf(hidden, device=device, dtype=dtype, scale=0.1, grad=False) + 1.0  # LoRA training freezes norms
    b = _leaf(hidden, device=device, dtype=dtype, scale=0.1, grad=False)
    return _fwd_bwd(layer_norm, [x], x, w, b, 1e-6), _fwd_bwd(layer_norm_reference, [x], x, w, b, 1e-6)


def _fc_mlp(t, hidden, inter, rank, kind, nf4, device, dtype):
    """SigLIP's MLP with LoRA r``rank`` on fc1 and fc2 over dense (the vision tower's default) or NF4 bases, fp32
    LoRA factors (vlmtune's default). ``kind`` "fused": :func:`fc_mlp` against the reference; "unfused": the same
    reference against two ``lora_linear`` kernels around torch's GELU (today's path without the fused op);
    "frozen": :func:`fc_mlp` without LoRA, only ``x`` asking for a gradient."""
    x = _leaf(t, hidden, device=device, dtype=dtype)
    leaves, parts = [x], []
    for out_f, in_f in ((inter, hidden), (hidden, inter)):
        w = torch.randn(out_f, in_f, device=device, dtype=dtype) / in_f**0.5
        state = None
        if nf4:
            w, state = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
        bias = 0.1 * torch.randn(out_f, device=device, dtype=dtype)
        if kind == "frozen":
            parts += [LoraProjection(w, state), bias]
            continue
        a = _leaf(rank, in_f, device=device, dtype=torch.float32, scale=in_f**-0.5)
        b = _leaf(out_f, rank, device=device, dtype=torch.float32, scale=0.01)
        leaves += [a, b]
        parts += [LoraProjection(w, state, a, b, 2.0), bias]

    def unfused(x, fc1, bias1, fc2, bias2, activation):
        def project(inputs, p, bias):
            return lora_linear(inputs, p.weight, p.quant_state, bias, p.lora_A, p.lora_B, p.scale)

        return project(torch.nn.functional.gelu(project(x, fc1, bias1), approximate="tanh"), fc2, bias2)

    kernel = unfused if kind == "unfused" else fc_mlp
    return (
        _fwd_bwd(kernel, leaves, x, *parts, "gelu_tanh"),
        _fwd_bwd(fc_mlp_reference, leaves, x, *parts, "gelu_tanh"),
    )


class Unavailable(RuntimeError):
    """A case this machine cannot run (an SDPA backend that rejects the shape): reported and skipped."""


def _sdpa(images, patches, heads, head_dim, backend, device, dtype):
    """Bidirectional attention without a mask, as SigLIP calls it: ``backend`` forced (or torch's own pick for
    "default"), against the memory-efficient backend (the math one would hold 8 x 16 x 4096² scores)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (
        _leaf(images, patches, heads, head_dim, device=device, dtype=dtype, grad=False).transpose(1, 2).requires_grad_()
        for _ in range(3)
    )
    scale = head_dim**-0.5
    backends = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
    }

    def attend(chosen):
        def run(q, k, v):
            if chosen is None:
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
            with sdpa_kernel([chosen]):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)

        return run

    step = _fwd_bwd(attend(backends.get(backend)), [q, k, v], q, k, v)
    try:
        step()
    except RuntimeError as error:  # "No available kernel": torch's warnings above it say why
        raise Unavailable(f"SDPA backend {backend!r} cannot run this shape: {error}") from error
    return step, _fwd_bwd(attend(SDPBackend.EFFICIENT_ATTENTION), [q, k, v], q, k, v)


def _fused_ce(t, hidden, vocab, softcap, device, dtype):
    h = _leaf(t, hidden, device=device, dtype=dtype)
    w = _leaf(vocab, hidden, device=device, dtype=dtype, scale=hidden**-0.5, grad=False)  # frozen lm_head
    labels = torch.randint(0, vocab, (t,), device=device)
    labels[: t // 2] = -100  # the prompt half carries no loss
    kwargs = {"softcap": softcap}
    return (
        _fwd_bwd(fused_linear_cross_entropy, [h], h, w, labels, **kwargs),
        _fwd_bwd(fused_linear_cross_entropy_reference, [h], h, w, labels, **kwargs),
    )


def cases(smoke: bool, t: int = 2048) -> dict[str, Callable]:
    """name -> builder(device, dtype) returning (kernel step, reference step). Real sizes: Qwen2.5-VL-7B
    (hidden 3584, intermediate 18944, vocab 152064) and Gemma-3-4B (2560, 10240, 262208), ``t`` tokens."""
    if smoke:
        return {
            "rms_norm llama": lambda d, dt: _rms_norm(7, 48, "llama", d, dt),
            "rms_norm gemma": lambda d, dt: _rms_norm(7, 48, "gemma", d, dt),
            "rope": lambda d, dt: _rope(7, 4, 2, 32, False, d, dt),
            "mrope": lambda d, dt: _rope(7, 4, 2, 32, True, d, dt),
            "swiglu": lambda d, dt: _gated(7, 96, "swiglu", d, dt),
            "geglu_tanh": lambda d, dt: _gated(7, 96, "geglu_tanh", d, dt),
            "dequantize_nf4": lambda d, dt: _dequant(96, 64, d, dt),
            "lora_linear nf4": lambda d, dt: _lora_nf4(7, 64, 96, 4, d, dt),
            "lora_gated_mlp nf4": lambda d, dt: _lora_mlp(7, 64, 96, 4, "fused", d, dt),
            "frozen gated_mlp nf4": lambda d, dt: _lora_mlp(7, 64, 96, 4, "frozen", d, dt),
            "fused_linear_ce": lambda d, dt: _fused_ce(7, 48, 100, None, d, dt),
            "fused_linear_ce softcap": lambda d, dt: _fused_ce(7, 48, 100, 30.0, d, dt),
            "siglip layer_norm": lambda d, dt: _layer_norm(37, 72, d, dt),
            "siglip fc_mlp": lambda d, dt: _fc_mlp(37, 72, 130, 4, "fused", False, d, dt),
            "siglip fc_mlp nf4": lambda d, dt: _fc_mlp(37, 64, 128, 4, "fused", True, d, dt),
            "siglip unfused fc_mlp": lambda d, dt: _fc_mlp(37, 72, 130, 4, "unfused", False, d, dt),
            "siglip frozen fc_mlp": lambda d, dt: _fc_mlp(37, 72, 130, 4, "frozen", False, d, dt),
        }
    siglip = 8 * 4096  # Gemma-3: 8 images of 4096 patches, whatever `t` is
    return {
        "rms_norm llama 3584": lambda d, dt: _rms_norm(t, 3584, "llama", d, dt),
        "rms_norm gemma 2560": lambda d, dt: _rms_norm(t, 2560, "gemma", d, dt),
        "rope 28/4 x 128": lambda d, dt: _rope(t, 28, 4, 128, False, d, dt),
        "mrope 28/4 x 128": lambda d, dt: _rope(t, 28, 4, 128, True, d, dt),
        "rope 8/4 x 256 (gemma)": lambda d, dt: _rope(t, 8, 4, 256, False, d, dt),
        "swiglu 18944": lambda d, dt: _gated(t, 18944, "swiglu", d, dt),
        "geglu_tanh 10240": lambda d, dt: _gated(t, 10240, "geglu_tanh", d, dt),
        "dequantize_nf4 18944x3584 (fwd)": lambda d, dt: _dequant(18944, 3584, d, dt),
        "dequantize_nf4 10240x2560 (fwd)": lambda d, dt: _dequant(10240, 2560, d, dt),
        "lora_linear nf4 3584->18944 r16": lambda d, dt: _lora_nf4(t, 3584, 18944, 16, d, dt),
        "lora_linear nf4 2560->10240 r16": lambda d, dt: _lora_nf4(t, 2560, 10240, 16, d, dt),
        "lora_gated_mlp nf4 3584/18944 r16": lambda d, dt: _lora_mlp(t, 3584, 18944, 16, "fused", d, dt),
        "lora_gated_mlp nf4 2560/10240 r16": lambda d, dt: _lora_mlp(t, 2560, 10240, 16, "fused", d, dt),
        "unfused kernels nf4 3584/18944 r16": lambda d, dt: _lora_mlp(t, 3584, 18944, 16, "unfused", d, dt),
        "unfused kernels nf4 2560/10240 r16": lambda d, dt: _lora_mlp(t, 2560, 10240, 16, "unfused", d, dt),
        "frozen gated_mlp nf4 3584/18944": lambda d, dt: _lora_mlp(t, 3584, 18944, 16, "frozen", d, dt),
        "frozen gated_mlp nf4 2560/10240": lambda d, dt: _lora_mlp(t, 2560, 10240, 16, "frozen", d, dt),
        "fused_linear_ce 3584 x 152064": lambda d, dt: _fused_ce(t, 3584, 152064, None, d, dt),
        "fused_linear_ce 2560 x 262208 cap": lambda d, dt: _fused_ce(t, 2560, 262208, 30.0, d, dt),
        "siglip layer_norm 1152": lambda d, dt: _layer_norm(siglip, 1152, d, dt),
        "siglip fc_mlp 1152/4304 r16": lambda d, dt: _fc_mlp(siglip, 1152, 4304, 16, "fused", False, d, dt),
        "siglip unfused fc_mlp 1152/4304 r16": lambda d, dt: _fc_mlp(siglip, 1152, 4304, 16, "unfused", False, d, dt),
        "siglip frozen fc_mlp 1152/4304": lambda d, dt: _fc_mlp(siglip, 1152, 4304, 16, "frozen", False, d, dt),
        "siglip fc_mlp nf4 1152/4304 r16": lambda d, dt: _fc_mlp(siglip, 1152, 4304, 16, "fused", True, d, dt),
        **{
            f"siglip sdpa {backend} 16 x 72": lambda d, dt, b=backend: _sdpa(8, 4096, 16, 72, b, d, dt)
            for backend in ("default", "flash", "efficient", "cudnn")
        },
    }


def _time_ms(step: Step, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _queued_ms(step: Step, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def _host_ms(step: Step, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(times)


def _cuda_profile(step: Step, reps: int) -> torch.profiler.profile:
    """The profiler's record of ``reps`` runs, CUDA activity only."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Profiler clears events at the end of each cycle"
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                step()
            torch.cuda.synchronize()
    return prof


def _gpu_ms(step: Step, reps: int) -> float:
    return sum(e.self_device_time_total for e in _cuda_profile(step, reps).key_averages()) / 1e3 / reps


def _profile(step: Step, reps: int, path: Path) -> None:
    """Write the CUDA kernels' table and the host's cProfile listing of ``reps`` runs to ``path``."""
    prof = _cuda_profile(step, reps)
    kernels = prof.key_averages().table(sort_by="self_device_time_total", row_limit=25)
    profiler = cProfile.Profile()
    torch.cuda.synchronize()
    profiler.enable()
    for _ in range(reps):
        step()
    profiler.disable()
    torch.cuda.synchronize()
    listing = io.StringIO()
    pstats.Stats(profiler, stream=listing).sort_stats("tottime").print_stats(30)
    path.write_text(f"# CUDA kernels, {reps} runs\n{kernels}\n# host, {reps} runs (cProfile)\n{listing.getvalue()}")


def _peak_mib(step: Step) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one untimed run (CPU is fine)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument(
        "--only", default="", help="run the cases whose name contains one of these comma-separated texts"
    )
    parser.add_argument(
        "--tokens", default="2048", help="comma-separated token counts; rows other than 2048 are named '@ N'"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON record")
    parser.add_argument("--profile", type=Path, default=None, help="also write per-case profiles to this folder")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    rows = []
    if cuda:
        header = ("op (triton vs reference)", "synced ms", "", "queued ms", "", "host ms", "", "gpu ms", "")
        cells = "".join(f" {h:>15s} {x:6s}" for h, x in zip(header[1::2], header[2::2], strict=True))
        print(f"{header[0]:34s}{cells}")
    tokens = [int(t) for t in args.tokens.split(",")]
    builders = {
        name if t == 2048 else f"{name} @ {t}": build
        for t in tokens
        for name, build in cases(args.smoke, t).items()
        if any(part in name for part in args.only.split(","))
    }
    for name, build in builders.items():
        try:
            kernel, reference = build(device, dtype)
        except Unavailable as error:
            print(f"{name:34s} skipped: {error}")
            continue
        if not cuda:
            start = time.perf_counter()
            kernel()
            reference()
            print(f"{name:36s} ran in {time.perf_counter() - start:.2f}s (untimed: no CUDA)")
            continue
        row = {
            "op": name,
            "triton_ms": _time_ms(kernel, args.warmup, args.reps),
            "reference_ms": _time_ms(reference, args.warmup, args.reps),
            "triton_queued_ms": _queued_ms(kernel, args.warmup, args.reps),
            "reference_queued_ms": _queued_ms(reference, args.warmup, args.reps),
            "triton_host_ms": _host_ms(kernel, args.warmup, args.reps),
            "reference_host_ms": _host_ms(reference, args.warmup, args.reps),
            "triton_gpu_ms": _gpu_ms(kernel, args.reps),
            "reference_gpu_ms": _gpu_ms(reference, args.reps),
            "triton_peak_mib": _peak_mib(kernel),
            "reference_peak_mib": _peak_mib(reference),
        }
        if args.profile is not None:
            args.profile.mkdir(parents=True, exist_ok=True)
            stem = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")
            _profile(kernel, args.reps, args.profile / f"{stem}.triton.txt")
            _profile(reference, args.reps, args.profile / f"{stem}.reference.txt")
        for kind in ("", "queued_", "host_", "gpu_"):
            row[f"{kind}speedup"] = row[f"reference_{kind}ms"] / row[f"triton_{kind}ms"]
        rows.append(row)
        cells = "".join(
            f" {row[f'triton_{kind}ms']:7.3f} {row[f'reference_{kind}ms']:7.3f} x{row[f'{kind}speedup']:5.2f}"
            for kind in ("", "queued_", "host_", "gpu_")
        )
        print(f"{name:34s}{cells}  peak MiB {row['triton_peak_mib']:.0f} / {row['reference_peak_mib']:.0f}")
        del kernel, reference
        torch.cuda.empty_cache()
    if not cuda or args.smoke:
        return
    gpu = torch.cuda.get_device_name()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"kernels_{re.sub(r'[^A-Za-z0-9]+', '_', gpu).strip('_').lower()}.json"
    meta = {
        "device": gpu,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "python": platform.python_version(),
        "dtype": str(dtype),
        "tokens": tokens,
        "timing": f"{args.reps} forward+backward runs after {args.warmup} warm-up: synced (median, CUDA events), "
        "queued (mean of back-to-back runs), host (median perf_counter), gpu (profiler kernel time)",
    }
    path.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
