"""Activations saved for backward, kept in pinned CPU memory and copied off and back beside the compute.

With checkpointing, the tensors saved outside the checkpointed layers are each layer's input (Gemma-3-4B, batch 8:
27 SigLIP inputs of 75 MB and 34 decoder inputs of 17 MB, 2.75 GiB in all). ``torch.autograd.graph.save_on_cpu``
moves them, but its copy off the GPU waits for the device (the host stalls at every layer and the GPU queue runs
dry) and its copy back runs on the compute stream when backward asks for the tensor (the GPU waits for it).
:class:`AsyncOffload` instead copies each tensor out on a side stream as soon as the compute stream has made it,
and in backward copies the next one back (the tensor saved just before, which backward needs next) while the
current layer's backward runs.

The stream rules: the side stream waits for the compute stream before reading a tensor; the tensor is marked used
by the side stream (``record_stream``) so its memory is not handed out again before the copy ends; a tensor copied
back lives in the compute stream's memory, and the compute stream waits for that one copy (an event) before
reading it. Parameters and
buffers (a frozen weight that an op saved) and tensors under ``min_bytes`` stay where they are.
"""

from __future__ import annotations

import dataclasses

import torch

MIN_BYTES = 1 << 20
"""Smaller saved tensors stay on the GPU: their copies would cost more in launches than they free."""


@dataclasses.dataclass
class _Offloaded:
    """One saved tensor in host memory; ``device_copy`` once it is on its way back."""

    host: torch.Tensor
    device: torch.device
    device_copy: torch.Tensor | None = None


class Mover:
    """Copies between the GPU and pinned host memory on a side stream (the CUDA implementation).

    A copy back is written into memory of the compute stream's pool (after the compute stream's earlier work,
    which may still be using that block), and the compute stream waits for that copy alone (its event), not for
    the side stream's later work: the next copy back, queued right after, runs beside this layer's backward.
    """

    def __init__(self):
        self.stream = torch.cuda.Stream()
        self.arrivals: dict[int, torch.cuda.Event] = {}  # id of a copy back -> its copy's end

    def eligible(self, tensor: torch.Tensor) -> bool:
        return tensor.is_cuda

    def to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream(tensor.device))
        with torch.cuda.stream(self.stream):
            host.copy_(tensor, non_blocking=True)
        tensor.record_stream(self.stream)
        return host

    def to_device(self, host: torch.Tensor, device: torch.device) -> torch.Tensor:
        copy = torch.empty(host.shape, dtype=host.dtype, device=device)
        self.stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(self.stream):
            copy.copy_(host, non_blocking=True)
            arrived = torch.cuda.Event()
            arrived.record(self.stream)
        self.arrivals[id(copy)] = arrived
        return copy

    def ready(self, tensor: torch.Tensor) -> torch.Tensor:
        torch.cuda.current_stream(tensor.device).wait_event(self.arrivals.pop(id(tensor)))
        return tensor


class AsyncOffload(torch.autograd.graph.saved_tensors_hooks):
    """Saved-tensor hooks for one forward: large activations go to host memory, and come back one ahead.

    Args:
        model: its parameters and buffers are never moved.
        mover: how tensors travel (default :class:`Mover`, CUDA; tests pass one that copies between CPU tensors).
        min_bytes: smaller tensors stay put.
    """

    def __init__(self, model: torch.nn.Module, mover: Mover | None = None, min_bytes: int = MIN_BYTES):
        self.mover = mover or Mover()
        self.min_bytes = min_bytes
        self.kept = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        self.saved: list[_Offloaded] = []  # in the order forward saved them
        super().__init__(self.pack, self.unpack)

    def pack(self, tensor: torch.Tensor):
        if (
            not self.mover.eligible(tensor)
            or tensor.numel() * tensor.element_size() < self.min_bytes
            or tensor.untyped_storage().data_ptr() in self.kept
        ):
            return tensor
        self.saved.append(_Offloaded(self.mover.to_host(tensor), tensor.device))
        return len(self.saved) - 1

    def unpack(self, packed):
        if not isinstance(packed, int):
            return packed
        item = self.saved[packed]
        tensor = item.device_copy if item.device_copy is not None else self.mover.to_device(item.host, item.device)
        item.device_copy = None
        if packed > 0 and self.saved[packed - 1].device_copy is None:
            # Backward takes the layers' inputs last to first: start the one before on its way now.
            before = self.saved[packed - 1]
            before.device_copy = self.mover.to_device(before.host, before.device)
        return self.mover.ready(tensor)
