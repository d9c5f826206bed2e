"""One rank of the two-process CPU runs in ``tests/test_distributed.py`` (gloo backend): several runs in one launch.

    torchrun --standalone --nproc-per-node 2 tests/distributed_worker.py --out OUT_DIR \\
        --job NAME:MODEL_DIR:QUANT:MODE[:GRAD_ACCUM] ...   (MODE: ddp, fsdp, or fsdp-rank0: rank 1 loads empty)

Each ``--job`` trains LoRA on both towers for 3 steps over a global batch of 4 rows (``GRAD_ACCUM`` micro-steps of
``4 / GRAD_ACCUM``) drawn from text-only and image rows shuffled together (:func:`mixed_rows`: their answers differ
in length, so how the loss is normalised over tokens shows), then writes ``OUT_DIR/NAME/rank<N>.pt`` (per-step
losses, the LoRA weights gathered whole, where the parameters were before sharding, whether the output embedding
is still tied to the input embedding) and exports the adapter to ``OUT_DIR/NAME/export``. ``--mixed MODEL_DIR``
adds a FSDP2 run where rank 0 has only text rows and rank 1 only image rows, its eval loss on held-out rows
computed sharded before and after training; ``--resume MODEL_DIR`` adds a FSDP2
run of 4 steps checkpointed at step 2, then a fresh model resumed from that checkpoint to step 4
(``OUT_DIR/resume/rank<N>.pt`` holds both final adapters).
"""

import argparse
import os
import shutil
from pathlib import Path

import torch
from train_ddp_worker import rows
from transformers import TrainerCallback

import vlmtune
from vlmtune.distributed import trainable_state_dict

RANK = int(os.environ.get("RANK", "0"))


def mixed_rows() -> list[dict]:
    """Image rows and text-only rows in turn (8 of each): a micro-batch's halves rarely hold as many answer tokens."""
    return [row for pair in zip(rows(with_images=True), rows(with_images=False), strict=True) for row in pair]


def run(model_dir: str, quant: str, mode: str, out: Path, data: list, callbacks=None, loaded=None, **overrides):
    """Load, tune and train one run; return ``(result, model, processor)``.

    ``mode`` ``"fsdp-rank0"`` is FSDP2 with the model loaded empty on rank 1 (``empty_on_other_ranks``); then
    ``loaded`` (a dict) receives where this rank's tuned parameters were just before sharding. ``"fsdp-kernels"``
    is FSDP2 with vlmtune's Triton kernels on (the interpreter on the CPU).
    """
    empty = mode == "fsdp-rank0"
    if mode == "fsdp-kernels":
        mode, overrides = "fsdp", {"kernels": True, **overrides}
    model, processor, family = vlmtune.load(model_dir, quant=quant, empty_on_other_ranks=empty)
    tuning = vlmtune.TuningConfig(vision="lora", language="lora")
    model = vlmtune.apply_tuning(model, family, tuning)
    if loaded is not None:
        loaded["devices"] = sorted({p.device.type for p in model.parameters()})
        loaded["lora_devices"] = sorted({p.device.type for n, p in model.named_parameters() if ".lora_" in n})
    mode = "fsdp" if empty else mode
    settings = dict(output_dir=str(out), max_steps=3, batch_size=4, lr=1e-2, logging_steps=1, report=False)
    config = vlmtune.TrainConfig(distributed=mode, **{**settings, **overrides})
    return vlmtune.train(model, processor, family, data, config, tuning, callbacks), model, processor


class KernelsSeen(TrainerCallback):
    """Records, at each step, how many modules run a vlmtune kernel (the swaps carry the kernels' key)."""

    def __init__(self):
        self.counts = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.counts.append(sum("_vlmtune_kernel" in m.__dict__ for m in model.modules()))


class StepCounter(TrainerCallback):
    """Counts the optimiser steps a run takes (a resumed run takes only those after its checkpoint)."""

    steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


def lora(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in trainable_state_dict(model).items() if ".lora_" in k}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--job", action="append", default=[])
    parser.add_argument("--mixed")
    parser.add_argument("--resume")
    args = parser.parse_args()
    out = Path(args.out)
    for spec in args.job:
        name, model_dir, quant, mode, *accum = spec.split(":")
        steps = dict(grad_accum=int(accum[0]), batch_size=4 // int(accum[0])) if accum else {}
        loaded, kernels = {}, KernelsSeen()
        result, model, processor = run(
            model_dir, quant, mode, out / name, mixed_rows(), callbacks=[kernels], loaded=loaded, **steps
        )
        state = lora(model)
        vlmtune.export(model, processor, out / name / "export")
        embeddings = (model.get_input_embeddings().weight, model.get_output_embeddings().weight)
        saved = {"losses": result.losses, "lora": state, "loaded": loaded, "tied": embeddings[0] is embeddings[1]}
        saved["kernel_modules"] = kernels.counts
        torch.save(saved, out / name / f"rank{RANK}.pt")
    if args.mixed:
        held_out = dict(eval_rows=mixed_rows()[:6], eval_samples=0)  # the eval loss, sharded, before and after
        result, model, _ = run(args.mixed, "none", "fsdp", out / "mixed", rows(with_images=RANK == 1), **held_out)
        state = {"losses": result.losses, "lora": lora(model), "eval": [e["eval_loss"] for e in result.evaluations]}
        torch.save(state, out / "mixed" / f"rank{RANK}.pt")
    if args.resume:
        data = mixed_rows()
        _, whole, _ = run(args.resume, "nf4", "fsdp", out / "resume" / "whole", data, max_steps=4, save_steps=2)
        cut = out / "resume" / "cut" / "checkpoints"
        if RANK == 0:  # the run killed after its step-2 checkpoint: that checkpoint is all it left
            cut.mkdir(parents=True)
            shutil.copytree(out / "resume" / "whole" / "checkpoints" / "checkpoint-2", cut / "checkpoint-2")
        torch.distributed.barrier()
        steps = StepCounter()
        settings = dict(max_steps=4, save_steps=2, resume=True)
        result, resumed, _ = run(args.resume, "nf4", "fsdp", cut.parent, data, [steps], **settings)
        state = {"whole": lora(whole), "resumed": lora(resumed), "losses": result.losses, "steps_run": steps.steps}
        torch.save(state, out / "resume" / f"rank{RANK}.pt")


if __name__ == "__main__":
    main()
