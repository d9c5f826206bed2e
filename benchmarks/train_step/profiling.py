"""Where one training step's time goes: one step under ``torch.profiler``, split by part of the model and by
kernel kind.

``python -m benchmarks.train_step --profile`` has ``worker.py`` call :func:`profile_step` once, after a configuration's
timed steps: the hooks and synchronisations below exist only for that extra step and are removed after it, so
the timed figures are those of the plain loop.

Parts of the step (``PARTS``) are ``record_function`` ranges. The loop opens ``forward``, ``backward`` and
``optimizer`` (AdamW step + ``zero_grad``) itself; forward pre-/post-hooks on the modules the family's adapter
names (``adapter.towers``) open ``vision tower``, ``projector`` and ``language tower`` (``lm_head`` excluded),
and the language tower's post-hook opens ``loss/head``, which runs to the end of the model's forward: the
``lm_head`` and cross-entropy of the plain forward, or vlmtune's fused linear cross-entropy, which lives in the
patched top-level forward. Every range opens and closes after a device synchronisation, so a range's wall time
covers the device work it launched and each kernel falls inside the range that launched it; that serialises
host and device at ~10 boundaries, and the profiler adds host overhead per op, so the profiled step is slower
than the timed median (both are reported). Times are exclusive: ``vision tower`` excludes a projector that runs
inside it (Qwen-VL's merger), ``rest of forward`` is the model forward outside the towers and the loss
(embeddings, M-RoPE positions, merging image features into the sequence), ``rest of step`` the ``loss.item()``.

Device time: on CUDA, the profiler's kernels and memcpy / memset (``KERNEL_KINDS`` sorts them by name), each
attributed to the innermost range its start falls in; their sum is "GPU busy", to compare with the step's wall
time (a step whose GPU is busy for a fraction of its wall time is host-bound). On the CPU the same tables count
the operators' self time instead, so the harness runs anywhere; those figures only check the plumbing.
"""

from __future__ import annotations

import bisect
import contextlib
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

PARTS = (
    ("vision tower", "vision tower (projector excluded)"),
    ("projector", "projector"),
    ("forward", "rest of forward (embeddings, positions, image merge)"),
    ("language tower", "language tower"),
    ("loss/head", "loss/head (lm_head + cross-entropy)"),
    ("backward", "backward (all towers)"),
    ("optimizer", "optimizer (AdamW step + zero_grad)"),
    ("step", "rest of step (loss.item)"),
)
"""(range name, what its exclusive time holds), in the order the tables list them."""
_PREFIX = "bench/"  # record_function names are _PREFIX + range name, apart from the libraries' own ranges
KERNEL_KINDS = (
    # Order matters: flash / memory-efficient attention kernels also say "cutlass" or "sm90", and
    # bitsandbytes' 4-bit GEMV says "gemm"; the first kind whose pattern a (lower-cased) name holds wins.
    ("dequantisation", r"dequant|nf4"),
    ("attention", r"flash|fmha|attention|sdpa"),
    ("GEMM", r"gemm|gemv|cutlass|sm90|matmul|nvjet|cublas|aten::(mm|addmm|bmm|baddbmm)$"),
    # PyTorch's dtype casts are its copy kernels (bfloat16_copy_kernel_cuda ...); "broadcast" is no cast.
    ("copies/casts", r"copy|(?<!broad)cast|convert|memcpy|memset"),
)
OTHER_KIND = "other elementwise"
"""Every other kernel: elementwise ops, reductions, norms, RoPE, the optimizer, vlmtune's fused Triton ops."""
TOP_KERNELS = 12


def kernel_kind(name: str) -> str:
    """The kind of a CUDA kernel (or, on the CPU, an operator) by its name; ``OTHER_KIND`` when none fits."""
    lowered = name.lower()
    for kind, pattern in KERNEL_KINDS:
        if re.search(pattern, lowered):
            return kind
    return OTHER_KIND


# --------------------------------------------------------------------------------------------------- ranges


