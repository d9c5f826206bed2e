"""One rank of the two-process CPU training run in ``tests/test_train.py`` (gloo backend).

    torchrun --standalone --nproc-per-node 2 tests/train_ddp_worker.py --model TINY_QWEN_DIR --out OUT_DIR

Rank 0 trains on text-only rows, rank 1 on rows with an image, so on rank 0 the vision tower never runs and its
LoRA gets no local gradient: the case where DDP hangs unless it looks for unused parameters. Each rank saves
its vision LoRA parameters before and after training to ``OUT_DIR/rank<N>.pt``.
"""

import argparse
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import vlmtune


def rows(with_images: bool, n: int = 8) -> list[dict]:
    """``n`` rows: a question about a random 56x56 image, or the same question in words only."""
    out = []
    for i in range(n):
        if with_images:
            image = Image.fromarray(np.random.default_rng(i).integers(0, 256, (56, 56, 3), dtype=np.uint8))
            user = [{"type": "image"}, {"type": "text", "text": "Describe it."}]
            out.append({"messages": _turns(user, f"noise {i}"), "images": [image]})
        else:
            out.append({"messages": _turns([{"type": "text", "text": f"What is {i} + {i}?"}], str(2 * i))})
    return out


def _turns(user: list[dict], answer: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]


def vision_lora(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".visual." in n and ".lora_" in n}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    rank = int(os.environ["RANK"])
    model, processor, family = vlmtune.load(args.model)
    tuning = vlmtune.TuningConfig(vision="lora", language="lora")
    model = vlmtune.apply_tuning(model, family, tuning)
    before = vision_lora(model)
    config = vlmtune.TrainConfig(
        output_dir=args.out, max_steps=args.steps, batch_size=2, lr=1e-2, logging_steps=1, save_steps=0
    )
    result = vlmtune.train(model, processor, family, rows(with_images=rank == 1), config, tuning)
    torch.save(
        {"before": before, "after": vision_lora(model), "losses": result.losses},
        Path(args.out) / f"rank{rank}.pt",
    )


if __name__ == "__main__":
    main()
