"""QLoRA on LaTeX-OCR in a dozen lines: the library calls the recipe makes, for copying into your own script.

    python examples/qlora_latex_ocr.py --model PATH --data DIR --out OUT

Try it offline on a tiny model:  vlmtune tiny --family qwen2_5_vl --out /tmp/tiny &&
vlmtune make-data latex-ocr --n 64 --out /tmp/latex && python examples/qlora_latex_ocr.py --model /tmp/tiny
--data /tmp/latex --out /tmp/qlora --steps 10
"""

import argparse

import vlmtune

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", required=True)
parser.add_argument("--data", required=True)
parser.add_argument("--out", required=True)
parser.add_argument("--steps", type=int, default=200)
args = parser.parse_args()

model, processor, adapter = vlmtune.load(args.model, quant="nf4")  # 4-bit language tower, 16-bit vision
tuning = vlmtune.TuningConfig(vision="frozen", language="lora", r=16, alpha=16)  # frozen vision: no backward
model = vlmtune.apply_tuning(model, adapter, tuning)
rows = vlmtune.load_rows("latex_ocr", split="train", path=args.data)
config = vlmtune.TrainConfig(output_dir=args.out, max_steps=args.steps, batch_size=4, lr=2e-4, logging_steps=5)
result = vlmtune.train(model, processor, adapter, rows, config, tuning)
vlmtune.export(result.model, processor, args.out, recipe={"tuning": tuning, "training": config}, base_model=args.model)
print(f"loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}; adapter and processor in {args.out}")