class StepRanges:
    """Named ``record_function`` ranges, nested as a stack, each opened and closed after a device sync."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self._open: list[tuple[str, torch.profiler.record_function]] = []
        self.calls: dict[str, int] = {}

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def is_open(self, name: str) -> bool:
        return any(open_name == name for open_name, _ in self._open)

    def open(self, name: str) -> None:
        self._sync()
        scope = torch.profiler.record_function(_PREFIX + name)
        scope.__enter__()
        self._open.append((name, scope))
        self.calls[name] = self.calls.get(name, 0) + 1

    def close(self, name: str) -> None:
        """Close ``name`` and whatever opened inside it and is still open (``loss/head`` inside ``forward``)."""
        if not self.is_open(name):
            return
        self._sync()
        while self._open:
            open_name, scope = self._open.pop()
            scope.__exit__(None, None, None)
            if open_name == name:
                return

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.open(name)
        try:
            yield
        finally:
            self.close(name)


def tower_modules(model: torch.nn.Module, adapter) -> dict[str, list[torch.nn.Module]]:
    """The modules of ``adapter.towers`` in ``model`` (a transformers model or a ``PeftModel`` around one).

    ``lm_head`` is left out of the language tower: its time belongs to ``loss/head``.
    """
    wanted = {
        "vision tower": adapter.towers["vision"],
        "projector": adapter.towers["projector"],
        "language tower": tuple(p for p in adapter.towers["language"] if p != "lm_head"),
    }
    found: dict[str, list[torch.nn.Module]] = {part: [] for part in wanted}
    for name, module in model.named_modules():
        # PeftModel prefixes the transformers names with "base_model.model."
        name = name.removeprefix("base_model.model.")
        for part, prefixes in wanted.items():
            if name in prefixes:
                found[part].append(module)
    return found


def hook_towers(model: torch.nn.Module, adapter, ranges: StepRanges) -> list[Any]:
    """Forward pre-/post-hooks that open and close the tower ranges; returns the handles to remove."""
    handles = []

    def opener(part: str) -> Callable:
        def pre_hook(module, args):
            # Checkpointed layers recompute in backward, but the towers' roots run once, in the forward.
            if ranges.is_open("forward"):
                ranges.open(part)

        return pre_hook

    def closer(part: str) -> Callable:
        def hook(module, args, output):
            ranges.close(part)
            if part == "language tower" and ranges.is_open("forward"):
                ranges.open("loss/head")  # closed with the forward

        return hook

    for part, modules in tower_modules(model, adapter).items():
        for module in modules:
            handles.append(module.register_forward_pre_hook(opener(part)))
            handles.append(module.register_forward_hook(closer(part), always_call=True))
    return handles


# -------------------------------------------------------------------------------------------------- summary


@dataclass
class _Interval:
    name: str
    start: int
    end: int
    exclusive: int = 0
    device: int = 0


def _intervals(events) -> list[_Interval]:
    """Our ranges as intervals (ns), with each one's exclusive time (its own minus its children's)."""
    names = {_PREFIX + name for name, _ in PARTS}
    found = [
        _Interval(e.name()[len(_PREFIX) :], e.start_ns(), e.end_ns())
        for e in events
        if e.is_user_annotation() and e.device_type() == torch.autograd.DeviceType.CPU and e.name() in names
    ]
    found.sort(key=lambda i: (i.start, -i.end))
    stack: list[_Interval] = []
    for interval in found:
        while stack and stack[-1].end <= interval.start:
            stack.pop()
        interval.exclusive = interval.end - interval.start
        if stack:
            stack[-1].exclusive -= interval.end - interval.start
        stack.append(interval)
    return found


def _cpu_self_times(events) -> list[tuple[str, int, int]]:
    """(name, start, self time) of every CPU operator: its time minus that of the operators it called."""
    by_thread: dict[int, list] = {}
    for e in events:
        if e.device_type() == torch.autograd.DeviceType.CPU and not e.is_user_annotation():
            by_thread.setdefault(e.start_thread_id(), []).append(e)
    out = []
    for ops in by_thread.values():
        ops.sort(key=lambda e: (e.start_ns(), -e.end_ns()))
        stack: list[list] = []  # [end, index into out]
        for e in ops:
            while stack and stack[-1][0] <= e.start_ns():
                stack.pop()
            if stack:
                out[stack[-1][1]][2] -= e.duration_ns()
            out.append([e.name(), e.start_ns(), e.duration_ns()])
            stack.append([e.end_ns(), len(out) - 1])
    return [(name, start, max(0, self_ns)) for name, start, self_ns in out]


def _device_work(events, cuda: bool) -> list[tuple[str, int, int]]:
    """(name, start, duration) in ns: the CUDA kernels and memcpy / memset, or the CPU operators' self times."""
    if not cuda:
        return _cpu_self_times(events)
    return [
        (e.name(), e.start_ns(), e.duration_ns())
        for e in events
        # Kineto mirrors every record_function range on the GPU timeline ("gpu_user_annotation"): not work.
        if e.device_type() == torch.autograd.DeviceType.CUDA and not e.is_user_annotation()
    ]


