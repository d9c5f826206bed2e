"""Swap the language tower's hot ops for vlmtune's Triton kernels on a loaded model, and swap them back.

    from vlmtune.kernels.patch import apply_kernels, kernels_available

    if kernels_available():
        patch = apply_kernels(model, adapter)      # a transformers model or the PeftModel from apply_tuning
    ...                                            # train: same numbers as the plain path, less time and memory
    patch.revert()                                 # every forward is again exactly what it was

Only modules under ``adapter.towers["language"]`` change, with two exceptions: ``lora_linear`` takes every
eligible LoRA layer of every tower, and ``vision_attention`` batches the vision tower's per-sequence attention
loop (Qwen-VL), the same arithmetic in a few calls. Nothing is
patched in source text: each op replaces ``forward`` on the module *instances* it finds (the class and every
other model of the family are untouched), and the adapter's data (``norm_kind``, ``mlp_kind``, ``rope_kind``)
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
  adapter's ``vision_attention_kind`` says which families have it.
- ``cross_entropy``: the top-level forward (MiniCPM-V: its ``llm``'s) computes the loss from the final hidden
  states with the fused linear cross-entropy, so the ``(tokens, vocab)`` logits never exist; it returns
  ``logits=None``.
  Without ``labels``, or with ``return_logits=True``, it is the original forward.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import inspect
import logging
import os
import sys
import types
import typing
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from vlmtune.adapters.base import Adapter

logger = logging.getLogger(__name__)

ALL_OPS = ("rms_norm", "rope", "mlp", "lora_linear", "cross_entropy", "vision_attention")

# norm_kind -> (offset, casting) of vlmtune.kernels.rms_norm: Gemma scales by (1 + w) and casts once at the end.
_NORM_STYLES = {"rms": (0.0, "llama"), "rms_gemma": (1.0, "gemma")}
# mlp_kind -> (kernel name in vlmtune.kernels.gated_mlp, the activation the MLP's act_fn must compute).
_MLP_STYLES = {
    "swiglu": ("swiglu", F.silu),
    "geglu_tanh": ("geglu_tanh", functools.partial(F.gelu, approximate="tanh")),
}
# rope_kind -> kernel name in vlmtune.kernels.rope. Qwen-VL's M-RoPE needs no kernel of its own in
# transformers 5.x (read in 5.17 and 5.23): its rotary module merges the mrope sections before returning, so
# attention gets plain (B, T, D) cos/sin and calls the same apply_rotary_pos_emb as Gemma-3.
_ROPE_STYLES = {"standard": "apply_rope", "mrope": "apply_rope"}
_ROPE_FUNCTION = "apply_rotary_pos_emb"
# gated_mlp kernel name -> the activation's name in vlmtune.kernels.lora_mlp.
_FUSED_ACTIVATIONS = {"swiglu": "silu", "geglu_tanh": "gelu_tanh"}
# Top-level classes whose forward soft-caps the final logits with config.final_logit_softcapping. The
# *ForConditionalGeneration classes of the supported families never do (transformers 5.17 and 5.23; only
# Gemma3ForCausalLM does), so the fused loss applies the cap exactly where the plain forward does.
_SOFTCAPPED_HEADS = frozenset({"Gemma2ForCausalLM", "Gemma3ForCausalLM"})
_STATE = "_vlmtune_kernel"
_MISSING = object()


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


@dataclasses.dataclass
class _Swapped:
    """Stored on a patched module (so ``copy.deepcopy`` re-binds it): the forward it had, plus op data."""

    inner: Callable
    data: Any = None


def apply_kernels(model: torch.nn.Module, adapter: Adapter, ops: tuple[str, ...] = ALL_OPS) -> KernelPatch:
    """Patch ``ops`` of ``model``'s language tower with the Triton kernels.

    Args:
        model: a transformers ``*ForConditionalGeneration`` (16-bit, fp32 or with bitsandbytes NF4 linears),
            or the ``PeftModel`` returned by :func:`vlmtune.tuning.apply_tuning`.
        adapter: the family's adapter (``vlmtune.adapters.detect(model.config)``).
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
    if any(_STATE in m.__dict__ for m in base.modules()):
        raise ValueError("kernels are already applied to this model; revert() that KernelPatch first")
    patch = KernelPatch(patched={op: [] for op in ops}, skipped={})
    language = [(name, module) for name, module in base.named_modules() if adapter.tower_of(name) == "language"]
    try:
        for op in ops:
            _PATCHERS[op](base, language, adapter, patch)
    except BaseException:
        patch.revert()
        raise
    for op in ops:
        if not patch.patched[op] and not (op == "vision_attention" and adapter.vision_attention_kind is None):
            logger.warning("kernel op %r found nothing to patch in %s", op, type(base).__name__)
    logger.info(
        "Triton kernels on %s: %s; %d LoRA layers keep PEFT's path",
        type(base).__name__,
        ", ".join(f"{op} x{len(names)}" for op, names in patch.patched.items()),
        len(patch.skipped),
    )
    return patch


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model


