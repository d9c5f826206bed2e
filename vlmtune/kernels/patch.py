"""Swap the language tower's hot ops for vlmtune's Triton kernels on a loaded model, and swap them back.

    from vlmtune.kernels.patch import apply_kernels, kernels_available

    if kernels_available():
        patch = apply_kernels(model, family)       # a transformers model or the PeftModel from apply_tuning
    ...                                            # train: same numbers as the plain path, less time and memory
    patch.revert()                                 # every forward is again exactly what it was

Only modules under ``family.towers["language"]`` change, with these exceptions: ``lora_linear`` takes every
eligible LoRA layer of every tower, ``vision_attention`` batches the vision tower's per-sequence attention
loop (Qwen-VL), the same arithmetic in a few calls, and ``layer_norm`` / ``fc_mlp`` take the vision tower's
LayerNorms and non-gated MLPs. Nothing is
patched in source text: each op replaces ``forward`` on the module *instances* it finds (the class and every
other model of the family are untouched), and the family's data (``norm_kind``, ``mlp_kind``, ``rope_kind``)
says which kernel variant to use. The ops (``ALL_OPS``):

- ``rms_norm``: every ``*RMSNorm`` with a ``weight`` (Gemma-3's ``q_norm`` / ``k_norm`` included).
- ``rope``: the attention modules' call of their modeling module's ``apply_rotary_pos_emb``.
- ``mlp``: ``down(act(gate(x)) * up(x))`` with the fused SwiGLU / tanh-GeGLU kernel; when each projection is a
  LoRA layer ``lora_linear`` patched or a frozen linear without LoRA, the whole MLP runs as one autograd Function
  (:mod:`vlmtune.kernels.lora_mlp`).
- ``lora_linear``: PEFT LoRA linears (any tower) over an ``nn.Linear`` or bitsandbytes NF4 ``Linear4bit`` base, with one
  active adapter and no dropout, DoRA or other variant (the rest keep PEFT's path, listed in ``skipped``).
- ``vision_attention``: Qwen-VL's vision ``*VisionAttention`` modules attend every image / window in one call
  (:mod:`vlmtune.kernels.vision_attention`) instead of transformers' Python loop over ``cu_seqlens``; the
  family's ``vision_attention_kind`` says which families have it.
- ``layer_norm``: every ``nn.LayerNorm`` of the vision tower and projector where the family's ``vision_norm_kind``
  is ``"layer_norm"`` (:mod:`vlmtune.kernels.layer_norm`).
- ``fc_mlp``: the vision tower's ``fc2(act(fc1(x)))`` MLPs where the family's ``vision_mlp_kind`` is ``"fc"``, as one
  autograd Function when each linear is a patched LoRA layer or a frozen linear (:mod:`vlmtune.kernels.fc_mlp`).
- ``cross_entropy``: the top-level forward (MiniCPM-V: its ``llm``'s) computes the loss from the final hidden
  states with the fused linear cross-entropy, so the ``(tokens, vocab)`` logits never exist; it returns
  ``logits=None``.
  Without ``labels``, or with ``return_logits=True``, it is the original forward.
- ``sdpa_backend``: the language tower's attention modules run SDPA with cuDNN left out (it builds a plan per new
  sequence length, ~150 ms of host time per step on real data; :mod:`vlmtune.kernels.hf.sdpa_backend`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
from collections.abc import Callable

import torch

from vlmtune.families.base import Family
from vlmtune.kernels.hf import (
    cross_entropy,
    fc_mlp,
    layer_norm,
    lora_linear,
    mlp,
    rms_norm,
    rope,
    sdpa_backend,
    vision_attention,
)
from vlmtune.kernels.hf.common import KERNEL
from vlmtune.patching import swapped_modules

logger = logging.getLogger(__name__)

ALL_OPS = (
    "rms_norm",
    "rope",
    "mlp",
    "lora_linear",
    "cross_entropy",
    "vision_attention",
    "layer_norm",
    "fc_mlp",
    "sdpa_backend",
)
# Vision ops whose family field may leave them off; one descriptor can also serve checkpoints whose vision towers
# differ (Qwen2-VL's LayerNorm + fc MLP, Qwen2.5-VL's RMSNorm + gated MLP), so finding nothing is no warning.
_VISION_OP_KINDS = {
    "vision_attention": "vision_attention_kind",
    "layer_norm": "vision_norm_kind",
    "fc_mlp": "vision_mlp_kind",
}

_PATCHERS = {
    "vision_attention": vision_attention.apply,
    "rms_norm": rms_norm.apply,
    "rope": rope.apply,
    "mlp": mlp.apply,
    "lora_linear": lora_linear.apply,
    "cross_entropy": cross_entropy.apply,
    "layer_norm": layer_norm.apply,
    "fc_mlp": fc_mlp.apply,
    "sdpa_backend": sdpa_backend.apply,
}


def kernels_available() -> bool:
    """Whether the Triton kernels can run here: triton installed, and CUDA or ``TRITON_INTERPRET=1``."""
    if importlib.util.find_spec("triton") is None:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def kernels_run_on(model: torch.nn.Module) -> bool:
    """Whether the kernels can run on ``model``'s device: it has a parameter on CUDA, or the interpreter is on.

    A model left on the CPU of a CUDA machine would hand CPU tensors to compiled Triton kernels.
    """
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    return any(p.device.type == "cuda" for p in model.parameters())


@dataclasses.dataclass
class KernelPatch:
    """What :func:`apply_kernels` changed, and how to undo it.

    Attributes:
        patched: op -> names of the modules whose forward now runs a kernel (``""`` is the top-level model).
        skipped: module name -> why it kept its own forward (LoRA layers with dropout, DoRA, ...).
    """

    patched: dict[str, list[str]]
    skipped: dict[str, str]
    _restores: list[Callable[[], None]] = dataclasses.field(default_factory=list, repr=False)

    def revert(self) -> None:
        """Put back every forward as it was before :func:`apply_kernels` (the same objects); idempotent."""
        while self._restores:
            self._restores.pop()()


def apply_kernels(model: torch.nn.Module, family: Family, ops: tuple[str, ...] = ALL_OPS) -> KernelPatch:
    """Patch ``ops`` of ``model``'s language tower (and vision tower, for the vision ops) with the Triton kernels.

    Args:
        model: a transformers ``*ForConditionalGeneration`` (16-bit, fp32 or with bitsandbytes NF4 linears),
            or the ``PeftModel`` returned by :func:`vlmtune.tuning.apply_tuning`.
        family: the model's family (``vlmtune.families.detect(model.config)``).
        ops: a subset of :data:`ALL_OPS`.

    Returns:
        The :class:`KernelPatch`; call ``revert()`` to restore the plain model.

    Raises:
        RuntimeError: when the kernels cannot run here (see :func:`kernels_available`), or not on the
            model's device (see :func:`kernels_run_on`).
        ValueError: for an unknown op, or a model that is already patched.
    """
    unknown = sorted(set(ops) - set(ALL_OPS))
    if unknown:
        raise ValueError(f"unknown kernel op(s) {unknown}; valid: {list(ALL_OPS)}")
    if not kernels_available():
        raise RuntimeError(
            "the Triton kernels need triton and a CUDA device (or TRITON_INTERPRET=1 for the CPU "
            "interpreter, set before triton is imported); train with kernels=False instead"
        )
    base = _base_model(model)
    if not kernels_run_on(base):
        device = next((p.device for p in base.parameters()), torch.device("cpu"))
        raise RuntimeError(
            f"the model is on {device}, and the Triton kernels run on CUDA (or on the CPU under "
            "TRITON_INTERPRET=1): move it with model.cuda() first, or train with kernels=False"
        )
    if swapped_modules(base, KERNEL):
        raise ValueError("kernels are already applied to this model; revert() that KernelPatch first")
    _no_hub_kernels(base)
    patch = KernelPatch(patched={op: [] for op in ops}, skipped={})
    language = [(name, module) for name, module in base.named_modules() if family.tower_of(name) == "language"]
    try:
        for op in ops:
            _PATCHERS[op](base, language, family, patch)
    except BaseException:
        patch.revert()
        raise
    for op in ops:
        if patch.patched[op]:
            continue
        if op not in _VISION_OP_KINDS:
            logger.warning("kernel op %r found nothing to patch in %s", op, type(base).__name__)
        elif getattr(family, _VISION_OP_KINDS[op]) is not None:
            logger.info("kernel op %r: no such module in the vision tower of %s", op, type(base).__name__)
    logger.info(
        "Triton kernels on %s: %s; %d modules keep their own forward",
        type(base).__name__,
        ", ".join(f"{op} x{len(names)}" for op, names in patch.patched.items()),
        len(patch.skipped),
    )
    return patch


def _no_hub_kernels(base: torch.nn.Module) -> None:
    """Turn off transformers' own layer kernels (the `kernels` library) on every sub-model that uses them.

    transformers 5.25 kernelises a model loaded while `kernels` is installed, and kernelises it again at every
    ``train()`` / ``eval()`` switch, resetting the layers' instance forwards: vlmtune's kernels would silently stop
    running after the first switch (and their undo would find the forwards gone).
    """
    from transformers import PreTrainedModel

    for name, module in base.named_modules():
        if isinstance(module, PreTrainedModel) and getattr(module, "use_kernels", False):
            module.use_kernels = False  # transformers' setter restores the torch implementations
            logger.info("turned off transformers' hub kernels on %s: vlmtune's replace them", name or "the model")


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model
