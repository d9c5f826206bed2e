"""The `vlmtune` command: demo, train, export (merge), generate, eval, make-data, tiny, report.

vlmtune demo                                            # tiny model, generated data, CPU, ~2 minutes
vlmtune make-data latex-ocr --n 2000 --out data/latex_ocr --seed 0
vlmtune train --model PATH --data DIR --out OUT [--qlora] ...   # runs recipes/latex_ocr.py
vlmtune export --adapter OUT --merged MERGED [--base PATH]       # merge LoRA into a 16-bit checkpoint
vlmtune generate --adapter OUT --image formula.png [--prompt TEXT]
vlmtune eval --adapter OUT --data DIR [--n 100]
vlmtune tiny --family qwen2_5_vl --out tiny/qwen
vlmtune report OUT                                               # rebuild OUT/report.html from the run's files
"""

from __future__ import annotations

import argparse
import logging
import runpy
import sys
import tempfile
import time
from pathlib import Path

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
INSTRUCTION = "Write the LaTeX representation for this image."


def _demo(args: argparse.Namespace) -> None:
    import torch

    import vlmtune
    from vlmtune import tiny
    from vlmtune.data.latex_ocr import make_latex_ocr
    from vlmtune.evaluate import answer_of, generate, ocr_metrics

    start = time.time()
    work = Path(args.out or tempfile.mkdtemp(prefix="vlmtune-demo-"))
    print(f"[demo] working in {work}")
    base = tiny.build("qwen2_5_vl", work / "tiny-qwen2_5_vl", seed=args.seed)
    make_latex_ocr(args.n, work / "data", seed=args.seed, test_fraction=0.1)
    print(f"[demo] built tiny Qwen2.5-VL and {args.n} LaTeX-OCR samples ({time.time() - start:.0f}s)")

    model, processor, family = vlmtune.load(base)
    model = vlmtune.apply_tuning(model, family, vlmtune.TuningConfig(vision="lora", language="lora", r=16))
    train_rows = vlmtune.load_rows("latex_ocr", split="train", path=work / "data")
    test_rows = vlmtune.load_rows("latex_ocr", split="test", path=work / "data")
    held_out = [test_rows[0]]
    before = generate(model, processor, held_out, max_new_tokens=48)[0]

    config = vlmtune.TrainConfig(
        output_dir=str(work / "out"),
        max_steps=args.steps,
        batch_size=8,
        lr=1e-2,
        logging_steps=10,
        seed=args.seed,
        eval_rows=[test_rows[i] for i in range(len(test_rows))],
        eval_steps=max(1, args.steps // 4),
        eval_samples=4,
        eval_max_new_tokens=48,
        report_latex=True,
    )
    result = vlmtune.train(model, processor, family, train_rows, config)
    print(f"[demo] loss: first {result.losses[0]:.3f} -> last {result.losses[-1]:.3f} over {args.steps} steps")

    out = vlmtune.export(result.model, processor, work / "out", recipe=config, base_model=str(base))
    reloaded, reloaded_processor = vlmtune.load_exported(out, dtype=torch.float32)
    after = generate(reloaded, reloaded_processor, held_out, max_new_tokens=48)[0]
    reference = answer_of(held_out[0])
    print(f"[demo] exported to {out}; reloaded with plain transformers + peft")
    print(f"[demo] held-out image, reference : {reference}")
    print(f"[demo]   before training predicted: {before[:120]!r}")
    print(f"[demo]   after training predicted : {after[:120]!r}")
    print(f"[demo]   after training CER       : {ocr_metrics([after], [reference])['cer']:.3f}")
    print(f"[demo] report: {work / 'out' / 'report.html'} (metrics per step: {work / 'out' / 'metrics.jsonl'})")
    print(f"[demo] done in {time.time() - start:.0f}s")


def _make_data(args: argparse.Namespace) -> None:
    from vlmtune.data.latex_ocr import make_latex_ocr

    paths = make_latex_ocr(args.n, args.out, seed=args.seed, test_fraction=args.test_fraction)
    print(f"wrote {paths['train']} and {paths['test']}")


def _train(argv: list[str]) -> None:
    sys.argv = [str(RECIPES / "latex_ocr.py"), *argv]
    runpy.run_path(str(RECIPES / "latex_ocr.py"), run_name="__main__")


def _export(args: argparse.Namespace) -> None:
    from vlmtune.export import merge

    print(f"merged checkpoint at {merge(args.adapter, args.merged, base_model=args.base)}")


def _generate(args: argparse.Namespace) -> None:
    from vlmtune.evaluate import generate
    from vlmtune.export import load_exported

    model, processor = load_exported(args.adapter, args.base)
    row = {
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": args.prompt}]},
            {"role": "assistant", "content": [{"type": "text", "text": "?"}]},
        ],
        "images": [args.image],
    }
    print(generate(model, processor, [row], max_new_tokens=args.max_new_tokens)[0])


