"""The `vlmtune` command: demo, train, export (merge), generate, eval, make-data, tiny, report.

vlmtune demo                                            # tiny model, generated data, CPU, ~2 minutes
vlmtune make-data latex-ocr --n 2000 --out data/latex_ocr --seed 0
vlmtune train --model PATH --data DIR --out OUT [flags]  # the LaTeX-OCR recipe; `vlmtune train --help` lists them
vlmtune export --adapter OUT --merged MERGED [--base PATH]       # merge LoRA into a 16-bit checkpoint
vlmtune generate --adapter OUT --image formula.png [--prompt TEXT]
vlmtune eval --adapter OUT --data DIR [--n 100]
vlmtune tiny --family qwen2_5_vl --out tiny/qwen
vlmtune report OUT                                               # rebuild OUT/report.html from the run's files

A mistake in what the user gave (a path, a flag value, a data row, an unsupported model) prints one message and a
hint on stderr and exits with status 2; `--debug` (or VLMTUNE_DEBUG=1) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from vlmtune.atomic import OutputWriteError
from vlmtune.data.bad_rows import BadRows
from vlmtune.data.schema import DataError
from vlmtune.families import UnsupportedModelError

USER_ERROR = 2
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
    from vlmtune.distributed import is_main
    from vlmtune.recipes import latex_ocr

    config = latex_ocr.parse_args(argv, prog="vlmtune train")
    summary = latex_ocr.main(config)
    if not is_main():
        return
    if summary["losses"]:
        print(f"first loss {summary['losses'][0]:.4f}, last loss {summary['losses'][-1]:.4f}")
    if "metrics" in summary:
        print(
            f"test loss {summary['eval_loss']:.4f}; metrics:", {k: round(v, 4) for k, v in summary["metrics"].items()}
        )
    if config.training.report:
        print(f"report: {config.out}/report.html")


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
    """The argument parser of every sub-command except ``train`` (whose flags come from the recipe's config)."""
    from vlmtune.tiny import BUILDERS

    parser = argparse.ArgumentParser(
        prog="vlmtune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (or VLMTUNE_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="fine-tune the tiny Qwen2.5-VL on generated LaTeX-OCR data (CPU)")
    demo.add_argument("--out", default=None, help="working folder (default: a new temp folder)")
    demo.add_argument("--n", type=int, default=320, help="samples to generate")
    demo.add_argument("--steps", type=int, default=100, help="training steps")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)

    data = sub.add_parser("make-data", help="generate a dataset")
    data.add_argument("kind", choices=["latex-ocr"])
    data.add_argument("--n", type=int, required=True, help="samples in all")
    data.add_argument("--out", required=True, help="folder for train.parquet and test.parquet")
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--test-fraction", type=float, default=0.1, help="share of the samples in test.parquet")
    data.set_defaults(func=_make_data)

    sub.add_parser("train", help="fine-tune with the LaTeX-OCR recipe (`vlmtune train --help`)", add_help=False)

    export = sub.add_parser("export", help="merge an exported adapter into a 16-bit checkpoint")
    export.add_argument("--adapter", required=True, help="the folder `vlmtune train --out` wrote")
    export.add_argument("--merged", required=True, help="folder for the merged checkpoint")
    export.add_argument("--base", default=None, help="base checkpoint (default: the one the adapter records)")
    export.set_defaults(func=_export)

    gen = sub.add_parser("generate", help="predict for one image")
    gen.add_argument("--adapter", required=True, help="the folder `vlmtune train --out` wrote")
    gen.add_argument("--image", required=True, help="image file")
    gen.add_argument("--prompt", default=INSTRUCTION)
    gen.add_argument("--base", default=None, help="base checkpoint (default: the one the adapter records)")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.set_defaults(func=_generate)

    ev = sub.add_parser("eval", help="exact match, CER and BLEU on a test split")
    ev.add_argument("--adapter", required=True, help="the folder `vlmtune train --out` wrote")
    ev.add_argument("--data", required=True, help="data folder or file")
    ev.add_argument("--spec", default="latex_ocr", help="data spec (a bundled name or a YAML path)")
    ev.add_argument("--split", default="test")
    ev.add_argument("--n", type=int, default=100, help="rows to evaluate (the first N)")
    ev.add_argument("--base", default=None, help="base checkpoint (default: the one the adapter records)")
    ev.add_argument("--max-new-tokens", type=int, default=128)
    ev.set_defaults(func=_eval)

    tiny = sub.add_parser("tiny", help="write a tiny random checkpoint")
    tiny.add_argument("--family", required=True, choices=sorted(BUILDERS), help="the model_type to build")
    tiny.add_argument("--out", required=True, help="folder for the checkpoint")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=_tiny)

    report = sub.add_parser("report", help="rebuild OUT/report.html from a run's metrics.jsonl and records")
    report.add_argument("out", help="the run's output folder")
    report.set_defaults(func=_report)
    return parser


