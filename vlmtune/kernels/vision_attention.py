"""Attention over many variable-length sequences packed in one tensor (Qwen-VL's windows and images), in few calls.

Qwen2-VL, Qwen2.5-VL and Qwen3-VL's vision towers hold every patch of every image in one ``(T, hidden)`` tensor
and describe the sequences that attend to each other with ``cu_seqlens`` (one per image, or one per window in
Qwen2.5-VL's windowed layers). With ``sdpa`` or ``eager`` attention transformers loops over those sequences in
Python, one attention call each, in every block and again in the checkpointed recomputation: batch 8 of 448x448
images on Qwen2.5-VL-7B issues about 11,000 attention kernels per step and leaves the GPU idle most of the time.

:func:`varlen_attention` computes the same thing in one call per block where the hardware allows:

* on CUDA in 16-bit, with aten's variable-length flash kernel (:mod:`vlmtune.kernels.flash`);
* otherwise by length group: sequences of equal length are gathered into one ``(n, heads, L, head_dim)`` batch
  and run through one ``scaled_dot_product_attention`` call. A batch of same-size images, or Qwen2.5-VL's
  windows (all full-size but the ones on an image's right and bottom edges), makes a handful of groups; when
  every sequence has the same length the gather is a free ``view``.

Either way the arithmetic per sequence is the one the loop does (softmax over that sequence's keys only,
``scale = head_dim ** -0.5``), so results match it to the kernel's rounding. The grouping is worked out once per
``cu_seqlens`` tensor (one device-to-host copy per tensor and forward instead of one per block) and reused by
every block and by the recomputation in backward.

SigLIP towers (Gemma-3, MiniCPM-V) need nothing from this module: each image is its own sequence, so they call
``scaled_dot_product_attention`` once per layer over ``(images, heads, patches, head_dim)``, with no mask,
``is_causal=False`` and dropout 0 (SigLIP's encoder is called without an ``attention_mask``;
tests/kernels/test_patch_vision.py checks it). Measured on an H200 (torch 2.11, bf16,
``python -m benchmarks.sdpa_backends``) at Gemma-3's shape, 8 images x 16 heads x 4096 patches x head dim 72,
torch's default is cuDNN attention: 6.8 ms forward + backward, against 11.1 ms for flash (72 runs in its 96-wide
kernel), 26.2 ms for the memory-efficient kernel and 91 ms for the math path. The vision tower's shape repeats
every step, so cuDNN builds its plan once; the language tower, whose lengths change every step, leaves cuDNN out
(:mod:`vlmtune.kernels.hf.sdpa_backend`). MiniCPM-V passes a mask only when some view is padded
(``vlmtune.families.minicpmv.vision``).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vlmtune.kernels.flash import flash_varlen, runs_flash
from vlmtune.kernels.ops import kernel_op

# Which implementation varlen_attention picks: "auto" (flash varlen on CUDA in 16-bit, else grouped SDPA),
# "grouped" (always grouped SDPA) or "flash". Benchmarks and GPU tests set it to compare the two.
BACKEND = "auto"


@dataclass(frozen=True)
class SequencePlan:
    """How the sequences of one ``cu_seqlens`` are batched.

    Attributes:
        total: tokens covered (``cu_seqlens[-1]``).
        max_len: the longest sequence.
        uniform: ``(n, L)`` when all ``n`` sequences have length ``L`` (the tensor is then a plain view).
        groups: ``(L, index)`` per distinct length: ``index`` holds the token rows of every sequence of that
            length, sequence after sequence, on the device of ``cu_seqlens``.
    """

    total: int
    max_len: int
    uniform: tuple[int, int] | None
    groups: tuple[tuple[int, torch.Tensor], ...]


# The plans of the most recent cu_seqlens tensors. Qwen2.5-VL alternates between two per forward (windows in most
# blocks, whole images in its full-attention blocks), so one slot would re-plan at every switch.
_PLANS: list[tuple[weakref.ref, SequencePlan]] = []
_PLANS_KEPT = 4


def plan_sequences(cu_seqlens: torch.Tensor) -> SequencePlan:
    """The :class:`SequencePlan` of ``cu_seqlens`` (cached for the few most recent tensor objects)."""
    for ref, cached in _PLANS:
        if ref() is cu_seqlens:
            return cached
    bounds = cu_seqlens.tolist()
    spans = [(a, b - a) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]
    lengths = [n for _, n in spans]
    total = bounds[-1] - bounds[0]
    if bounds[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {bounds[0]}")
    uniform = (len(lengths), lengths[0]) if lengths and len(set(lengths)) == 1 else None
    groups = []
    if uniform is None:
        by_length: dict[int, list[int]] = {}
        for start, length in spans:
            by_length.setdefault(length, []).append(start)
        for length, group_starts in sorted(by_length.items()):
            first = torch.tensor(group_starts, dtype=torch.long)
            index = (first[:, None] + torch.arange(length)[None, :]).reshape(-1)
            groups.append((length, index.to(cu_seqlens.device, non_blocking=True)))
    plan = SequencePlan(total=total, max_len=max(lengths, default=0), uniform=uniform, groups=tuple(groups))
    _PLANS.insert(0, (weakref.ref(cu_seqlens), plan))
    del _PLANS[_PLANS_KEPT:]
    return plan


def varlen_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor
) -> torch.Tensor:
    """Bidirectional attention within each sequence of ``cu_seqlens``.

    Under ``torch.compile`` it is one custom op (the sequence plan reads ``cu_seqlens`` on the host, which a graph
    cannot), whose backward recomputes the attention: one more attention forward per block in backward, the price
    of keeping the op opaque to the compiler.

    Args:
        query, key, value: ``(T, heads, head_dim)``, the sequences one after another.
        cu_seqlens: ``(N + 1,)`` integer boundaries, from 0 to ``T`` (empty sequences allowed).

    Returns:
        ``(T, heads, head_dim)`` in the dtype of ``query``; scale ``head_dim ** -0.5``.
    """
    if torch.compiler.is_compiling():
        return VARLEN_ATTENTION.compiled(query, key, value, cu_seqlens)[0]
    return _varlen_attention(query, key, value, cu_seqlens)


def _varlen_attention(query, key, value, cu_seqlens):
    plan = plan_sequences(cu_seqlens)
    if plan.total != query.shape[0]:
        raise ValueError(f"cu_seqlens covers {plan.total} tokens, the query has {query.shape[0]}")
    if _use_flash(query):
        cu = cu_seqlens.to(torch.int32)
        return flash_varlen(query, key, value, cu, cu, plan.max_len, plan.max_len)
    return _grouped_sdpa(query, key, value, plan)


def _op_forward(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor
) -> list[torch.Tensor]:
    with torch.no_grad():
        return [_varlen_attention(query, key, value, cu_seqlens).contiguous()]


def _op_forward_fake(query, key, value, cu_seqlens):
    return [query.new_empty(query.shape)]


def _op_backward(grads: list[torch.Tensor], saved: list[torch.Tensor | None], needs: list[bool]) -> list[torch.Tensor]:
    query, key, value, cu_seqlens = saved
    with _autograd_inside_op(), torch.enable_grad():
        inputs = [t.detach().requires_grad_(n) for t, n in zip((query, key, value), needs, strict=True)]
        out = _varlen_attention(*inputs, cu_seqlens)
        wanted = [t for t in inputs if t.requires_grad]
        return [g.contiguous() for g in torch.autograd.grad(out, wanted, grads[0])]


@contextlib.contextmanager
def _autograd_inside_op() -> Iterator[None]:
    """Autograd back on inside a custom op's implementation, which the dispatcher runs with the autograd keys
    excluded: the recomputing backward needs it. torch has no public switch for this (read in 2.10 and 2.14); these
    are the thread-local guards torch's own functorch uses."""
    keys = (torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.AutogradOther)
    with contextlib.ExitStack() as stack:
        for key in keys:
            stack.enter_context(torch._C._SetExcludeDispatchKeyGuard(key, False))
        yield