def _swap_forward(module: torch.nn.Module, forward: Callable, patch: KernelPatch, data: Any = None) -> None:
    """Bind ``forward`` as ``module``'s instance forward; register its exact undo on ``patch``.

    Only leaf-ish modules (norms, MLPs, attention, LoRA linears) and causal-LM models (the top-level one, or
    MiniCPM-V's ``llm``) are swapped, never a decoder layer: transformers 5.23 checkpoints a layer by wrapping
    its class ``forward`` (``GradientCheckpointingLayer.__init_subclass__``) where 5.17 wraps ``__call__``, so an
    instance forward on a layer would skip checkpointing in one version and not the other. The modules swapped
    here are called through ``__call__`` from inside the layer in both, during the forward and the recomputation
    alike.
    """
    saved = module.__dict__.get("forward", _MISSING)
    setattr(module, _STATE, _Swapped(inner=module.forward, data=data))
    module.forward = types.MethodType(forward, module)

    def restore() -> None:
        delattr(module, _STATE)
        if saved is _MISSING:
            delattr(module, "forward")
        else:
            module.forward = saved

    patch._restores.append(restore)


def _kernel(module_name: str, function_name: str) -> Callable:
    # vlmtune.kernels re-exports each op under its module's name, so the attribute is the function, not the
    # module: resolve through importlib.
    return getattr(importlib.import_module(f"vlmtune.kernels.{module_name}"), function_name)


def _style(table: dict, kind: str, field: str, adapter: Adapter):
    if kind not in table:
        raise ValueError(f"adapter {adapter.name!r} has {field}={kind!r}; the kernels support {sorted(table)}")
    return table[kind]


# --- rms_norm ---------------------------------------------------------------------------------------------


def _patch_rms_norm(base, language, adapter, patch) -> None:
    offset, casting = _style(_NORM_STYLES, adapter.norm_kind, "norm_kind", adapter)
    kernel = _kernel("rms_norm", "rms_norm")
    for name, module in language:
        if not type(module).__name__.endswith("RMSNorm"):
            continue
        weight = getattr(module, "weight", None)
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        if not isinstance(weight, torch.nn.Parameter) or weight.dim() != 1 or eps is None:
            continue
        _swap_forward(module, _rms_norm_forward, patch, (kernel, float(eps), offset, casting))
        patch.patched["rms_norm"].append(name)


def _rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    kernel, eps, offset, casting = getattr(self, _STATE).data
    return kernel(hidden_states, self.weight, eps, offset=offset, casting=casting)


# --- mlp --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _MlpData:
    gated: Callable  # the activation kernel, for the unfused path
    activation: str  # its name in vlmtune.kernels.lora_mlp
    fused: Callable  # lora_gated_mlp
    projection: type  # its LoraProjection


