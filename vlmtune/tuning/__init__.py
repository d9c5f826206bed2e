"""What trains: per-tower modes, LoRA placement from the family's tags, freezing that is real.

Each tower — vision, projector, language — is ``"frozen"``, ``"lora"`` or ``"full"``. LoRA targets are the
exact module names the family tags for the chosen towers and kinds (attention / MLP), never a bare suffix list,
so Qwen-VL's vision MLP (which reuses the language MLP's names) is only touched when the vision tower is tuned.
A ``"full"`` tower trains through PEFT's ``modules_to_save`` so that it is exported with the adapter.

    model = apply_tuning(model, family, TuningConfig(vision="lora", language="lora", r=16))
"""

from vlmtune.tuning.config import MODES, TuningConfig
from vlmtune.tuning.groups import param_groups, trainable_parameter_names
from vlmtune.tuning.memory import (
    enable_activation_offload,
    freeze_vision_forward,
    keep_embeddings_on_cpu,
    micro_batch_vision,
)
from vlmtune.tuning.prepare import apply_tuning, original_name, tuning_of
from vlmtune.tuning.targets import full_tower_modules, lora_target_names

__all__ = [
    "MODES",
    "TuningConfig",
    "apply_tuning",
    "enable_activation_offload",
    "freeze_vision_forward",
    "full_tower_modules",
    "keep_embeddings_on_cpu",
    "lora_target_names",
    "micro_batch_vision",
    "original_name",
    "param_groups",
    "trainable_parameter_names",
    "tuning_of",
]
