from dataclasses import dataclass

import pytest
import torch
import triton
import triton.language as tl
from triton import knobs

from vlmtune.kernels import launch
from vlmtune.kernels.launch import FastLaunch, fast_launch


@dataclass
class _Param:
    name: str
    is_constexpr: bool


class _Compiled:
    """Stands in for triton's CompiledKernel: records what its launcher receives."""

    def __init__(self, log, serial):
        self.log, self.function, self.packed_metadata = log, f"cufunction{serial}", "packed"

    def run(self, g0, g1, g2, stream, function, packed, metadata, enter_hook, exit_hook, *args):
        self.log.append(("direct", function, (g0, g1, g2), stream, (metadata, enter_hook, exit_hook), args))


class _Kernel:
    """Stands in for a JITFunction ``k(x_ptr, y_ptr, n, scale, BLOCK: constexpr, EVEN: constexpr)``."""

    params = [_Param(n, c) for n, c in [("x", 0), ("y", 0), ("n", 0), ("scale", 0), ("BLOCK", 1), ("EVEN", 1)]]

    def __init__(self, compiles=True):
        self.log, self.compiles = [], compiles

    def __getitem__(self, grid):
        def call(*args, **meta):
            self.log.append(("triton", grid, args, meta))
            return _Compiled(self.log, len(self.log)) if self.compiles else None

        return call


@pytest.fixture
def fake_cuda(monkeypatch):
    monkeypatch.setattr(torch._C, "_cuda_getDevice", lambda: 0, raising=False)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 1000 + device, raising=False)


def _kinds(kernel):
    return [entry[0] for entry in kernel.log]


def test_second_launch_of_a_specialisation_calls_the_launcher_with_every_parameter_in_order(fake_cuda):
    kernel = _Kernel()
    fast = FastLaunch(kernel)
    x, y = torch.zeros(64), torch.zeros(64)
    fast[(4,)](x, y, 64, 0.5, EVEN=True, BLOCK=16, num_warps=4)
    fast[(4, 2)](x, y, 64, 0.5, EVEN=True, BLOCK=16, num_warps=4)
    assert _kinds(kernel) == ["triton", "direct"]
    assert kernel.log[0][1:] == ((4,), (x, y, 64, 0.5), {"EVEN": True, "BLOCK": 16, "num_warps": 4})
    _, function, grid, stream, hooks, args = kernel.log[1]
    assert (function, grid, stream, hooks) == ("cufunction1", (4, 2, 1), 1000, (None, None, None))
    # Constexprs follow the signature's order (BLOCK before EVEN), not the call's; options are not arguments.
    assert args == (x, y, 64, 0.5, 16, True)


@pytest.mark.parametrize(
    "change",
    [
        {"n": 65},  # no longer a multiple of 16
        {"n": 1},  # Triton makes 1 a constant
        {"n": 2**31},  # no longer fits in int32
        {"x": "misaligned"},  # the address is 4 bytes off 16
        {"x": "bf16"},  # another dtype
        {"BLOCK": 32},  # another constexpr
        {"num_warps": 8},  # another option
    ],
)
def test_a_new_specialisation_goes_through_triton_again(fake_cuda, change):
    kernel = _Kernel()
    fast = FastLaunch(kernel)
    base = torch.zeros(80)
    call = {"x": base[:64], "y": torch.zeros(64), "n": 64, "BLOCK": 16, "num_warps": 4}
    fast[(1,)](call["x"], call["y"], call["n"], 0.5, BLOCK=call["BLOCK"], EVEN=False, num_warps=call["num_warps"])
    new = {**call, **change}
    if new["x"] == "misaligned":
        new["x"] = base[1:65]
    elif new["x"] == "bf16":
        new["x"] = torch.zeros(64, dtype=torch.bfloat16)
    for _ in range(2):
        fast[(1,)](new["x"], new["y"], new["n"], 0.5, BLOCK=new["BLOCK"], EVEN=False, num_warps=new["num_warps"])
    assert _kinds(kernel) == ["triton", "triton", "direct"]
    assert kernel.log[2][1] == "cufunction2"  # the kernel compiled for the new specialisation