def _hint(err: Exception, command: str) -> str:
    """What the user can do about ``err``, raised while running ``vlmtune <command>``."""
    from vlmtune.checkpoints import NoCheckpointError, ResumeError  # here: it imports transformers' Trainer

    if isinstance(err, DataError):
        if command == "train":
            return "fix the row(s), or pass --on-bad-row skip to train without them"
        return "fix the row(s) in the data"
    if isinstance(err, NoCheckpointError):
        return "run without --resume to start from the beginning"
    if isinstance(err, ResumeError):
        return "resume with the run's own settings, or pass --resume-force to continue the changed run anyway"
    if isinstance(err, UnsupportedModelError):
        return "point --model at a checkpoint folder of one of the supported families"
    if isinstance(err, OSError):
        return f"relative paths are read from the current folder, {os.getcwd()}"
    return f"`vlmtune {command} --help` lists every flag and its valid values"


def _run(argv: list[str]) -> None:
    if argv[:1] == ["train"]:
        _train(argv[1:])
        return
    args = build_parser().parse_args(argv)
    args.func(args)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vlmtune`` console script; returns the exit status (2: a user error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("VLMTUNE_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    configure_logging()
    command = argv[0] if argv else ""
    try:
        _run(argv)
    except SystemExit as exit:  # argparse: --help (0) or a usage error (2)
        return exit.code if isinstance(exit.code, int) else USER_ERROR
    except OutputWriteError as err:  # a full disk or no permission: not the user's input, but no bug either
        if debug:
            raise
        print(f"vlmtune {command}: error: {err}", file=sys.stderr)
        return 1
    except (DataError, FileNotFoundError, NotADirectoryError, ValueError) as err:
        if debug:
            raise
        if isinstance(err, BadRows):
            listed = "\n".join("  " + line for line in str(err).splitlines())
            print(f"vlmtune {command}: error: the data has rows that cannot be used:\n{listed}", file=sys.stderr)
        else:
            print(f"vlmtune {command}: error: {str(err).splitlines()[0]}", file=sys.stderr)
        print(f"hint: {_hint(err, command)} (add --debug to see the traceback)", file=sys.stderr)
        return USER_ERROR
    return 0


def configure_logging() -> None:
    """vlmtune's own INFO messages (rows kept and skipped, where files went) on stderr; other libraries' WARNINGs.

    The per-file progress bars of reading a checkpoint and of datasets' split building are off (they flash by on
    every command); training's and downloads' bars stay.
    """
    import datasets
    from transformers.utils import logging as transformers_logging

    from vlmtune.distributed import is_main

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Under a launcher the other processes say only what goes wrong: one run, one account of it.
    logging.getLogger("vlmtune").setLevel(logging.INFO if is_main() else logging.WARNING)
    transformers_logging.disable_progress_bar()
    datasets.disable_progress_bars()


if __name__ == "__main__":
    sys.exit(main())
