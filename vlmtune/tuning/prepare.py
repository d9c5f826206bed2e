"""PEFT preparation: wrap a model with LoRA as a :class:`TuningConfig` says, and what PEFT gets wrong for VLMs.

A ``"full"`` tower trains through PEFT's ``modules_to_save`` so that it is exported with the adapter. Around
``get_peft_model``: no input-embedding grad hooks (only reentrant checkpointing needs them), tied embeddings kept
tied when both copies train, frozen towers kept frozen inside a ``"full"`` copy, and the memory options of
:mod:`vlmtune.tuning.memory`.
"""

from __future__ import annotations

import logging

import torch
import transformers
from packaging.version import Version
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from vlmtune.families.base import Family
from vlmtune.quiet import peft_wrapping
from vlmtune.tuning.config import TuningConfig
from vlmtune.tuning.memory import (
    enable_activation_offload,
    freeze_vision_forward,
    keep_embeddings_on_cpu,
    micro_batch_vision,
)
from vlmtune.tuning.targets import check_targets, full_tower_modules, lora_target_names, original_name

logger = logging.getLogger(__name__)


def _disable_input_require_grads(model: torch.nn.Module) -> None:
    try:
        model.disable_input_require_grads()
    except AttributeError:  # releases that keep one hook attribute raise when none was ever set: nothing to remove
        pass


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant activation checkpointing, model-wide, and no KV cache in training (which it rules out).

    transformers 5.23 renamed ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable`` (the old name
    warns). Without ``use_cache=False`` in the configs each forward in training would turn the cache off itself,
    with a warning; generation asks for the cache explicitly, so it is unaffected.
    """
    kwargs = {"use_reentrant": False}
    if Version(transformers.__version__) >= Version("5.23"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # Every config the forwards read: the top model's, its text config, and those of nested models (MiniCPM-V's llm).
    configs = [model.config, model.config.get_text_config()]
    configs += [m.config for m in model.modules() if isinstance(m, transformers.PreTrainedModel)]
    for config in configs:
        config.use_cache = False


_ATTENTION_OPS = tuple(
    getattr(torch.ops.aten, name).default
    for name in (
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
    )
)


def _keep_attention(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _ATTENTION_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _keep_attention_contexts():
    return create_selective_checkpoint_contexts(_keep_attention)


def checkpoint_keeping_attention(function, *args, **kwargs):
    """Non-reentrant checkpointing that saves the outputs of SDPA's fused attention ops: the recomputation in
    backward runs everything else of the layer again and takes the attention from what was saved."""
    return checkpoint(function, *args, use_reentrant=False, context_fn=_keep_attention_contexts, **kwargs)


def keep_nf4_layout(model: torch.nn.Module) -> None:
    """Keep every bitsandbytes 4-bit weight of ``model`` in NF4's own layout while it trains.

    On a CPU with AVX512-BF16, bitsandbytes' ``Linear4bit`` repacks its weight for a faster CPU GEMM at its first
    eval-mode call (an evaluation during training) and keeps that layout once training resumes, where its CPU
    path fails (an in-place bias add on a tensor autograd tracks, shape checks the tiny models trip) and the
    kernels cannot read it. The repacking is switched off, and a weight already repacked is put back.
    """
    try:
        import bitsandbytes.functional as bnb_functional
        from bitsandbytes.nn import Linear4bit
    except ImportError:  # pragma: no cover - bitsandbytes is a dependency
        return
    unpack = getattr(bnb_functional, "_convert_weight_packed_for_cpu_inverse", None)
    for module in model.modules():
        if not isinstance(module, Linear4bit):
            continue
        module.support_avx512bf16_for_cpu = False
        state = getattr(module.weight, "quant_state", None)
        if unpack is not None and getattr(state, "packing_format_for_cpu", False):
            module.weight.data, module.weight.quant_state = unpack(module.weight.data, state)


def apply_tuning(model: torch.nn.Module, family: Family, config: TuningConfig):
    """Wrap ``model`` with PEFT LoRA as ``config`` says; freeze everything else.

    Returns the ``PeftModel``. A frozen vision tower (and frozen projector, when the projector lives inside the
    vision module as in Qwen-VL) runs its forward under ``torch.no_grad()``: no activations kept, no backward.
    """
    from peft import LoraConfig, get_peft_model

    targets = lora_target_names(model, family, config)
    to_save = full_tower_modules(family, config)
    check_targets(family, targets, to_save)
    keep_nf4_layout(model)
    if config.gradient_checkpointing:
        enable_checkpointing(model)
        # transformers (here) and PEFT (in get_peft_model) hook every sub-model's input embedding so that its output
        # requires grad, which only reentrant checkpointing needs. On a frozen vision tower with a trained projector
        # inside (Qwen2-VL, Qwen2.5-VL, MiniCPM-V 4.6) that made every frozen block record a graph for backward.
        _disable_input_require_grads(model)
        for name, module in model.named_modules():
            # transformers' GradientCheckpointingLayer checks this flag per layer on every call, and calls the
            # layer's own _gradient_checkpointing_func.
            if family.tower_of(name) == "vision" and getattr(module, "gradient_checkpointing", False):
                if not config.vision_checkpointing:
                    module.gradient_checkpointing = False
                elif config.vision_checkpointing == "attention":
                    module._gradient_checkpointing_func = checkpoint_keeping_attention
    lora = LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        use_rslora=config.use_rslora,
        # An explicit name list (exact matches) so the saved adapter says precisely what it wraps.
        target_modules=targets or None,
        modules_to_save=to_save or None,
        task_type="CAUSAL_LM",
        bias="none",
    )
    tied = _tied_embedding_names(model)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(config.init_seed)
        with peft_wrapping():
            peft_model = get_peft_model(model, lora)
    _disable_input_require_grads(model)  # PEFT sets the hooks again (see above)
    if tied is not None:
        _tie_trained_copies(peft_model, tied)
    _freeze_nested_frozen_towers(peft_model, family, config)
    if config.lora_dtype == "compute":
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        for name, param in peft_model.named_parameters():
            if ".lora_" in name:
                param.data = param.data.to(dtype)
    if config.offload_activations:
        enable_activation_offload(peft_model)
    if config.embeddings_on_cpu:
        keep_embeddings_on_cpu(peft_model)
    if config.vision_micro_batch is not None and family.vision_takes_image_batch:
        micro_batch_vision(peft_model, family, config.vision_micro_batch)
    freeze_vision_forward(peft_model, family, config)
    # Kept on the model so that vlmtune.train reads the tuning (per-tower learning rates ...) it was built with.
    peft_model.__dict__[_TUNING] = config
    logger.info(
        "LoRA on %d modules, %d modules trained in full; trainable parameters: %d",
        len(targets),
        len(to_save),
        sum(p.numel() for p in peft_model.parameters() if p.requires_grad),
    )
    return peft_model


def _tied_embedding_names(model: torch.nn.Module) -> tuple[str, str] | None:
    """``(input embedding, lm_head)`` module names when the two share one weight (Gemma-3, Qwen2.5-VL-3B ...)."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if embedding is None or head is None or head.weight is not embedding.weight:
        return None
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    return names[id(embedding)], names[id(head)]


