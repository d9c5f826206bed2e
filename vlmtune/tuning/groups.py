"""Optimizer parameter groups: one learning rate per tower."""

from __future__ import annotations

import torch

from vlmtune.families.base import Family
from vlmtune.tuning.config import TuningConfig
from vlmtune.tuning.targets import original_name


def param_groups(
    model: torch.nn.Module, family: Family, config: TuningConfig, lr: float, weight_decay: float = 0.0
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
            groups[family.tower_of(original_name(_strip_lora(name))) or "language"].append(param)
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