def _patch_mlp(base, language, adapter, patch) -> None:
    kernel_name, activation = _style(_MLP_STYLES, adapter.mlp_kind, "mlp_kind", adapter)
    probe = torch.linspace(-6.0, 6.0, 49)
    data = _MlpData(
        gated=_kernel("gated_mlp", kernel_name),
        activation=_FUSED_ACTIVATIONS[kernel_name],
        fused=_kernel("lora_mlp", "lora_gated_mlp"),
        projection=_kernel("lora_mlp", "LoraProjection"),
    )
    for name, module in language:
        if not all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            continue
        # The kernel hard-codes the activation: check the module computes the one the adapter promises.
        act = module.act_fn
        if not torch.allclose(act(probe), activation(probe), rtol=1e-5, atol=1e-6):
            logger.warning("%s: act_fn %s is not %s; its MLP keeps its own forward", name, act, kernel_name)
            continue
        _swap_forward(module, _mlp_forward, patch, data)
        patch.patched["mlp"].append(name)


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    data = getattr(self, _STATE).data
    # When each projection is a LoRA layer the lora_linear op patched, or a frozen linear without LoRA, the whole
    # MLP is one autograd node.
    calls = [_projection_call(proj, x) for proj in (self.gate_proj, self.up_proj, self.down_proj)]
    if all(c is not None and c.bias is None for c in calls) and len({(c.dtype, c.quantized) for c in calls}) == 1:
        projections = [data.projection(c.weight, c.quant_state, c.lora_A, c.lora_B, c.scale) for c in calls]
        out = data.fused(x.to(calls[0].dtype), *projections, data.activation)
        return out.to(x.dtype) if calls[0].quantized else out
    return self.down_proj(data.gated(self.gate_proj(x), self.up_proj(x)))


