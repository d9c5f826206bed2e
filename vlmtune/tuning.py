"""What trains: per-tower modes, LoRA placement from the adapter's tags, freezing that is real.

Each tower — vision, projector, language — is ``"frozen"``, ``"lora"`` or ``"full"``. LoRA targets are the
exact module names the adapter tags for the chosen towers and kinds (attention / MLP), never a bare suffix list,
so Qwen-VL's vision MLP (which reuses the language MLP's names) is only touched when the vision tower is tuned.
A ``"full"`` tower trains through PEFT's ``modules_to_save`` so that it is exported with the adapter.

    model = apply_tuning(model, adapter, TuningConfig(vision="lora", language="lora", r=16))
"""

from __future__ import annotations

import functools
import logging
import re
import types
from dataclasses import dataclass, field

import torch

from vlmtune.adapters import Adapter

logger = logging.getLogger(__name__)

MODES = ("frozen", "lora", "full")


@dataclass
class TuningConfig:
    """Which towers train and how.

    Attributes:
        vision: mode of the vision tower: ``"frozen"``, ``"lora"`` or ``"full"``.
        projector: mode of the vision→language projector (``"frozen"`` by default: it never gets LoRA by
            accident; ``"full"`` trains and exports it, ``"lora"`` only where the adapter tags projector linears,
            and not inside a ``"full"`` vision tower that contains it, as Qwen-VL's does: that is refused).
        language: mode of the language tower.
        attention: LoRA on attention projections.
        mlp: LoRA on MLP projections.
        last_n_layers: LoRA only in the last N layers of each LoRA'd tower (``None``: all layers).
        r: LoRA rank.
        alpha: LoRA alpha (scale = alpha / r, or alpha / sqrt(r) with ``use_rslora``).
        dropout: LoRA dropout.
        use_rslora: rank-stabilised scaling.
        modules_to_save: extra modules trained in full and exported (e.g. ``["lm_head", "embed_tokens"]``).
        gradient_checkpointing: recompute activations in backward (language tower and vision tower alike, as
            transformers applies it model-wide); saves memory at ~30% more compute.
        vision_checkpointing: also checkpoint the vision tower's layers (with ``gradient_checkpointing``). On by
            default: with vision LoRA on Qwen2.5-VL-7B its activations are the larger share of the step's memory
            (BENCHMARKS.md); turn it off to trade that memory for the vision tower's recomputation.
        vision_micro_batch: images per pass of the vision tower, for families whose tower takes a batch of whole
            images (Gemma-3's SigLIP; the adapter's ``vision_takes_image_batch``): the tower runs chunk after
            chunk and the features are concatenated, the same numbers with one chunk's activations alive at a
            time (with checkpointing, backward recomputes one chunk's layer at a time). ``None`` (default) runs
            all images at once. Part of the lean-memory setting with ``offload_activations``: on Gemma-3-4B
            QLoRA at batch 8, 2 takes the peak from 8.1 to 7.5 GiB (6.3 to 5.1 GiB with offload) for ~20% more
            step time (BENCHMARKS.md).
        embeddings_on_cpu: keep the input embedding matrix in CPU memory when it is frozen, not tied to
            ``lm_head`` and the model sits on a GPU: each forward looks its token rows up on the CPU and copies
            them to the GPU (the same numbers; saves vocab x hidden of GPU memory, 1.0 GiB on Qwen2.5-VL-7B,
            for one small host copy per forward). Skipped under torch.distributed, where DDP broadcasts every
            weight from the GPU.
        offload_activations: keep the tensors saved for backward (with checkpointing: each layer's input) in
            pinned CPU memory instead of GPU memory, for long sequences; same numbers, slower.
        lora_dtype: ``"float32"`` (default: PEFT keeps the small adapter in fp32, so Adam's updates to it are
            not rounded to bf16 — a few MB for a large memory-free accuracy win) or ``"compute"`` (the model's
            compute dtype, e.g. bf16).
        init_seed: seed of the LoRA initialisation (drawn in a forked RNG, so the same config gives the same
            adapter whatever ran before, and the global RNG is left as it was).
        vision_lr / projector_lr / language_lr: learning rate of that tower's trainable parameters (``None``:
            the run's ``lr``). Parameters outside the towers (``lm_head`` in modules_to_save ...) use the
            language rate.
    """

    vision: str = "lora"
    projector: str = "frozen"
    language: str = "lora"
    attention: bool = True
    mlp: bool = True
    last_n_layers: int | None = None
    r: int = 16
    alpha: int = 16
    dropout: float = 0.0
    use_rslora: bool = False
    modules_to_save: list[str] = field(default_factory=list)
    gradient_checkpointing: bool = True
    vision_checkpointing: bool = True
    vision_micro_batch: int | None = None
    embeddings_on_cpu: bool = True
    offload_activations: bool = False
    lora_dtype: str = "float32"
    init_seed: int = 0
    vision_lr: float | None = None
    projector_lr: float | None = None
    language_lr: float | None = None

    def __post_init__(self) -> None:
        for tower in ("vision", "projector", "language"):
            if getattr(self, tower) not in MODES:
                raise ValueError(f"{tower} must be one of {MODES}, got {getattr(self, tower)!r}")
        if self.r < 1:
            raise ValueError(f"r must be >= 1, got {self.r}")
        if not (0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.last_n_layers is not None and self.last_n_layers < 1:
            raise ValueError(f"last_n_layers must be >= 1 or None, got {self.last_n_layers}")
        if self.vision_micro_batch is not None and self.vision_micro_batch < 1:
            raise ValueError(f"vision_micro_batch must be >= 1 or None, got {self.vision_micro_batch}")
        if self.lora_dtype not in ("float32", "compute"):
            raise ValueError(f"lora_dtype must be 'float32' or 'compute', got {self.lora_dtype!r}")
        for name in ("vision_lr", "projector_lr", "language_lr"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive or None, got {getattr(self, name)}")
        lora_towers = [t for t in ("vision", "language") if getattr(self, t) == "lora"]
        if lora_towers and not (self.attention or self.mlp):
            raise ValueError(f"{lora_towers} set to 'lora' but attention and mlp are both off; turn one on")

    @classmethod
    def from_unsloth(
        cls,
        finetune_vision_layers: bool = True,
        finetune_language_layers: bool = True,
        finetune_attention_modules: bool = True,
        finetune_mlp_modules: bool = True,
        **kwargs,
    ) -> TuningConfig:
        """Unsloth's ``FastVisionModel.get_peft_model`` flags, meaning the same thing here.

        ``finetune_vision_layers`` / ``finetune_language_layers`` put LoRA on (or leave frozen) the vision /
        language tower; the attention / MLP flags choose the projections. Unlike Unsloth's name regex, the
        projector (Qwen-VL's ``merger.mlp``) never gets LoRA from these flags, and a frozen vision tower also
        runs without a backward pass. Other keyword arguments go to :class:`TuningConfig` (``r``, ...);
        Unsloth's ``lora_alpha`` / ``lora_dropout`` names are accepted.
        """
        renames = {"lora_alpha": "alpha", "lora_dropout": "dropout"}
        kwargs = {renames.get(k, k): v for k, v in kwargs.items()}
        return cls(
            vision="lora" if finetune_vision_layers else "frozen",
            language="lora" if finetune_language_layers else "frozen",
            attention=finetune_attention_modules,
            mlp=finetune_mlp_modules,
            **kwargs,
        )

    @classmethod
    def from_minicpmv(
        cls, tune_vision: bool = True, tune_llm: bool = False, use_lora: bool = True, **kwargs
    ) -> TuningConfig:
        """MiniCPM-V's ``finetune.py`` flags, meaning the same thing here on every family.

        As in OpenBMB's script, the projector (MiniCPM-V's resampler) always trains in full;
        ``tune_vision`` trains the vision tower in full; ``use_lora`` puts LoRA on the language tower (attention
        and MLP here; the script's default regex takes q/k/v only: pass ``mlp=False`` for that), and without
        LoRA ``tune_llm`` would train it in full. A run without any LoRA is plain full fine-tuning, which
        vlmtune does not export as an adapter, so ``use_lora=False`` is refused with that explanation.
        """
        if not use_lora:
            raise ValueError(
                "use_lora=False is full fine-tuning, which vlmtune does not do; use use_lora=True "
                f"(tune_llm={tune_llm} then has no effect: the language tower gets LoRA)"
            )
        return cls(vision="full" if tune_vision else "frozen", projector="full", language="lora", **kwargs)


def _select_last_layers(names: list[str], pattern: str, last_n: int | None) -> list[str]:
    if last_n is None:
        return names
    regex = re.compile(pattern)
    layers = sorted({int(regex.fullmatch(n).group(1)) for n in names})
    keep = set(layers[-last_n:])
    return [n for n in names if int(regex.fullmatch(n).group(1)) in keep]


def lora_target_names(model: torch.nn.Module, adapter: Adapter, config: TuningConfig) -> list[str]:
    """The exact module names that get LoRA under ``config``, in model order."""
    names = [n for n, m in model.named_modules() if _is_linear(m)]
    targets: list[str] = []
    for tower in ("vision", "language"):
        if getattr(config, tower) != "lora":
            continue
        for kind in ("attention", "mlp"):
            if getattr(config, kind):
                found = adapter.lora_module_names(names, tower, kind)
                pattern = adapter.lora_targets.pattern(tower, kind)
                targets += _select_last_layers(found, pattern, config.last_n_layers)
    if config.projector == "lora" and adapter.lora_targets.projector:
        regex = re.compile(adapter.lora_targets.projector)
        targets += [n for n in names if regex.fullmatch(n)]
    order = {n: i for i, n in enumerate(names)}
    return sorted(set(targets), key=order.__getitem__)


def _is_linear(module: torch.nn.Module) -> bool:
    # bitsandbytes' Linear4bit / Linear8bitLt subclass nn.Linear.
    return isinstance(module, torch.nn.Linear)


def full_tower_modules(adapter: Adapter, config: TuningConfig) -> list[str]:
    """Module prefixes trained in full (``modules_to_save``): ``"full"`` towers plus the user's extras."""
    full = [p for t in ("vision", "projector", "language") if getattr(config, t) == "full" for p in adapter.towers[t]]
    full = list(dict.fromkeys(full + list(config.modules_to_save)))
    # A module inside another one trained in full (Qwen-VL's merger in a "full" vision tower) trains inside the outer
    # copy. Wrapping it too (PEFT 0.21) freezes that inner part of the outer copy, which the forward runs, and adds a
    # trainable second copy that the forward never calls: the projector would silently not train.
    return [p for p in full if not any(p.startswith(outer + ".") for outer in full)]


def _disable_input_require_grads(model: torch.nn.Module) -> None:
    try:
        model.disable_input_require_grads()
    except AttributeError:  # releases that keep one hook attribute raise when none was ever set: nothing to remove
        pass


def _check_targets(adapter: Adapter, targets: list[str], to_save: list[str]) -> None:
    """Refuse, before the model is touched, what PEFT cannot do as asked."""
    if not targets and not to_save:
        raise ValueError("nothing to train: every tower is frozen and no modules_to_save are given")
    if not targets:
        raise ValueError(
            "no tower is set to 'lora', so there is no adapter to export; set vision or language to 'lora' "
            "(a 'full'-only run is plain full fine-tuning, which vlmtune does not export as an adapter)"
        )
    # PEFT skips LoRA targets inside a modules_to_save copy (Qwen-VL's merger in a "full" vision tower): they would
    # train in full instead, or PEFT fails with "No modules were targeted" when nothing else gets LoRA.
    inside = [t for t in targets if any(t.startswith(outer + ".") for outer in to_save)]
    if inside:
        towers = " and ".join(sorted({adapter.tower_of(t) or "language" for t in inside}))
        outer = [o for o in to_save if any(t.startswith(o + ".") for t in inside)]
        raise ValueError(
            f"{towers} set to 'lora', but its LoRA targets {inside[:3]} lie inside {outer}, which trains in full; "
            f"set {towers} to 'full' (it then trains with {outer[0]}) or 'frozen'"
        )


def apply_tuning(model: torch.nn.Module, adapter: Adapter, config: TuningConfig):
    """Wrap ``model`` with PEFT LoRA as ``config`` says; freeze everything else.

    Returns the ``PeftModel``. A frozen vision tower (and frozen projector, when the projector lives inside the
    vision module as in Qwen-VL) runs its forward under ``torch.no_grad()``: no activations kept, no backward.
    """
    from peft import LoraConfig, get_peft_model

    targets = lora_target_names(model, adapter, config)
    to_save = full_tower_modules(adapter, config)
    _check_targets(adapter, targets, to_save)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # transformers (here) and PEFT (in get_peft_model) hook every sub-model's input embedding so that its output
        # requires grad, which only reentrant checkpointing needs. On a frozen vision tower with a trained projector
        # inside (Qwen2-VL, Qwen2.5-VL, MiniCPM-V 4.6) that made every frozen block record a graph for backward.
        _disable_input_require_grads(model)
        if not config.vision_checkpointing:
            for name, module in model.named_modules():
                # transformers' GradientCheckpointingLayer checks this flag per layer on every call.
                if adapter.tower_of(name) == "vision" and getattr(module, "gradient_checkpointing", False):
                    module.gradient_checkpointing = False
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
        peft_model = get_peft_model(model, lora)
    _disable_input_require_grads(model)  # PEFT sets the hooks again (see above)
    if tied is not None:
        _tie_trained_copies(peft_model, tied)
    _freeze_nested_frozen_towers(peft_model, adapter, config)
    if config.lora_dtype == "compute":
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        for name, param in peft_model.named_parameters():
            if ".lora_" in name:
                param.data = param.data.to(dtype)
    if config.offload_activations:
        enable_activation_offload(peft_model)
    if config.embeddings_on_cpu:
        keep_embeddings_on_cpu(peft_model)
    if config.vision_micro_batch is not None and adapter.vision_takes_image_batch:
        micro_batch_vision(peft_model, adapter, config.vision_micro_batch)
    freeze_vision_forward(peft_model, adapter, config)
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


def original_name(name: str) -> str:
    """A PEFT parameter name mapped back to the base model's (wrappers and adapter names removed)."""
    name = name.removeprefix("base_model.model.")
    for wrapper in (".modules_to_save.default", ".original_module", ".base_layer"):
        name = name.replace(wrapper, "")
    return name


def _freeze_nested_frozen_towers(model: torch.nn.Module, adapter: Adapter, config: TuningConfig) -> None:
    # modules_to_save copies a whole module: Qwen-VL's "full" vision tower carries its (nested) projector along.
    # A tower the user set to "frozen" stays frozen inside such a copy; the user's own modules_to_save win.
    extras = tuple(config.modules_to_save)
    for name, param in model.named_parameters():
        if not param.requires_grad or ".lora_" in name:
            continue
        base_name = original_name(name)
        if any(base_name == e or base_name.startswith(e + ".") or f".{e}." in f".{base_name}" for e in extras):
            continue
        tower = adapter.tower_of(base_name)
        if tower is not None and getattr(config, tower) == "frozen":
            param.requires_grad_(False)


def _wrap_forward(module: torch.nn.Module, wrapper, key: str) -> bool:
    """Make ``wrapper(module, inner, *args, **kwargs)`` the instance forward of ``module``; False if done before.

    The inner forward is kept in ``module.__dict__[key]`` as a bound method and the wrapper is bound with
    ``types.MethodType``, so ``copy.deepcopy`` of the model re-binds both to the copy (a closure over the
    original's bound forward would keep running the original's weights).
    """
    if key in module.__dict__:
        return False
    module.__dict__[key] = module.forward
    module.forward = types.MethodType(functools.partial(_call_wrapped, wrapper=wrapper, key=key), module)
    return True


def _call_wrapped(self, *args, wrapper, key, **kwargs):
    return wrapper(self, self.__dict__[key], *args, **kwargs)


def _no_grad_call(module, inner, *args, **kwargs):
    with torch.no_grad():
        return inner(*args, **kwargs)


def freeze_vision_forward(model: torch.nn.Module, adapter: Adapter, config: TuningConfig) -> bool:
    """Run the vision tower's forward under ``no_grad`` when nothing in it trains; return whether it did."""
    if config.vision != "frozen":
        return False
    prefixes = adapter.towers["vision"]
    projector = adapter.towers["projector"]
    nested_projector = any(p.startswith(v + ".") for p in projector for v in prefixes)
    if nested_projector and config.projector != "frozen":
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for prefix in prefixes:
        module = base.get_submodule(prefix)
        if any(p.requires_grad for p in module.parameters()):
            return False
        _wrap_forward(module, _no_grad_call, "_vlmtune_no_grad")
    return True


def keep_embeddings_on_cpu(model: torch.nn.Module) -> bool:
    """Move a frozen, untied input embedding off the GPU; look its rows up on the CPU (see ``embeddings_on_cpu``).

    Returns whether the embedding now lives on the CPU. When the whole model is moved to the GPU later (``Trainer``
    and accelerate do that for unquantised models), the next forward moves the embedding back to the CPU.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    embedding = base.get_input_embeddings()
    weight = getattr(embedding, "weight", None)
    head = base.get_output_embeddings()
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if (
        weight is None
        or weight.device.type != "cuda"
        or any(p.requires_grad for p in embedding.parameters())
        or (head is not None and head.weight.data_ptr() == weight.data_ptr())  # tied: lm_head needs it
        # model.device is its first parameter's device: it must stay the GPU's.
        or next(base.parameters()) is weight
        or distributed
    ):
        return False
    embedding.to("cpu")
    _wrap_forward(embedding, _cpu_embedding_call, "_vlmtune_cpu_embedding")
    return True


def _cpu_embedding_call(module, inner, input_ids, *args, **kwargs):
    if next(module.parameters()).device.type != "cpu":
        # The whole model was moved to the GPU since (Trainer and accelerate do for unquantised models).
        module.to("cpu")
    if input_ids.device.type == "cpu":
        return inner(input_ids, *args, **kwargs)
    return inner(input_ids.cpu(), *args, **kwargs).to(input_ids.device)


def micro_batch_vision(model: torch.nn.Module, adapter: Adapter, images: int) -> None:
    """Run each vision tower of ``adapter`` on at most ``images`` images at a time (see ``vision_micro_batch``).

    For towers called as ``tower(pixel_values=(N, C, H, W), ...)`` that treat each image on its own (SigLIP):
    the output's tensor fields are the chunks' outputs concatenated along the image dimension.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for prefix in adapter.towers["vision"]:
        module = base.get_submodule(prefix)
        module._vlmtune_micro_batch_images = images
        _wrap_forward(module, _micro_batched_call, "_vlmtune_micro_batch")


def _micro_batched_call(module, inner, *args, pixel_values=None, **kwargs):
    images = module._vlmtune_micro_batch_images
    if args or pixel_values is None or pixel_values.shape[0] <= images:
        return inner(*args, pixel_values=pixel_values, **kwargs)
    return _concat_outputs([inner(pixel_values=chunk, **kwargs) for chunk in pixel_values.split(images)])


def _concat_outputs(outputs: list):
    """Concatenate per-chunk model outputs field by field along dim 0 (tuples of tensors element-wise)."""
    first = outputs[0]
    for key in list(first.keys()):
        values = [o[key] for o in outputs]
        if isinstance(values[0], torch.Tensor):
            first[key] = torch.cat(values)
        elif isinstance(values[0], tuple):
            first[key] = tuple(torch.cat(parts) for parts in zip(*values, strict=True))
    return first


def enable_activation_offload(model: torch.nn.Module) -> None:
    """Keep tensors saved for backward in (pinned) CPU memory during the model's training forward passes.

    With non-reentrant checkpointing the only tensors saved outside the checkpointed layers are the layers'
    inputs and the few ops between them, so this moves exactly the checkpointed activations off the GPU; the
    recomputation in backward runs outside the context and stays on the GPU.
    """
    if hasattr(model.forward, "__vlmtune_offload__"):
        return
    forward = model.forward

    @functools.wraps(forward)
    def offloaded(*args, **kwargs):
        if not (model.training and torch.is_grad_enabled()):
            return forward(*args, **kwargs)
        with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
            return forward(*args, **kwargs)

    offloaded.__vlmtune_offload__ = forward
    model.forward = offloaded


def param_groups(
    model: torch.nn.Module, adapter: Adapter, config: TuningConfig, lr: float, weight_decay: float = 0.0
) -> list[dict]:
    """Optimizer parameter groups, one per tower learning rate (only trainable parameters; empty groups dropped).

    LoRA factors and ``modules_to_save`` copies are assigned to the tower of the module they wrap.
    """
    rates = {
        "vision": config.vision_lr or lr,
        "projector": config.projector_lr or lr,
        "language": config.language_lr or lr,
    }
    groups: dict[str, list] = {t: [] for t in rates}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups[adapter.tower_of(original_name(_strip_lora(name))) or "language"].append(param)
    return [
        {"params": params, "lr": rates[tower], "weight_decay": weight_decay, "name": tower}
        for tower, params in groups.items()
        if params
    ]


def _strip_lora(name: str) -> str:
    # "...q_proj.lora_A.default.weight" -> "...q_proj"; towers are decided by the wrapped module's name.
    return name.split(".lora_", 1)[0]


def trainable_parameter_names(model: torch.nn.Module) -> list[str]:
    """Names of the parameters that require grad, in model order."""
    return [n for n, p in model.named_parameters() if p.requires_grad]