def _tie_trained_copies(peft_model, tied: tuple[str, str]) -> None:
    """Keep a tied ``lm_head`` tied to the input embedding when both train in full.

    PEFT's ``modules_to_save`` deep-copies each module it trains, so a fully trained language tower (or
    ``modules_to_save=["lm_head", "embed_tokens"]``) would get two independent copies of the one tied matrix,
    trained apart: the model would come out untied, and a loader that re-ties them would silently drop one of the
    two. The head's copy is pointed at the embedding's copy instead, as the base model does. The exported adapter
    still holds both entries (equal), so a plain PEFT load reproduces the trained model.
    """
    from peft.utils import ModulesToSaveWrapper

    modules = dict(peft_model.named_modules())
    wrapped = [n.removeprefix("base_model.model.") for n, m in modules.items() if isinstance(m, ModulesToSaveWrapper)]

    def trained_copy(name: str) -> torch.nn.Module | None:
        outer = next((w for w in wrapped if name == w or name.startswith(w + ".")), None)
        if outer is None:
            return None
        return modules.get(f"base_model.model.{outer}.modules_to_save.default{name[len(outer) :]}")

    embedding, head = (trained_copy(name) for name in tied)
    if embedding is not None and head is not None:
        head.weight = embedding.weight
    elif embedding is not None or head is not None:
        trained, frozen = tied if embedding is not None else tied[::-1]
        logger.warning(
            "%s trains in full but %s, tied to it, does not: they come out untied; add %s to modules_to_save "
            "(or set its tower to 'full') to keep them tied",
            trained,
            frozen,
            frozen,
        )


def _freeze_nested_frozen_towers(model: torch.nn.Module, family: Family, config: TuningConfig) -> None:
    # modules_to_save copies a whole module: Qwen-VL's "full" vision tower carries its (nested) projector along.
    # A tower the user set to "frozen" stays frozen inside such a copy; the user's own modules_to_save win.
    extras = tuple(config.modules_to_save)
    for name, param in model.named_parameters():
        if not param.requires_grad or ".lora_" in name:
            continue
        base_name = original_name(name)
        if any(base_name == e or base_name.startswith(e + ".") or f".{e}." in f".{base_name}" for e in extras):
            continue
        tower = family.tower_of(base_name)
        if tower is not None and getattr(config, tower) == "frozen":
            param.requires_grad_(False)


_TUNING = "_vlmtune_tuning"


def tuning_of(model: torch.nn.Module) -> TuningConfig | None:
    """The :class:`TuningConfig` that :func:`apply_tuning` built ``model`` with (``None`` for any other model)."""
    return model.__dict__.get(_TUNING)
