"""Where LoRA goes and what trains in full: exact module names from the family's tags, checked before PEFT runs."""

from __future__ import annotations

import re

import torch

from vlmtune.families.base import Family
from vlmtune.tuning.config import TuningConfig


def _select_last_layers(names: list[str], pattern: str, last_n: int | None) -> list[str]:
    if last_n is None:
        return names
    regex = re.compile(pattern)
    layers = sorted({int(regex.fullmatch(n).group(1)) for n in names})
    keep = set(layers[-last_n:])
    return [n for n in names if int(regex.fullmatch(n).group(1)) in keep]


def lora_target_names(model: torch.nn.Module, family: Family, config: TuningConfig) -> list[str]:
    """The exact module names that get LoRA under ``config``, in model order."""
    names = [n for n, m in model.named_modules() if _is_linear(m)]
    targets: list[str] = []
    for tower in ("vision", "language"):
        if getattr(config, tower) != "lora":
            continue
        for kind in ("attention", "mlp"):
            if getattr(config, kind):
                found = family.lora_module_names(names, tower, kind)
                pattern = family.lora_targets.pattern(tower, kind)
                targets += _select_last_layers(found, pattern, config.last_n_layers)
    if config.projector == "lora" and family.lora_targets.projector:
        regex = re.compile(family.lora_targets.projector)
        targets += [n for n in names if regex.fullmatch(n)]
    order = {n: i for i, n in enumerate(names)}
    return sorted(set(targets), key=order.__getitem__)


def _is_linear(module: torch.nn.Module) -> bool:
    # bitsandbytes' Linear4bit / Linear8bitLt subclass nn.Linear.
    return isinstance(module, torch.nn.Linear)


def full_tower_modules(family: Family, config: TuningConfig) -> list[str]:
    """Module prefixes trained in full (``modules_to_save``): ``"full"`` towers plus the user's extras."""
    full = [p for t in ("vision", "projector", "language") if getattr(config, t) == "full" for p in family.towers[t]]
    full = list(dict.fromkeys(full + list(config.modules_to_save)))
    # A module inside another one trained in full (Qwen-VL's merger in a "full" vision tower) trains inside the outer
    # copy. Wrapping it too (PEFT 0.21) freezes that inner part of the outer copy, which the forward runs, and adds a
    # trainable second copy that the forward never calls: the projector would silently not train.
    return [p for p in full if not any(p.startswith(outer + ".") for outer in full)]


def check_targets(family: Family, targets: list[str], to_save: list[str]) -> None:
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
        towers = " and ".join(sorted({family.tower_of(t) or "language" for t in inside}))
        outer = [o for o in to_save if any(t.startswith(o + ".") for t in inside)]
        raise ValueError(
            f"{towers} set to 'lora', but its LoRA targets {inside[:3]} lie inside {outer}, which trains in full; "
            f"set {towers} to 'full' (it then trains with {outer[0]}) or 'frozen'"
        )


def original_name(name: str) -> str:
    """A PEFT parameter name mapped back to the base model's (wrappers and adapter names removed)."""
    name = name.removeprefix("base_model.model.")
    for wrapper in (".modules_to_save.default", ".original_module", ".base_layer"):
        name = name.replace(wrapper, "")
    return name