def _eval(args: argparse.Namespace) -> None:
    import vlmtune
    from vlmtune.evaluate import answer_of, generate, ocr_metrics
    from vlmtune.export import load_exported

    model, processor = load_exported(args.adapter, args.base)
    rows = vlmtune.load_rows(args.spec, split=args.split, path=args.data)
    rows = [rows[i] for i in range(min(args.n, len(rows)))]
    predictions = generate(model, processor, rows, max_new_tokens=args.max_new_tokens)
    print(ocr_metrics(predictions, [answer_of(r) for r in rows]))


def _report(args: argparse.Namespace) -> None:
    from vlmtune.report import build_report

    print(f"wrote {build_report(args.out)}")


def _tiny(args: argparse.Namespace) -> None:
    from vlmtune import tiny

    print(tiny.build(args.family, args.out, seed=args.seed))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command except ``train`` (which forwards to the recipe)."""
    parser = argparse.ArgumentParser(prog="vlmtune", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="fine-tune the tiny Qwen2.5-VL on generated LaTeX-OCR data (CPU)")
    demo.add_argument("--out", default=None, help="working folder (default: a new temp folder)")
    demo.add_argument("--n", type=int, default=320, help="samples to generate")
    demo.add_argument("--steps", type=int, default=100, help="training steps")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)

    data = sub.add_parser("make-data", help="generate a dataset")
    data.add_argument("kind", choices=["latex-ocr"])
    data.add_argument("--n", type=int, required=True)
    data.add_argument("--out", required=True)
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--test-fraction", type=float, default=0.1)
    data.set_defaults(func=_make_data)

    sub.add_parser("train", help="run recipes/latex_ocr.py (all its flags apply)", add_help=False)

    export = sub.add_parser("export", help="merge an exported adapter into a 16-bit checkpoint")
    export.add_argument("--adapter", required=True)
    export.add_argument("--merged", required=True)
    export.add_argument("--base", default=None, help="base checkpoint (default: the adapter's record)")
    export.set_defaults(func=_export)

    gen = sub.add_parser("generate", help="predict for one image")
    gen.add_argument("--adapter", required=True)
    gen.add_argument("--image", required=True)
    gen.add_argument("--prompt", default=INSTRUCTION)
    gen.add_argument("--base", default=None)
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.set_defaults(func=_generate)

    ev = sub.add_parser("eval", help="exact match, CER and BLEU on a test split")
    ev.add_argument("--adapter", required=True)
    ev.add_argument("--data", required=True)
    ev.add_argument("--spec", default="latex_ocr")
    ev.add_argument("--split", default="test")
    ev.add_argument("--n", type=int, default=100)
    ev.add_argument("--base", default=None)
    ev.add_argument("--max-new-tokens", type=int, default=128)
    ev.set_defaults(func=_eval)

    tiny = sub.add_parser("tiny", help="write a tiny random checkpoint")
    tiny.add_argument("--family", required=True)
    tiny.add_argument("--out", required=True)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=_tiny)

    report = sub.add_parser("report", help="rebuild OUT/report.html from a run's metrics.jsonl and records")
    report.add_argument("out", help="the run's output folder")
    report.set_defaults(func=_report)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``vlmtune`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if argv and argv[0] == "train":
        _train(argv[1:])
        return
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
