"""Launch a ``@triton.jit`` kernel for a few microseconds of host time instead of tens.

``kernel[grid](*args)`` binds the arguments, asks Triton's native code for their specialisation, builds a
cache key string, looks the compiled kernel up, builds launch metadata and calls the launch hooks: 20-50 us
of Python per launch on the H100 machines here, 2-3x an aten op's launch (``benchmarks/kernel_ops.py``'s host
column; BENCHMARKS.md). The training step calls our kernels thousands of times, and the small ones
(norms, RoPE, the gated MLP) cost less GPU time than that.

:func:`fast_launch` wraps a kernel so that ``kernel[grid](*args, **meta)`` keeps its meaning but, once a
specialisation has compiled, calls the compiled kernel's launcher directly. The cache key is computed here
and is at least as fine as Triton's own:

- per tensor, its dtype and whether its address is 16-byte aligned;
- per integer, whether it is 1, whether it is a multiple of 16 and whether it fits in 32 bits;
- per float, nothing (Triton passes it as an fp32 value); None and bools by value;
- every ``tl.constexpr`` and launch option by value, and the current device.

Plain parameters come positionally and constexprs by keyword at every call site here; any other call shape takes
Triton's path every time.

A new key goes through Triton's own path once, which compiles if needed and launches; its result is kept
only when it is a compiled kernel with a launcher. In ``TRITON_INTERPRET`` mode every call takes Triton's
path. Launch hooks (profilers such as proton) disable the shortcut while installed, so they see every launch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import triton
from packaging.version import Version

# Triton 3.4-3.8 (their jit.py, read) launch through `CompiledKernel.run(grid, stream, function, metadata, hooks,
# *every bound argument)` and keep their launch hooks in `triton.knobs`. Earlier releases have no knobs: they
# always take Triton's own path.
_DIRECT = Version(triton.__version__).release >= (3, 4)
if _DIRECT:
    from triton import knobs

_INT32 = (-(2**31), 2**31 - 1)


def _spec(value: Any) -> Any:
    """What Triton specialises a non-constexpr argument on (a superset of it)."""
    if isinstance(value, torch.Tensor):
        return value.dtype, value.data_ptr() % 16 == 0
    if isinstance(value, float):
        return float  # always an fp32 argument, never specialised (a loss scale changes every step)
    if isinstance(value, bool) or not isinstance(value, int):
        return type(value), value
    return int, value == 1, value % 16 == 0, _INT32[0] <= value <= _INT32[1]


def _hooks_installed() -> bool:
    hook = knobs.runtime.launch_enter_hook
    # Triton 3.5+ keeps a HookChain (empty by default); 3.4 keeps None or one callable.
    return hook is not None and bool(getattr(hook, "calls", True))


class FastLaunch:
    """``kernel[grid](*args, **meta)`` with the compiled launcher cached per specialisation.

    Args:
        kernel: a ``@triton.jit`` function; ``meta`` passes its ``tl.constexpr`` parameters and launch
            options (``num_warps``, ``enable_fp_fusion`` …) by keyword, the other parameters positionally.
    """

    def __init__(self, kernel: Any):
        self.kernel = kernel
        # The interpreter's functions (TRITON_INTERPRET=1) have no params: they always take Triton's path.
        params = getattr(kernel, "params", None) if _DIRECT else None
        self._constexpr = None if params is None else [p.is_constexpr for p in params]
        self._names = None if params is None else [p.name for p in params]
        # key -> (launcher, CUfunction, packed metadata, the parameters that come by keyword, in order)
        self._compiled: dict[tuple, tuple[Callable, Any, Any, list[str]]] = {}
        # number of positional arguments -> the names that must then come by keyword, or None when such a call
        # takes Triton's path (a constexpr passed positionally, a plain parameter by keyword, too many arguments)
        self._layouts: dict[int, frozenset[str] | None] = {}

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., None]:
        return lambda *args, **meta: self.launch(grid, args, meta)

    def _layout(self, n_args: int) -> frozenset[str] | None:
        constexpr = self._constexpr
        if n_args > len(constexpr) or any(constexpr[:n_args]) or not all(constexpr[n_args:]):
            return None
        return frozenset(self._names[n_args:])

    def _key(self, args: tuple, meta: dict[str, Any]) -> tuple | None:
        # Runs on every launch: kept to a few C-level operations per argument.
        n_args = len(args)
        if n_args not in self._layouts:
            self._layouts[n_args] = self._layout(n_args)
        by_keyword = self._layouts[n_args]
        if by_keyword is None or not by_keyword <= meta.keys():
            return None
        specs = tuple(
            [(v.dtype, v.data_ptr() % 16 == 0) if type(v) is torch.Tensor else _spec(v) for v in args]  # noqa: E721
        )
        # Every constexpr and launch option by value (num_warps, enable_fp_fusion ...), in the call's order. The
        # device without torch.cuda.current_device()'s Python: CUDA is initialised, the tensors are on it.
        return torch._C._cuda_getDevice(), specs, tuple(meta.items())

    def launch(self, grid: tuple[int, ...], args: tuple, meta: dict[str, Any]) -> None:
        """Launch on ``grid`` (1 to 3 ints; a callable grid takes Triton's path) on the current CUDA stream."""
        key = None if self._constexpr is None or callable(grid) or _hooks_installed() else self._key(args, meta)
        entry = None if key is None else self._compiled.get(key)
        if entry is None:
            compiled = self.kernel[grid](*args, **meta)
            if key is not None and all(hasattr(compiled, a) for a in ("run", "function", "packed_metadata")):
                names = self._names[len(args) :]
                self._compiled[key] = (compiled.run, compiled.function, compiled.packed_metadata, names)
            return
        run, function, packed_metadata, names = entry
        device = key[0]
        stream = torch._C._cuda_getCurrentRawStream(device)
        g1 = grid[1] if len(grid) > 1 else 1
        g2 = grid[2] if len(grid) > 2 else 1
        # The launcher takes every parameter in signature order, constexprs included (Triton's own call does).
        run(grid[0], g1, g2, stream, function, packed_metadata, None, None, None, *args, *[meta[n] for n in names])


def fast_launch(kernel: Any) -> FastLaunch:
    """Decorate a ``@triton.jit`` kernel (put it above ``@triton.jit``) so launches skip Triton's binder."""
    return FastLaunch(kernel)


def row_num_warps(block: int) -> int:
    """Warps of a row-wise kernel (norms) whose program holds ``block`` elements of a row."""
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4


def row_programs(n_rows: int, device: torch.device) -> int:
    """Programs of a persistent row-wise kernel: two per SM on CUDA (each loops over its rows), 4 on the CPU."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(n_rows, 2 * sms))
    return max(1, min(n_rows, 4))