def _projection_call(module: torch.nn.Module, x: torch.Tensor) -> _LoraCall | None:
    """A patched LoRA layer's kernel inputs (:func:`_lora_call`); for a frozen ``nn.Linear`` or NF4 ``Linear4bit``
    without LoRA, the same with no LoRA matrices; None for anything else, or a module with hooks (its own forward
    then runs)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if module._forward_hooks or module._forward_pre_hooks:
        return None  # the fused node calls no module, so a hook would not fire
    if isinstance(module, BaseTunerLayer):
        return _lora_call(module, x)
    dense = type(module) is torch.nn.Linear
    if not dense and not type(module).__module__.startswith("bitsandbytes"):
        return None  # a PEFT ModulesToSaveWrapper, a custom linear ...: its own forward
    if module.weight.requires_grad:
        return None
    if dense:
        return _LoraCall(module.weight, None, module.bias, None, None, 0.0, module.weight.dtype, False)
    # Imported only for bitsandbytes models: importing it is slow.
    import bitsandbytes as bnb

    quant_state = getattr(module.weight, "quant_state", None)
    if not isinstance(module, bnb.nn.Linear4bit) or quant_state is None or quant_state.quant_type != "nf4":
        return None
    if getattr(quant_state, "packing_format_for_cpu", False):  # see _lora_call
        return None
    dtype = module.compute_dtype or x.dtype
    return _LoraCall(module.weight, quant_state, module.bias, None, None, 0.0, dtype, True)


# --- rope -------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _RopeSwap:
    modeling_module: str  # a name, not the module object, so deepcopy of a patched model works
    replacement: Callable


def _patch_rope(base, language, adapter, patch) -> None:
    kernel = _kernel("rope", _style(_ROPE_STYLES, adapter.rope_kind, "rope_kind", adapter))
    for name, module in language:
        modeling = sys.modules.get(type(module).__module__)
        original = getattr(modeling, _ROPE_FUNCTION, None)
        if not type(module).__name__.endswith("Attention") or original is None:
            continue
        replacement = functools.partial(_rope_or_fallback, kernel=kernel, fallback=original)
        _swap_forward(module, _rope_attention_forward, patch, _RopeSwap(modeling.__name__, replacement))
        patch.patched["rope"].append(name)


def _rope_attention_forward(self, *args, **kwargs):
    # The attention forward calls its modeling module's global apply_rotary_pos_emb. Replacing that global for
    # good would change every model of the family in the process, patched or not; so it is swapped only while
    # this instance's attention runs, and restored after. The swap sits on the attention module (not on the
    # model's forward) so that gradient checkpointing's recomputation in backward, which re-enters the
    # decoder layer but not the model's forward, sees the same function: non-reentrant checkpointing refuses
    # a recomputation that saves different tensors. The global is shared, so two threads running models of
    # the same family at once could see each other's swap (both compute the same rotation; the kernel's
    # result equals Hugging Face's).
    swapped = getattr(self, _STATE)
    namespace = sys.modules[swapped.data.modeling_module].__dict__
    previous = namespace[_ROPE_FUNCTION]
    namespace[_ROPE_FUNCTION] = swapped.data.replacement
    try:
        return swapped.inner(*args, **kwargs)
    finally:
        namespace[_ROPE_FUNCTION] = previous


def _rope_or_fallback(q, k, cos, sin, *args, kernel, fallback, **kwargs):
    """The kernel for the ``(B, H, T, D)`` q/k and ``(B|1, T, D)`` cos/sin it supports, else the original."""
    supported = (
        not args
        and set(kwargs) <= {"unsqueeze_dim"}
        and kwargs.get("unsqueeze_dim", 1) == 1
        and q.dim() == 4
        and k.dim() == 4
        and cos.dim() == 3
        and cos.shape == sin.shape
        and cos.shape[0] in (1, q.shape[0])
        and cos.shape[1:] == q.shape[2:]  # rotates the whole head (no partial rotary)
    )
    if not supported:
        return fallback(q, k, cos, sin, *args, **kwargs)
    return kernel(q, k, cos, sin)


# --- lora_linear ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _LoraData:
    kernel: Callable
    adapter: str
    quantized: bool


def _patch_lora_linear(base, language, adapter, patch) -> None:
    from peft.tuners.lora import LoraLayer

    kernel = _kernel("lora_linear", "lora_linear")
    # Every tower's LoRA layers: in the vision tower PEFT's path casts each input to the fp32 LoRA weights and
    # autocast casts it back, keeping an extra copy of every LoRA'd linear's input for backward.
    for name, module in base.named_modules():
        if not isinstance(module, LoraLayer) or adapter.tower_of(name) is None:
            continue
        reason, adapter_name, quantized = _lora_eligibility(module)
        if reason:
            patch.skipped[name] = reason
            continue
        _swap_forward(module, _lora_forward, patch, _LoraData(kernel, adapter_name, quantized))
        patch.patched["lora_linear"].append(name)


def _lora_eligibility(module) -> tuple[str | None, str, bool]:
    """``(why not, adapter name, NF4 base)`` for one PEFT LoRA layer; ``why not`` is None when eligible."""
    from peft.tuners.lora import Linear as LoraLinear

    layer = module.get_base_layer()
    quantized = type(layer).__module__.startswith("bitsandbytes")
    if quantized:
        # Imported only for bitsandbytes models: importing it is slow, and PEFT defines this class only when
        # bitsandbytes is installed.
        import bitsandbytes as bnb
        from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

        if type(module) is not LoraLinear4bit or not isinstance(layer, bnb.nn.Linear4bit):
            return f"{type(module).__name__} over {type(layer).__name__} is not LoRA on NF4 Linear4bit", "", True
        if layer.weight.quant_state.quant_type != "nf4":
            return f"4-bit {layer.weight.quant_state.quant_type}, not nf4", "", True
    elif type(module) is not LoraLinear or type(layer) is not torch.nn.Linear:
        return f"{type(module).__name__} over {type(layer).__name__} is not LoRA on nn.Linear", "", False
    active = list(module.active_adapters)
    if len(active) != 1:
        return f"{len(active)} active adapters", "", quantized
    name = active[0]
    if module.merged:
        return "merged", name, quantized
    if name not in module.lora_A:
        return f"no LoRA weights for adapter {name!r}", name, quantized
    if not isinstance(module.lora_dropout[name], torch.nn.Identity):
        return "lora_dropout > 0", name, quantized
    # DoRA, aLoRA, ... live in lora_variant (PEFT >= 0.15); use_dora is the older flag for DoRA.
    if module.use_dora.get(name, False) or name in getattr(module, "lora_variant", {}):
        return "a LoRA variant (DoRA, ...)", name, quantized
    if getattr(module, "fan_in_fan_out", False) or module.lora_B[name].bias is not None:
        return "fan_in_fan_out or a LoRA bias", name, quantized
    if layer.weight.requires_grad:
        return "the base weight trains", name, quantized
    return None, name, quantized


class _LoraCall(typing.NamedTuple):
    """What the lora_linear kernel is called with for one patched LoRA layer, in its compute ``dtype``."""

    weight: torch.Tensor
    quant_state: Any
    bias: torch.Tensor | None
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scale: float
    dtype: torch.dtype
    quantized: bool


def _lora_call(module: torch.nn.Module, x: torch.Tensor) -> _LoraCall | None:
    """The kernel's inputs for a LoRA layer that :func:`_patch_lora_linear` patched, or None where its own
    forward must run: not patched, or switched by PEFT since (``disable_adapter()``, ``set_adapter``, merge)."""
    swapped = module.__dict__.get(_STATE)
    if swapped is None or not isinstance(swapped.data, _LoraData):
        return None
    data = swapped.data
    if module.disable_adapters or module.merged or list(module.active_adapters) != [data.adapter]:
        return None
    layer = module.get_base_layer()
    quant_state = None
    if data.quantized:
        quant_state = layer.weight.quant_state
        # bitsandbytes repacks a weight for its own CPU GEMM at the first eval-mode call on some CPUs; that
        # layout is not NF4's, so such a layer stays on bitsandbytes' path.
        if getattr(quant_state, "packing_format_for_cpu", False):
            return None
        # bitsandbytes runs in its compute dtype and returns the input's dtype.
        dtype = layer.compute_dtype or x.dtype
    else:
        dtype = layer.weight.dtype
    a, b = module.lora_A[data.adapter].weight, module.lora_B[data.adapter].weight
    scale = module.scaling[data.adapter]
    return _LoraCall(layer.weight, quant_state, layer.bias, a, b, scale, dtype, data.quantized)


def _lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    swapped = getattr(self, _STATE)
    call = None if args or kwargs else _lora_call(self, x)
    if call is None:
        return swapped.inner(x, *args, **kwargs)
    out = swapped.data.kernel(
        x.to(call.dtype), call.weight, call.quant_state, call.bias, call.lora_A, call.lora_B, call.scale
    )
    return out.to(x.dtype) if call.quantized else out


# --- cross_entropy ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class _LossData:
    kernel: Callable
    inner: str  # attribute of the inner model (base_model_prefix)
    inner_takes_labels: bool  # Gemma3ForConditionalGeneration hands labels to its inner model; Qwen-VL does not
    softcap: float | None
    output_class: type
    positional: tuple[str, ...]  # forward's parameter names, to name positional arguments


def _loss_module(base: torch.nn.Module) -> tuple[str, torch.nn.Module] | None:
    """The causal-LM module whose forward applies the output embeddings and computes the loss: the model
    itself for transformers' VLMs, the ``llm`` it delegates to for MiniCPM-V's layout."""
    from transformers import PreTrainedModel

    head = base.get_output_embeddings()
    if head is None:
        return None
    for name, module in base.named_modules():
        owns_head = any(child is head for child in module.children())
        if owns_head and isinstance(module, PreTrainedModel):
            inner = getattr(module, module.base_model_prefix, None)
            return (name, module) if isinstance(inner, torch.nn.Module) else None
    return None


def _patch_cross_entropy(base, language, adapter, patch) -> None:
    from transformers.modeling_outputs import CausalLMOutputWithPast

    found = _loss_module(base)
    if found is None:
        return
    name, target = found
    inner = getattr(target, target.base_model_prefix)
    softcap = None
    if type(target).__name__ in _SOFTCAPPED_HEADS:
        softcap = getattr(target.config.get_text_config(), "final_logit_softcapping", None)
    original = type(target).forward
    params = list(inspect.signature(original).parameters.values())[1:]  # without self
    positional = tuple(p.name for p in params if p.kind == p.POSITIONAL_OR_KEYWORD)
    data = _LossData(
        kernel=_kernel("fused_linear_ce", "fused_linear_cross_entropy"),
        inner=target.base_model_prefix,
        inner_takes_labels="labels" in inspect.signature(inner.forward).parameters,
        softcap=softcap,
        output_class=_output_class(original, CausalLMOutputWithPast),
        positional=positional,
    )

    # A function per patch carrying the original's signature (functools.wraps sets __wrapped__): Trainer reads
    # the forward's signature to decide whether to pass num_items_in_batch, and generate() to find
    # logits_to_keep; both must see what they saw before.
    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        return _fused_loss_forward(self, *args, **kwargs)

    _swap_forward(target, forward, patch, data)
    patch.patched["cross_entropy"].append(name)


def _output_class(forward: Callable, default: type) -> type:
    """The ``ModelOutput`` class in the forward's return annotation (``tuple | Gemma3CausalLMOutputWithPast``)."""
    from transformers.utils import ModelOutput

    annotation = inspect.signature(forward).return_annotation
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, ModelOutput):
            return candidate
    return default