def _op_backward_fake(grads, saved, needs):
    return [t.new_empty(t.shape) for t, n in zip(saved[:3], needs, strict=True) if n]


VARLEN_ATTENTION = kernel_op(
    "varlen_attention",
    forward=_op_forward,
    backward=_op_backward,
    forward_fake=_op_forward_fake,
    backward_fake=_op_backward_fake,
    outputs=1,
    save_inputs=("query", "key", "value", "cu_seqlens"),
    differentiable=("query", "key", "value"),
)


def _use_flash(query: torch.Tensor) -> bool:
    if BACKEND == "grouped":
        return False
    available = runs_flash(query)
    if BACKEND == "flash" and not available:
        raise RuntimeError(
            "flash varlen attention needs CUDA tensors in float16 / bfloat16, a head size that is a multiple of 8"
            " up to 256, and an sm80 or newer GPU"
        )
    return available


def _grouped_sdpa(query, key, value, plan: SequencePlan) -> torch.Tensor:
    tokens, heads, dim = query.shape
    if plan.uniform is not None:
        n, length = plan.uniform
        q, k, v = (t.view(n, length, heads, dim).transpose(1, 2) for t in (query, key, value))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(tokens, heads, dim)
    out = query.new_zeros(tokens, heads, dim)
    for length, index in plan.groups:
        q, k, v = (t.index_select(0, index).view(-1, length, heads, dim).transpose(1, 2) for t in (query, key, value))
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(-1, heads, dim)
        out = out.index_copy(0, index, attended)
    return out


def qwen_vision_attention_forward(
    self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor, rotary_pos_emb=None, position_embeddings=None, **_
) -> torch.Tensor:
    """Forward of a Qwen-VL ``*VisionAttention`` (``qkv`` / ``proj`` linears) with :func:`varlen_attention`.

    Bound on the module instance by :mod:`vlmtune.kernels.patch`, which stores the modeling module's own
    ``apply_rotary_pos_emb_vision`` as the swap's data, so the rotation is the family's exactly.
    """
    rotate = self._vlmtune_kernel.data
    tokens = hidden_states.shape[0]
    query, key, value = self.qkv(hidden_states).reshape(tokens, 3, self.num_heads, -1).unbind(1)
    if position_embeddings is None:  # transformers releases that still pass the raw rotary angles
        angles = torch.cat((rotary_pos_emb, rotary_pos_emb), dim=-1)
        position_embeddings = (angles.cos(), angles.sin())
    cos, sin = position_embeddings
    query, key = rotate(query, key, cos, sin)
    attended = varlen_attention(query, key, value, cu_seqlens)
    return self.proj(attended.reshape(tokens, -1))
