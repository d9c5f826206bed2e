"""Fine-tune on your own chat-style rows (messages + images), written as jsonl next to the images.

    python examples/chat_rows.py --model PATH --data DIR --out OUT

DIR holds train.jsonl, one row per line, images relative to DIR:
    {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "A fraction."}]}],
     "images": ["images/0001.png"]}
Rows that cannot be used (missing or unreadable image, empty answer) are skipped and counted here.
"""

import argparse

import vlmtune

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", required=True)
parser.add_argument("--data", required=True)
parser.add_argument("--out", required=True)
parser.add_argument("--steps", type=int, default=200)
args = parser.parse_args()

model, processor, family = vlmtune.load(args.model)
tuning = vlmtune.TuningConfig.from_unsloth(finetune_vision_layers=True, finetune_language_layers=True, r=16)
model = vlmtune.apply_tuning(model, family, tuning)
rows = vlmtune.load_rows("chat", split="train", path=args.data)  # data_specs/chat.yaml
config = vlmtune.TrainConfig(output_dir=args.out, max_steps=args.steps, on_bad_row="skip", logging_steps=5)
result = vlmtune.train(model, processor, family, rows, config, tuning)
vlmtune.export(result.model, processor, args.out, recipe={"tuning": tuning, "training": config}, base_model=args.model)
print(f"trained on {result.kept_rows} rows, skipped {result.skipped_rows}; adapter in {args.out}")