def _active_head_weight(head: torch.nn.Module) -> torch.Tensor | None:
    """The lm_head weight the plain forward would use now, or None when it is not a bias-free plain Linear."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    if isinstance(head, ModulesToSaveWrapper):
        active = head.active_adapters
        if head.disable_adapters or not active or active[0] not in head.modules_to_save:
            head = head.original_module
        else:
            head = head.modules_to_save[active[0]]
    if isinstance(head, BaseTunerLayer) or type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    return head.weight


def _fused_loss_forward(self, *args, **kwargs):
    swapped = getattr(self, _STATE)
    data: _LossData = swapped.data
    if len(args) > len(data.positional):
        raise TypeError(f"forward takes {len(data.positional)} positional arguments, {len(args)} were given")
    kwargs.update(zip(data.positional, args, strict=False))
    return_logits = kwargs.pop("return_logits", False)
    labels = kwargs.get("labels")
    logits_to_keep = kwargs.get("logits_to_keep", 0)
    weight = _active_head_weight(self.get_output_embeddings())
    if return_logits or labels is None or weight is None or not _keeps_all(logits_to_keep):
        return swapped.inner(**kwargs)

    # The loss arguments of transformers' ForCausalLMLoss, which the plain forward passes on from **kwargs.
    for key in ("labels", "logits_to_keep"):
        kwargs.pop(key, None)
    num_items_in_batch = kwargs.pop("num_items_in_batch", None)
    ignore_index = kwargs.pop("ignore_index", -100)
    shift_labels = kwargs.pop("shift_labels", None)
    return_dict = kwargs.pop("return_dict", None)

    if data.inner_takes_labels:
        kwargs["labels"] = labels
    outputs = getattr(self, data.inner)(**kwargs, return_dict=True)
    hidden = outputs[0]
    if shift_labels is None:
        # Position t predicts label t + 1; the last position predicts nothing (ForCausalLMLoss pads the same
        # way, which keeps hidden un-sliced: no copy).
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    # Trainer passes num_items_in_batch (the supervised tokens of the whole accumulated batch) when the
    # model accepts loss kwargs: then ForCausalLMLoss sums and divides by it (transformers 5.17 and 5.23).
    reduction = "mean" if num_items_in_batch is None else "sum"
    # Logits in the lm_head weight's dtype, as lm_head(hidden) gives them; autocast off so that holds.
    with torch.autocast(hidden.device.type, enabled=False):
        loss = data.kernel(
            hidden.reshape(-1, hidden.shape[-1]).to(weight.dtype),
            weight,
            shift_labels.reshape(-1).to(hidden.device),
            ignore_index=ignore_index,
            softcap=data.softcap,
            reduction=reduction,
        )
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    fields = {f.name for f in dataclasses.fields(data.output_class)} - {"loss", "logits"}
    result = data.output_class(loss=loss, logits=None, **{f: getattr(outputs, f, None) for f in fields})
    if return_dict is None:
        return_dict = self.config.return_dict
    return result if return_dict else result.to_tuple()


def _keeps_all(logits_to_keep) -> bool:
    return isinstance(logits_to_keep, int) and logits_to_keep == 0


# --- vision_attention -------------------------------------------------------------------------------------

# vision_attention_kind -> the forward replacing the vision tower's attention modules, and the modeling
# module's function that forward rotates q / k with.
_VISION_ATTENTION_STYLES = {"cu_seqlens": ("qwen_vision_attention_forward", "apply_rotary_pos_emb_vision")}


def _patch_vision_attention(base, language, adapter, patch) -> None:
    if adapter.vision_attention_kind is None:
        return
    forward_name, rotate_name = _style(
        _VISION_ATTENTION_STYLES, adapter.vision_attention_kind, "vision_attention_kind", adapter
    )
    forward = _kernel("vision_attention", forward_name)
    for name, module in base.named_modules():
        rotate = getattr(sys.modules.get(type(module).__module__), rotate_name, None)
        if (
            adapter.tower_of(name) != "vision"
            or not type(module).__name__.endswith("VisionAttention")
            or rotate is None
            or not all(hasattr(module, a) for a in ("qkv", "proj", "num_heads"))
        ):
            continue
        _swap_forward(module, forward, patch, rotate)
        patch.patched["vision_attention"].append(name)


_PATCHERS = {
    "vision_attention": _patch_vision_attention,
    "rms_norm": _patch_rms_norm,
    "rope": _patch_rope,
    "mlp": _patch_mlp,
    "lora_linear": _patch_lora_linear,
    "cross_entropy": _patch_cross_entropy,
}
