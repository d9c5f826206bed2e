"""What every op's integration shares: the swap key, kernel lookup, the family's style tables, the swap itself."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch

from vlmtune.families.base import Family
from vlmtune.patching import swap_forward

# The key under which a kernel op's swap sits on a patched module (see vlmtune.patching.swap_of).
KERNEL = "_vlmtune_kernel"


def swap(module: torch.nn.Module, forward: Callable, patch, data: Any = None) -> None:
    """Swap ``forward`` in as ``module``'s forward (its data: ``data``); register the undo on ``patch``.

    Only leaf-ish modules (norms, MLPs, attention, LoRA linears) and causal-LM models (the top-level one, or
    MiniCPM-V's ``llm``) are swapped, never a decoder layer: transformers 5.23 checkpoints a layer by wrapping
    its class ``forward`` (``GradientCheckpointingLayer.__init_subclass__``) where 5.17 wraps ``__call__``, so an
    instance forward on a layer would skip checkpointing in one version and not the other. The modules swapped
    here are called through ``__call__`` from inside the layer in both, during the forward and the recomputation
    alike.
    """
    patch._restores.append(swap_forward(module, KERNEL, forward, data))


def find_kernel(module_name: str, function_name: str) -> Callable:
    """A kernel function of ``vlmtune.kernels.<module_name>``."""
    # vlmtune.kernels re-exports each op under its module's name, so the attribute is the function, not the
    # module: resolve through importlib.
    return getattr(importlib.import_module(f"vlmtune.kernels.{module_name}"), function_name)


def style(table: dict, kind: str, field: str, family: Family):
    """``table[kind]``, or an error naming the family's field and the kinds the kernels support."""
    if kind not in table:
        raise ValueError(f"family {family.name!r} has {field}={kind!r}; the kernels support {sorted(table)}")
    return table[kind]
