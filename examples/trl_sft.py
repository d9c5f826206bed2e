"""TRL's SFTTrainer with vlmtune's parts: the flow of TRL's and Unsloth's vision notebooks, on any supported family.

    python examples/trl_sft.py --model PATH --data DIR --out OUT [--steps 200]

vlmtune.load gives the model and processor (`quant="nf4"` for QLoRA), apply_tuning the LoRA placement and real
freezing, vlmtune's collator the batches (labels on the answers only, images never cut, every row checked before
the first step) and, on CUDA, vlmtune's Triton kernels; TRL's SFTTrainer runs the loop, with its own fused
LM-head loss. Try it offline on a tiny model:

    vlmtune tiny --family qwen2_5_vl --out /tmp/tiny && vlmtune make-data latex-ocr --n 64 --out /tmp/latex &&
    python examples/trl_sft.py --model /tmp/tiny --data /tmp/latex --out /tmp/trl --steps 20
"""

import argparse

import torch
import transformers
from packaging.version import Version
from trl import SFTConfig, SFTTrainer

import vlmtune
from vlmtune.data.collator import Collator, PreparedDataset
from vlmtune.kernels.patch import ALL_OPS, apply_kernels
from vlmtune.loading import compute_dtype

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", required=True)
parser.add_argument("--data", required=True)
parser.add_argument("--out", required=True)
parser.add_argument("--steps", type=int, default=200)
parser.add_argument("--lr", type=float, default=5e-3)
args = parser.parse_args()

model, processor, family = vlmtune.load(args.model)
tuning = vlmtune.TuningConfig(vision="frozen", language="lora", r=16, alpha=16)
model = vlmtune.apply_tuning(model, family, tuning)
rows = vlmtune.load_rows("latex_ocr", split="train", path=args.data)
collator = Collator(family, processor, model.config, max_length=2048)
checked = PreparedDataset(rows, collator, bad_rows_path=f"{args.out}/bad_rows.jsonl")
if torch.cuda.is_available():
    # TRL computes the loss with its own fused LM head, so vlmtune's fused cross-entropy stays out.
    apply_kernels(model, family, ops=tuple(op for op in ALL_OPS if op != "cross_entropy"))

dtype = compute_dtype("auto")
# apply_tuning has set up non-reentrant activation checkpointing; the trainer must not redo it (and with it
# re-hook the input embeddings). transformers 5.23 renamed the argument.
renamed = Version(transformers.__version__) >= Version("5.23")
no_checkpointing = {"activation_checkpointing" if renamed else "gradient_checkpointing": False}
config = SFTConfig(
    output_dir=f"{args.out}/checkpoints",
    max_steps=args.steps,
    per_device_train_batch_size=4,
    learning_rate=args.lr,
    logging_steps=1,
    save_strategy="no",
    report_to="none",
    bf16=dtype == torch.bfloat16,
    fp16=dtype == torch.float16,
    use_cpu=not torch.cuda.is_available(),
    remove_unused_columns=False,  # the collator reads the items' "index" and "row"
    dataset_kwargs={"skip_prepare_dataset": True},  # the collator tokenizes; TRL's preparation would redo it
    **no_checkpointing,
)
trainer = SFTTrainer(
    model=model,
    args=config,
    train_dataset=checked.to_hf_dataset(),
    data_collator=collator,
    processing_class=processor,
)
trainer.train()
vlmtune.export(model, processor, args.out, recipe={"tuning": tuning, "trl": config.to_dict()})
losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps; adapter and processor in {args.out}")