def test_what_triton_does_not_specialise_on_reuses_the_launcher(fake_cuda):
    kernel = _Kernel()
    fast = FastLaunch(kernel)
    x = torch.zeros(128)
    fast[(1,)](x[:64], x[64:], 48, 0.5, BLOCK=16, EVEN=False)
    # Another aligned address, another multiple of 16, another float value: the same compiled kernel.
    fast[(1,)](x[4:68], x[:64], 32, 0.25, BLOCK=16, EVEN=False)
    assert _kinds(kernel) == ["triton", "direct"]
    assert kernel.log[1][-1][2:4] == (32, 0.25)


def test_launch_hooks_and_the_interpreter_keep_tritons_path(fake_cuda):
    x = torch.zeros(64)
    uncompiled = _Kernel(compiles=False)  # the interpreter's launch returns no compiled kernel
    no_params = _Kernel()
    no_params.params = None  # the interpreter's InterpretedFunction has no params
    for kernel in (uncompiled, no_params):
        fast = FastLaunch(kernel)
        for _ in range(3):
            fast[(1,)](x, x, 64, 1.0, BLOCK=16, EVEN=True)
        assert _kinds(kernel) == ["triton"] * 3

    hooked = _Kernel()
    fast = FastLaunch(hooked)
    fast[(1,)](x, x, 64, 1.0, BLOCK=16, EVEN=True)
    assert not launch._hooks_installed()

    def hook(metadata):
        return None

    knobs.runtime.launch_enter_hook.add(hook)  # a profiler such as proton installs one
    try:
        assert launch._hooks_installed()
        fast[(1,)](x, x, 64, 1.0, BLOCK=16, EVEN=True)
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    fast[(1,)](x, x, 64, 1.0, BLOCK=16, EVEN=True)
    assert _kinds(hooked) == ["triton", "triton", "direct"]


def test_a_callable_grid_and_an_older_triton_are_left_to_triton(fake_cuda, monkeypatch):
    x = torch.zeros(64)
    kernel = _Kernel()
    fast = FastLaunch(kernel)
    for _ in range(2):
        fast[lambda meta: (1,)](x, x, 64, 1.0, BLOCK=16, EVEN=True)
    assert _kinds(kernel) == ["triton", "triton"]
    monkeypatch.setattr(launch, "_DIRECT", False)  # Triton < 3.4: no knobs, another launcher call
    old = _Kernel()
    fast = FastLaunch(old)
    for _ in range(2):
        fast[(1,)](x, x, 64, 1.0, BLOCK=16, EVEN=True)
    assert _kinds(old) == ["triton", "triton"]


def test_a_positional_constexpr_is_left_to_triton(fake_cuda):
    kernel = _Kernel()
    fast = FastLaunch(kernel)
    x = torch.zeros(64)
    for _ in range(2):
        fast[(1,)](x, x, 64, 1.0, 16, EVEN=True)
    assert _kinds(kernel) == ["triton", "triton"]


@fast_launch
@triton.jit
def _double_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, 2 * tl.load(x_ptr + offs, mask=mask), mask=mask)


def _double(x):
    y = torch.empty_like(x)
    _double_kernel[(triton.cdiv(x.numel(), 32),)](x, y, x.numel(), BLOCK=32)
    return y


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_real_kernel_stays_correct_across_specialisations(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if device == "cpu" and not knobs.runtime.interpret:
        pytest.skip("Triton runs on the CPU only under TRITON_INTERPRET=1")
    base = torch.arange(200, dtype=torch.float32, device=device)
    # aligned / 64 elements, aligned again (same kernel), misaligned, odd length, aligned again
    for x in (base[:64], base[8:72], base[1:65], base[4:101], base[:64]):
        torch.testing.assert_close(_double(x), 2 * x, rtol=0, atol=0)
    if device == "cuda":
        assert len(_double_kernel._compiled) == 3  # (aligned, n % 16 == 0), (misaligned, ...), (aligned, odd n)
