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
            accident; ``"full"`` trains and exports it, ``"lora"`` only where the adapter tags projector linears).
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
        lora_towers = [t for t in ("vision", "language") if getattr(self, t) == "lora"]
        if lora_towers and not (self.attention or self.mlp):
            raise ValueError(f"{lora_towers} set to 'lora' but attention and mlp are both off; turn one on")


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
    return full + list(config.modules_to_save)


def apply_tuning(model: torch.nn.Module, adapter: Adapter, config: TuningConfig):
    """Wrap ``model`` with PEFT LoRA as ``config`` says; freeze everything else.

    Returns the ``PeftModel``. A frozen vision tower (and frozen projector, when the projector lives inside the
    vision module as in Qwen-VL) runs its forward under ``torch.no_grad()``: no activations kept, no backward.
    """
    from peft import LoraConfig, get_peft_model

    targets = lora_target_names(model, adapter, config)
    to_save = full_tower_modules(adapter, config)
    if not targets and not to_save:
        raise ValueError("nothing to train: every tower is frozen and no modules_to_save are given")
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
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
    if not targets:
        raise ValueError(
            "no tower is set to 'lora', so there is no adapter to export; set vision or language to 'lora' "
            "(a 'full'-only run is plain full fine-tuning, which vlmtune does not export as an adapter)"
        )
    peft_model = get_peft_model(model, lora)
    _freeze_nested_frozen_towers(peft_model, adapter, config)
    freeze_vision_forward(peft_model, adapter, config)
    logger.info(
        "LoRA on %d modules, %d modules trained in full; trainable parameters: %d",
        len(targets),
        len(to_save),
        sum(p.numel() for p in peft_model.parameters() if p.requires_grad),
    )
    return peft_model


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


def _no_grad_forward(forward):
    @functools.wraps(forward)
    def wrapped(*args, **kwargs):
        with torch.no_grad():
            return forward(*args, **kwargs)

    wrapped.__vlmtune_no_grad__ = forward
    return wrapped


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
        if not hasattr(module.forward, "__vlmtune_no_grad__"):
            module.forward = _no_grad_forward(module.forward)
    return True


def trainable_parameter_names(model: torch.nn.Module) -> list[str]:
    """Names of the parameters that require grad, in model order."""
    return [n for n, p in model.named_parameters() if p.requires_grad]
