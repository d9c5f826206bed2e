"""``vision_attention``: Qwen-VL's vision ``*VisionAttention`` modules attend every image / window in one call
(:mod:`vlmtune.kernels.vision_attention`) instead of transformers' Python loop over ``cu_seqlens``; the family's
``vision_attention_kind`` says which families have it."""

from __future__ import annotations

import sys

from vlmtune.kernels.hf.common import find_kernel, style, swap

# vision_attention_kind -> the forward replacing the vision tower's attention modules, and the modeling
# module's function that forward rotates q / k with.
_VISION_ATTENTION_STYLES = {"cu_seqlens": ("qwen_vision_attention_forward", "apply_rotary_pos_emb_vision")}


def apply(base, language, family, patch) -> None:
    if family.vision_attention_kind is None:
        return
    forward_name, rotate_name = style(
        _VISION_ATTENTION_STYLES, family.vision_attention_kind, "vision_attention_kind", family
    )
    forward = find_kernel("vision_attention", forward_name)
    for name, module in base.named_modules():
        rotate = getattr(sys.modules.get(type(module).__module__), rotate_name, None)
        if (
            family.tower_of(name) != "vision"
            or not type(module).__name__.endswith("VisionAttention")
            or rotate is None
            or not all(hasattr(module, a) for a in ("qkv", "proj", "num_heads"))
        ):
            continue
        swap(module, forward, patch, rotate)
        patch.patched["vision_attention"].append(name)
