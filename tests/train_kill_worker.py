"""A LaTeX-OCR run of the tiny Qwen2.5-VL for ``tests/test_train_eval.py``: 6 steps, a checkpoint and an evaluation
every 2 steps. With ``--kill-at N`` the process SIGKILLs itself once step N is logged (metrics.jsonl holds it,
no checkpoint does); without, it resumes from the latest checkpoint in OUT when there is one.

    python tests/train_kill_worker.py --model TINY_QWEN_DIR --data LATEX_DIR --out OUT [--kill-at 3]
"""

import argparse
import os
import signal
from pathlib import Path

from transformers import TrainerCallback

import vlmtune


class KillAt(TrainerCallback):
    """SIGKILL this process after step ``step``'s log line (vlmtune's callbacks run before a user's)."""

    def __init__(self, step: int):
        self.step = step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs and state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--kill-at", type=int, default=None)
    args = parser.parse_args()
    model, processor, family = vlmtune.load(args.model)
    model = vlmtune.apply_tuning(model, family, vlmtune.TuningConfig(vision="frozen"))
    train_rows = vlmtune.load_rows("latex_ocr", split="train", path=args.data)
    test_rows = vlmtune.load_rows("latex_ocr", split="test", path=args.data)
    resume = any((args.out / "checkpoints").glob("checkpoint-*"))
    config = vlmtune.TrainConfig(
        output_dir=str(args.out),
        max_steps=6,
        batch_size=2,
        lr=5e-3,
        logging_steps=1,
        save_steps=2,
        eval_rows=[test_rows[i] for i in range(4)],
        eval_steps=2,
        eval_samples=2,
        eval_max_new_tokens=6,
        report_latex=True,
        resume_from_checkpoint=True if resume else None,
    )
    callbacks = [KillAt(args.kill_at)] if args.kill_at else []
    vlmtune.train(model, processor, family, train_rows, config, callbacks=callbacks)


if __name__ == "__main__":
    main()
