"""Compile a model's decoder / encoder layers one by one with ``torch.compile``, so a tower's layers share one graph.

    compiled = compile_layers(model, family, "language")   # after apply_tuning and apply_kernels
    ...                                                     # train: each layer runs its compiled graph
    compiled.revert()                                       # every layer is eager again

Compiling layer by layer rather than the whole model keeps the graphs small and the same for every layer of a
tower: dynamo caches a graph per code object and checks guards on its inputs, so the 34 decoder layers of
Gemma-3-4B cost one compile (two where a family alternates layer kinds, Gemma's sliding and global attention),
not 34; the model's own code between layers (masks, embeddings, the vision-to-text merge) stays eager, with its
Python data-dependent branches. vlmtune's kernels are custom ops (:mod:`vlmtune.kernels.ops`), so a patched layer
traces each kernel as one node.

What keeps the layers on one graph, each a guard dynamo would otherwise fail on the next layer: the forwards vlmtune
swaps in are ``functools.partial`` objects (:class:`vlmtune.patching.SwappedForward`; dynamo pins a callable
object by identity, a partial by its function), the kernels' fake functions keep row counts symbolic
(:func:`vlmtune.kernels.ops.leading_rows`), and the first layer's hidden states, which come from frozen embeddings
without grad, are given ``requires_grad`` like every later layer's (:func:`_hidden_requiring_grad`).

Which modules are layers is the family's data (``Family.layers``). Sequence lengths change every step
(padding to the batch's longest sample, packing): the language tower is compiled with dynamic shapes from the
start, so a new length costs no recompile; the vision tower, whose image sizes are usually fixed, starts static
(dynamo turns a dimension dynamic by itself the first time it changes). A layer runs its graph only while it
trains with gradients enabled: evaluation and generation (other shapes, a KV cache) run the eager layer, as a
plain model does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
from collections.abc import Callable
from typing import Any

import torch
from packaging.version import Version

from vlmtune.families.base import Family

logger = logging.getLogger(__name__)

# What TrainConfig.compile selects, by value. DEFAULT_COMPILE is the one place the default lives (TrainConfig's
# None resolves to it on CUDA): "off", measured on an H200 with Gemma-3-4B QLoRA and the kernels on, where compiling
# the decoder layers made the step 13% slower (1.093 vs 0.948 s, an 82 s first step) and compiling the SigLIP
# layers 9% slower (1.185 vs 1.083 s).
COMPILE_TOWERS = {"off": (), "language": ("language",), "vision": ("vision",), "both": ("vision", "language")}
DEFAULT_COMPILE = "off"
# torch.library.custom_op with register_autograd and opcheck (2.4), and dynamo tracing those ops inside a
# non-reentrant checkpoint: the kernels' custom ops were checked on 2.10 and 2.14; older releases stay eager.
MIN_TORCH = Version("2.10")
# Per tower, torch.compile's `dynamic`: True traces sizes symbolically from the first call; None lets dynamo
# specialise first and go dynamic on the first change.
_DYNAMIC = {"language": True, "vision": None}
# torch.compile's backend when compile_layers is given none (what TrainConfig.compile uses). Tests on the CPU set it
# to "aot_eager" (monkeypatch), which traces and runs the same graphs with no C++ / Triton code generation.
BACKEND: str | Callable = "inductor"


@dataclasses.dataclass
class CompiledLayers:
    """What :func:`compile_layers` compiled, and how to undo it.

    Attributes:
        layers: tower -> names of the layers that now run compiled.
        skipped: tower -> why it stays eager.
    """

    layers: dict[str, list[str]]
    skipped: dict[str, str]
    _modules: list[torch.nn.Module] = dataclasses.field(default_factory=list, repr=False)

    def revert(self) -> None:
        """Every compiled layer runs eager again (the compiled graphs are dropped); idempotent."""
        while self._modules:
            self._modules.pop()._compiled_call_impl = None


class _TrainingGraph:
    """A layer's call while compiled: the compiled ``_call_impl`` in training with gradients, else the eager one.

    It sits where ``nn.Module.compile`` puts its compiled function (``_compiled_call_impl``, which
    ``nn.Module.__call__`` prefers when set), so hooks, checkpointing and the layer's ``forward`` are untouched.
    """

    def __init__(self, module: torch.nn.Module, compiled: Callable[..., Any]):
        self.module, self.compiled = module, compiled

    def __call__(self, *args, **kwargs):
        module = self.module
        if module.training and torch.is_grad_enabled():
            with _checkpoint_side_effects():
                return self.compiled(*_hidden_requiring_grad(args), **kwargs)
        return module._call_impl(*args, **kwargs)


def _checkpoint_side_effects():
    """Dynamo's setting under which a checkpointed layer may set Python state in its forward (traced when a layer is
    first called, so it is set around the call).

    With the ``kernels`` library installed (transformers 5.25 pulls it in), transformers wraps the attention classes
    in ``kernels.use_kernelized_func``, whose forward sets and resets a module-level variable on every call; inside
    ``torch.utils.checkpoint`` dynamo refuses that mutation (a graph break in every layer) unless told it need not
    replay it in the recomputation, which here it need not: the variable only routes RoPE to hub kernels, which
    vlmtune turns off.
    """
    if hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        return torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True)
    return contextlib.nullcontext()


def _hidden_requiring_grad(args: tuple) -> tuple:
    """``args`` with the hidden states (the first positional argument) requiring grad.

    Dynamo guards on ``requires_grad`` of every tensor input: the first layer of a tower whose embeddings are frozen
    receives hidden states without grad, every later layer with, and the two would be two graphs (and two compiles
    per new shape). A fresh leaf requiring grad gives the first layer the same graph as the others; it cuts no
    graph (a tensor without grad has no history) and costs that layer's input gradient, which nothing reads.
    Transformers' ``enable_input_require_grads`` does the same at the embeddings for the whole model; here it stays
    on the compiled layers (a frozen vision tower keeps recording nothing).
    """
    if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point() and not args[0].requires_grad:
        return (args[0].detach().requires_grad_(), *args[1:])
    return args


def resolve_compile(mode: str | None, model: torch.nn.Module) -> str:
    """``mode``, or for None the default: :data:`DEFAULT_COMPILE` on a CUDA model, else ``"off"``."""
    if mode is not None:
        return mode
    on_cuda = any(p.device.type == "cuda" for p in model.parameters())
    return DEFAULT_COMPILE if on_cuda else "off"


def compile_layers(
    model: torch.nn.Module,
    family: Family,
    mode: str,
    *,
    backend: str | Callable | None = None,
    options: dict[str, Any] | None = None,
) -> CompiledLayers:
    """Compile every layer of the towers ``mode`` names, one ``torch.compile`` per layer.

    Args:
        model: a transformers model or the ``PeftModel`` of :func:`vlmtune.tuning.apply_tuning`, kernels applied
            or not (apply them first: a layer compiled before is traced again when its forwards change).
        family: the model's family; ``family.layers`` says which modules are layers.
        mode: ``"off"``, ``"language"``, ``"vision"`` or ``"both"``.
        backend: ``torch.compile``'s backend; None: :data:`BACKEND` (``"inductor"``). Tests pass ``"aot_eager"`` or
            a counting backend.
        options: more ``torch.compile`` keyword arguments (``mode="max-autotune-no-cudagraphs"`` ...).

    Returns:
        The :class:`CompiledLayers`. A tower the family has no layers for, or any tower on a torch older than
        :data:`MIN_TORCH`, stays eager with one warning saying why.

    Raises:
        ValueError: for an unknown ``mode``.
    """
    if mode not in COMPILE_TOWERS:
        raise ValueError(f"compile must be one of {sorted(COMPILE_TOWERS)}, got {mode!r}")
    result = CompiledLayers(layers={}, skipped={})
    towers = COMPILE_TOWERS[mode]
    if not towers:
        return result
    if Version(torch.__version__).release < MIN_TORCH.release:
        reason = f"torch {torch.__version__} is older than {MIN_TORCH}, which the kernels' custom ops need"
        result.skipped = dict.fromkeys(towers, reason)
        logger.warning("compile=%r: the layers stay eager: %s", mode, reason)
        return result
    base = _base_model(model)
    for tower in towers:
        pattern = family.layers.get(tower)
        names = [n for n, _ in base.named_modules() if pattern and re.fullmatch(pattern, n)]
        if not names:
            why = "has no layers entry" if pattern is None else f"has no module matching {pattern!r}"
            result.skipped[tower] = f"family {family.name!r} {why} for the {tower} tower"
            logger.warning("compile=%r: the %s tower stays eager: %s", mode, tower, result.skipped[tower])
            continue
        for name in names:
            layer_options = dict(options or {}, dynamic=_DYNAMIC[tower])
            _compile_one(base.get_submodule(name), BACKEND if backend is None else backend, layer_options)
            result._modules.append(base.get_submodule(name))
        result.layers[tower] = names
    if result.layers:
        logger.info("compiled per layer: %s", ", ".join(f"{t} x{len(n)}" for t, n in result.layers.items()))
    return result


def _compile_one(module: torch.nn.Module, backend, options: dict[str, Any]) -> None:
    if module._compiled_call_impl is not None:
        raise ValueError(f"{type(module).__name__} is already compiled; revert() its CompiledLayers first")
    # The compiled function of the layer's _call_impl, as nn.Module.compile() builds it, kept only for training.
    compiled = torch.compile(module._call_impl, backend=backend, **options)
    module._compiled_call_impl = _TrainingGraph(module, compiled)


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model
