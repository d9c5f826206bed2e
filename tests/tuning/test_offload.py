"""The asynchronous activation offload's bookkeeping, on the CPU with a mover that copies between CPU tensors.

The CUDA mover's stream rules need a GPU; what is checked here is what moves, in which order, and that backward
gets exactly the tensors forward saved (gradients bit-identical to a run without offload).
"""

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from vlmtune.tuning.offload import AsyncOffload


class HostMover:
    """Stands in for the CUDA mover: every tensor is eligible, copies are clones, each step is logged."""

    def __init__(self):
        self.log: list[tuple[str, int]] = []
        self.ids: dict[int, int] = {}

    def eligible(self, tensor):
        return True

    def to_host(self, tensor):
        host = tensor.detach().clone()
        self.ids[id(host)] = len(self.ids)
        self.log.append(("out", self.ids[id(host)]))
        return host

    def to_device(self, host, device):
        copy = host.clone()
        self.ids[id(copy)] = self.ids[id(host)]
        self.log.append(("back", self.ids[id(host)]))
        return copy

    def ready(self, tensor):
        self.log.append(("ready", self.ids[id(tensor)]))
        return tensor


class Stack(torch.nn.Module):
    """Checkpointed layers under a frozen input projection: the shape of a tower with checkpointing."""

    def __init__(self, width=32, layers=4):
        super().__init__()
        self.embed = torch.nn.Linear(width, width).requires_grad_(False)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(layers))

    def forward(self, x):
        h = self.embed(x)
        for layer in self.layers:
            h = checkpoint(lambda t, layer=layer: torch.tanh(layer(t)) + t, h, use_reentrant=False)
        return h.square().mean()


def _grads(model, x, hooks=None):
    model.zero_grad(set_to_none=True)
    if hooks is None:
        loss = model(x)
    else:
        with hooks:
            loss = model(x)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


def test_backward_gets_back_what_forward_saved():
    torch.manual_seed(0)
    model, x = Stack(), torch.randn(64, 32)
    plain_loss, plain = _grads(model, x)
    mover = HostMover()
    loss, offloaded = _grads(model, x, AsyncOffload(model, mover, min_bytes=0))
    assert torch.equal(loss, plain_loss)
    assert all(torch.equal(a, b) for a, b in zip(offloaded, plain, strict=True))
    out = [i for kind, i in mover.log if kind == "out"]
    # Each checkpointed layer's input, and the last output (saved by the loss's square); no weight moved.
    assert len(out) == 5
    assert sorted(i for kind, i in mover.log if kind == "ready") == out  # every one came back, once


def test_backward_fetches_the_next_input_while_it_works_on_this_one():
    model, x = Stack(layers=3), torch.randn(16, 32)
    mover = HostMover()
    _grads(model, x, AsyncOffload(model, mover, min_bytes=0))
    backward = [step for step in mover.log if step[0] != "out"]
    # Saved: 3 layer inputs (0-2), then the output the loss squares (3). Backward asks for them last to first,
    # and each time the one saved before leaves host memory before backward has used this one.
    assert backward == [
        ("back", 3), ("back", 2), ("ready", 3),
        ("back", 1), ("ready", 2),
        ("back", 0), ("ready", 1),
        ("ready", 0),
    ]  # fmt: skip


def test_parameters_and_small_tensors_stay_put():
    model = Stack(layers=2)
    hooks = AsyncOffload(model, HostMover(), min_bytes=1024)
    weight = model.layers[0].weight
    assert hooks.pack(weight) is weight and hooks.pack(weight.t()) is not None and hooks.pack(weight.t()).dim() == 2
    small = torch.randn(8)  # 32 bytes
    assert hooks.pack(small) is small and not hooks.saved
    large = torch.randn(512)  # 2 KiB
    index = hooks.pack(large)
    assert index == 0 and torch.equal(hooks.unpack(index), large)


@pytest.mark.gpu
def test_the_cuda_streams_give_backward_what_forward_saved():
    torch.manual_seed(0)
    model, x = Stack(width=1024, layers=6).cuda(), torch.randn(512, 1024, device="cuda")  # 2 MiB layer inputs
    plain_loss, plain = _grads(model, x)
    hooks = AsyncOffload(model)
    loss, offloaded = _grads(model, x, hooks)
    assert len(hooks.saved) == 7 and all(item.host.is_pinned() for item in hooks.saved)
    assert torch.equal(loss, plain_loss)
    assert all(torch.equal(a, b) for a, b in zip(offloaded, plain, strict=True))
    assert not hooks.mover.arrivals  # every copy back was waited for