def summarise(events, cuda: bool, calls: dict[str, int] | None = None) -> dict[str, Any]:
    """The ``profile`` record of one profiled step from the profiler's raw events (``kineto_results.events()``)."""
    intervals = _intervals(events)
    steps = [i for i in intervals if i.name == "step"]
    if len(steps) != 1:
        raise ValueError(f"expected one 'step' range in the profile, found {len(steps)}")
    step = steps[0]
    starts = [i.start for i in intervals]
    kinds: dict[str, list[float]] = {kind: [0.0, 0] for kind, _ in KERNEL_KINDS}
    kinds[OTHER_KIND] = [0.0, 0]
    top: dict[str, list[float]] = {}
    outside = 0
    for name, start, duration in _device_work(events, cuda):
        if not step.start <= start < step.end:
            # Nothing runs around the step (synchronised before, profiler stopped after): much time here
            # would mean the GPU and host clocks of the trace disagree, and the attribution with them.
            outside += duration
            continue
        # Innermost range holding the start: the latest-starting interval before it that has not ended.
        index = bisect.bisect_right(starts, start) - 1
        while intervals[index].end <= start:
            index -= 1
        intervals[index].device += duration
        kind = kinds[kernel_kind(name)]
        kind[0], kind[1] = kind[0] + duration, kind[1] + 1
        entry = top.setdefault(name[:160], [0.0, 0])
        entry[0], entry[1] = entry[0] + duration, entry[1] + 1
    step_ms = (step.end - step.start) / 1e6
    busy_ms = sum(ns for ns, _ in kinds.values()) / 1e6
    parts = []
    for name, label in PARTS:
        mine = [i for i in intervals if i.name == name]
        wall_ms = sum(i.exclusive for i in mine) / 1e6
        device_ms = sum(i.device for i in mine) / 1e6
        parts.append(
            {
                "part": name,
                "label": label,
                "calls": len(mine),
                "wall_ms": wall_ms,
                "share": wall_ms / step_ms,
                "device_ms": device_ms,
            }
        )
    return {
        "status": "ok",
        "device_time": "CUDA kernels + memcpy/memset" if cuda else "CPU operators' self time",
        "step_ms": step_ms,
        "device_busy_ms": busy_ms,
        "device_busy_share": busy_ms / step_ms,
        "device_outside_step_ms": outside / 1e6,
        "parts": parts,
        "kinds": [
            {"kind": kind, "ms": ns / 1e6, "count": count, "share_of_busy": ns / 1e6 / busy_ms if busy_ms else 0.0}
            for kind, (ns, count) in kinds.items()
        ],
        "top_kernels": [
            {"name": name, "ms": ns / 1e6, "count": count}
            for name, (ns, count) in sorted(top.items(), key=lambda kv: -kv[1][0])[:TOP_KERNELS]
        ],
        "range_calls": dict(calls or {}),
    }


def profile_step(model: torch.nn.Module, adapter, device: str, run_step: Callable[[StepRanges], float]) -> dict:
    """Run ``run_step(ranges)`` once under ``torch.profiler`` with the tower hooks in place; the summary.

    ``run_step`` is the loop's own step taking ``ranges`` as its ``mark`` (see ``worker.train_step``).
    """
    cuda = device.startswith("cuda")
    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    ranges = StepRanges(device)
    handles = hook_towers(model, adapter, ranges)
    start = time.perf_counter()
    try:
        with torch.profiler.profile(activities=activities) as prof:
            with ranges("step"):
                loss = run_step(ranges)
    finally:
        for handle in handles:
            handle.remove()
    # The raw Kineto events: building the profiler's FunctionEvent tree takes minutes on a 7B step's ops.
    summary = summarise(prof.profiler.kineto_results.events(), cuda, ranges.calls)
    summary["loss"] = loss
    summary["profile_s"] = time.perf_counter() - start
    return summary
