"""Triton kernels for the language tower's hot ops (and the vision tower's LayerNorm and fc MLP), one op per
module, each beside its pure-torch reference.

Every op is a plain function with autograd support; ``patch.py`` swaps them into a loaded model. On the CPU
they run only under ``TRITON_INTERPRET=1`` (the tests do that); ``kernels=False`` keeps the plain path.
"""

from vlmtune.kernels.fc_mlp import fc_mlp, fc_mlp_reference
from vlmtune.kernels.fused_linear_ce import fused_linear_cross_entropy, fused_linear_cross_entropy_reference
from vlmtune.kernels.gated_mlp import geglu_tanh, geglu_tanh_reference, swiglu, swiglu_reference
from vlmtune.kernels.layer_norm import layer_norm, layer_norm_reference
from vlmtune.kernels.lora_linear import dequantize_nf4, lora_linear, lora_linear_reference
from vlmtune.kernels.lora_mlp import LoraProjection, lora_gated_mlp, lora_gated_mlp_reference
from vlmtune.kernels.rms_norm import rms_norm, rms_norm_reference
from vlmtune.kernels.rope import apply_mrope, apply_mrope_reference, apply_rope, apply_rope_reference

__all__ = [
    "LoraProjection",
    "apply_mrope",
    "apply_mrope_reference",
    "apply_rope",
    "apply_rope_reference",
    "dequantize_nf4",
    "fc_mlp",
    "fc_mlp_reference",
    "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_reference",
    "geglu_tanh",
    "geglu_tanh_reference",
    "layer_norm",
    "layer_norm_reference",
    "lora_gated_mlp",
    "lora_gated_mlp_reference",
    "lora_linear",
    "lora_linear_reference",
    "rms_norm",
    "rms_norm_reference",
    "swiglu",
    "swiglu_reference",
]
