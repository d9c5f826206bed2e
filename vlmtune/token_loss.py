"""The training loss of a step: the mean over every supervised token of the optimiser step, on 1 or N processes.

The VLMs vlmtune tunes (Qwen-VL, Gemma-3 ...) declare ``accepts_loss_kwargs = False``, so transformers'
``Trainer`` neither counts the step's supervised tokens nor passes them to the model: each micro-batch's loss is
the mean over its own tokens, divided by the accumulation steps, and data parallelism then averages those means
over the processes. A step's loss then depends on how its rows are split: two processes, one holding short
text-only answers and one long image answers, weigh a token of the short side more than one process does with
the same rows (and so do micro-steps under gradient accumulation).

:class:`TokenMeanLoss` makes the split irrelevant without trusting a model's ``num_items_in_batch`` handling
(which differs across families and transformers versions, and which the fused cross-entropy kernel would have to
mirror): it lets the Trainer count the supervised tokens of the whole step, over its micro-steps and all
processes (``average_tokens_across_devices``), and rescales the model's own per-micro-batch mean by
``tokens here / tokens of the step``, times the world size that the gradient average divides by again. The
gradient, and the logged loss (the mean of the processes' sums), are then the single-process ones on the same
global batch. A micro-batch's mean times its token count is its sum, so this holds for any loss the model
reduces by its mean over the supervised tokens (the plain ``ForCausalLMLoss`` and vlmtune's fused kernel alike).
"""

from __future__ import annotations

from typing import Any

import torch

IGNORE = -100


class TokenMeanLoss:
    """``Trainer`` mixin (put it before ``Trainer`` in the bases): the loss of a step is its supervised-token mean.

    Evaluation keeps the Trainer's own loss (each batch's mean): only the training step is rescaled.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Counting needs this flag (it is what makes Trainer gather the step's token count and skip its own
        # division by the accumulation steps); the model still never receives num_items_in_batch.
        self.model_accepts_loss_kwargs = True

    def compute_loss(self, model, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch=None):
        """The model's mean loss on this micro-batch, rescaled to its share of the step's supervised tokens."""
        local = supervised_tokens(inputs, getattr(self, "_loss_shifts_labels", True))
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=None)
        if model.training and num_items_in_batch is not None and local is not None:
            total = num_items_in_batch.to(loss.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch
            # A micro-batch without a supervised token has a NaN mean; it adds nothing to the step's sum.
            loss = loss * (local.to(loss.device) / total) if local > 0 else loss.nan_to_num(0.0) * 0.0
            if self.args.average_tokens_across_devices:
                # The gradient all-reduce (DDP) or reduce-scatter (FSDP2) averages over the processes.
                loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss


def supervised_tokens(inputs: dict[str, Any], shifts: bool = True) -> torch.Tensor | None:
    """Supervised positions of a micro-batch as its causal LM loss counts them (``None`` without labels).

    Args:
        inputs: the collated batch.
        shifts: whether the model's loss shifts the labels (position t predicts label t + 1), so that the first
            label of each row is never a target; ``shift_labels``, when the collator gives them, count as they are.
    """
    if "shift_labels" in inputs:
        return inputs["shift_labels"].ne(IGNORE).sum()
    labels = inputs.get("labels")
    if not torch.is_tensor(labels):
        return None
    return (labels[..., 1:] if shifts else labels).ne(IGNORE).sum()
