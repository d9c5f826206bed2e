"""Triton kernels for the language tower's hot ops (and the vision tower's LayerNorm and fc MLP), one op per
module, each beside its pure-torch reference.

Every op is a plain function with autograd support; ``patch.py`` swaps them into a loaded model. On the CPU
they run only under ``TRITON_INTERPRET=1`` (the tests do that); ``kernels=False`` keeps the plain path.

Each op is also a pair of PyTorch custom ops (``torch.ops.vlmtune.<op>`` and ``<op>_backward``), which is what
``torch.compile`` records (:mod:`vlmtune.compile`): dynamo cannot trace a Triton launch through
:mod:`vlmtune.kernels.launch`, and the custom op's dispatch is too slow for eager mode. A new kernel module declares
its op with :func:`vlmtune.kernels.ops.kernel_op` from two annotated functions it already has, next to its
``autograd.Function``:

    def _op_forward(x: Tensor, weight: Tensor, eps: float) -> list[Tensor]:
        ...                                  # the launches; returns [output, *residuals for backward]
    def _op_backward(grads: list[Tensor], saved: list[Optional[Tensor]], needs: list[bool]) -> list[Tensor]:
        ...                                  # one gradient per True in needs
    NORM = kernel_op("my_norm", forward=_op_forward, backward=_op_backward,
                     forward_fake=..., backward_fake=...,     # shapes / dtypes / strides only, on fake tensors
                     outputs=1, save_inputs=("x", "weight"), differentiable=("x", "weight"))

    def my_norm(x, weight, eps):
        if torch.compiler.is_compiling():
            return NORM.compiled(x, weight, float(eps))[0]    # one node in the compiled graph
        return _MyNormFunction.apply(x, weight, float(eps))  # eager: the hand-written Function, no dispatcher

(a module without its own ``autograd.Function`` calls ``NORM(...)``, which picks either path itself). Non-tensor
arguments the schema cannot hold (a bitsandbytes ``QuantState``, a tuple of projections) are taken apart into
tensors, ints, floats and lists first (:func:`vlmtune.kernels.lora_linear.nf4_args`). The fake functions count rows
with :func:`vlmtune.kernels.ops.leading_rows`, never ``Size.numel()``, which would pin every sequence length into
the graph's guards. Add a ``torch.library.opcheck`` case to ``tests/kernels/test_ops.py`` and the public function to
its compiled == eager test.
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
