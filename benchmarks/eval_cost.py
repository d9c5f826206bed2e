"""What evaluation during training costs: one LaTeX-OCR run of a real-size random model with the kernels on and an
evaluation every N steps; the time per training step and per evaluation (eval loss + generation).

    python -m benchmarks.eval_cost --model qwen2_5_vl-7b                        # CUDA: 60 steps, evaluation every 20
    python -m benchmarks.eval_cost --model gemma3-4b --quant nf4                # QLoRA
    python -m benchmarks.eval_cost --model tiny-qwen --steps 4 --eval-steps 2 --rows 24 --eval-rows 4  # anywhere

The model is one of ``benchmarks/train_step/specs.py``'s ``MODELS``: random weights of the released config's size
(all layers), written once under ``--cache`` by ``benchmarks/train_step/checkpoints.py``. It is loaded with
``vlmtune.load`` (bf16 on CUDA), gets LoRA r 16 on the language tower's attention and MLP (vision frozen), and
``vlmtune.train`` runs ``--steps`` steps on generated LaTeX-OCR rows with ``TrainConfig(kernels=None)`` (the
Triton kernels on CUDA; on the CPU the plain path), a log line per step and ``eval_rows`` held-out rows: the eval
loss over all ``--eval-rows`` and greedy generation on ``--eval-samples`` of them, before the first step, every
``--eval-steps`` and at the end.

Everything printed is read back from the run's ``metrics.jsonl``: the median training step (after the first
``--warmup`` steps, where Triton compiles), each evaluation's time split into eval loss and generation (the step-0
evaluation apart: its first generation warms up), and what one evaluation costs in training steps. A random model
seldom emits its end-of-turn token, so generation runs the whole ``--max-new-tokens`` budget: the most an
evaluation costs at that budget. The record goes to ``$OUT/eval_cost.json`` when ``OUT`` is set (else ``--out``);
the run's ``report.html`` and ``metrics.jsonl`` sit in ``--cache``/eval_cost/<model>_<quant>.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2_5_vl-7b", help="a benchmarks/train_step/specs.py MODELS key")
    parser.add_argument("--quant", choices=("none", "nf4"), default="none")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--eval-steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4, help="samples per step")
    parser.add_argument("--rows", type=int, default=400, help="generated training rows")
    parser.add_argument("--eval-rows", type=int, default=64, help="held-out rows of the eval loss")
    parser.add_argument("--eval-samples", type=int, default=16, help="held-out rows generated on")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the step time")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/vlmtune-bench"), help="checkpoints, data, runs")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="used when $OUT is not set")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> Path:
    """Build (once) the checkpoint and the data, train with evaluation; return the run folder."""
    import torch

    import vlmtune
    from benchmarks.train_step.checkpoints import build_checkpoint
    from vlmtune.data.latex_ocr import make_latex_ocr

    device = "cuda" if torch.cuda.is_available() else "cpu"
    checkpoint = build_checkpoint(args.model, args.cache / args.model, device)
    total = args.rows + args.eval_rows
    data = args.cache / f"latex_ocr_{args.rows}_{args.eval_rows}"
    if not (data / "test.parquet").exists():
        make_latex_ocr(total, data, seed=0, test_fraction=args.eval_rows / total)
    model, processor, family = vlmtune.load(checkpoint, quant=args.quant)
    tuning = vlmtune.TuningConfig(vision="frozen", language="lora", r=16, alpha=16)
    model = vlmtune.apply_tuning(model, family, tuning)
    train_rows = vlmtune.load_rows("latex_ocr", split="train", path=data)
    test_rows = vlmtune.load_rows("latex_ocr", split="test", path=data)
    work = args.cache / "eval_cost" / f"{args.model}_{args.quant}"
    config = vlmtune.TrainConfig(
        output_dir=str(work),
        max_steps=args.steps,
        batch_size=args.batch,
        lr=2e-4,
        logging_steps=1,
        eval_rows=[test_rows[i] for i in range(min(args.eval_rows, len(test_rows)))],
        eval_steps=args.eval_steps,
        eval_samples=args.eval_samples,
        eval_max_new_tokens=args.max_new_tokens,
        report_latex=True,
    )
    vlmtune.train(model, processor, family, train_rows, config, tuning)
    return work


def summarize(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The record of one run, from its ``metrics.jsonl`` and ``run.json``."""
    from vlmtune import run_files

    lines = run_files.read_lines(work / run_files.METRICS)
    summary = run_files.read_json(work / run_files.RUN)
    train = [r for r in lines if r["kind"] == "train"]
    evals = [r for r in lines if r["kind"] == "eval"]
    timed = [r["step_time_s"] for r in train if r["step"] > args.warmup] or [r["step_time_s"] for r in train]
    later = [r for r in evals if r["step"] > 0]
    step_s = statistics.median(timed)
    eval_s = statistics.mean(r["eval_s"] for r in later) if later else None
    peaks = [r["gpu_peak_gib"] for r in train if r["gpu_peak_gib"] is not None]
    return {
        "model": args.model,
        "quant": args.quant,
        "device": summary.get("device"),
        "kernels": summary.get("kernels"),
        "batch": args.batch,
        "steps": args.steps,
        "eval_steps": args.eval_steps,
        "eval_rows": summary.get("rows", {}).get("eval", {}).get("kept"),
        "eval_samples": args.eval_samples,
        "max_new_tokens": args.max_new_tokens,
        "step_s_median": step_s,
        "step_s_mean": statistics.mean(timed),
        "eval_s_mean": eval_s,
        "eval_loss_s_mean": statistics.mean(r["eval_loss_s"] for r in later) if later else None,
        "generation_s_mean": statistics.mean(r["generation_s"] for r in later) if later else None,
        "eval_in_steps": eval_s / step_s if eval_s is not None else None,
        "overhead": eval_s / (args.eval_steps * step_s) if eval_s is not None and args.eval_steps else None,
        "evaluations": [{k: r[k] for k in ("step", "eval_s", "eval_loss_s", "generation_s")} for r in evals],
        "peak_gpu_gib": max(peaks) if peaks else None,
        "wall_s": max(r["elapsed_s"] for r in lines),
        "report": str(work / run_files.REPORT),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": summary.get("versions"),
    }


def describe(record: dict[str, Any]) -> str:
    """The printed lines of a record."""
    kernels = "kernels on" if record["kernels"] else "kernels off"
    peak = f", peak GPU memory {record['peak_gpu_gib']:.1f} GiB" if record["peak_gpu_gib"] is not None else ""
    first = record["evaluations"][0]
    lines = [
        f"{record['model']} ({record['quant']}, {kernels}) on {record['device']}: batch {record['batch']}, "
        f"{record['steps']} steps, evaluation every {record['eval_steps']} steps",
        f"  training step    : {record['step_s_median']:.3f} s median ({record['step_s_mean']:.3f} s mean){peak}",
        f"  step-0 evaluation: {first['eval_s']:.1f} s (eval loss {first['eval_loss_s']:.1f} s + generation "
        f"{first['generation_s']:.1f} s, first generation included)",
    ]
    if record["eval_s_mean"] is not None:
        steps = ", ".join(str(e["step"]) for e in record["evaluations"][1:])
        lines += [
            f"  evaluation       : {record['eval_s_mean']:.1f} s mean at steps {steps} = eval loss on "
            f"{record['eval_rows']} rows {record['eval_loss_s_mean']:.1f} s + generation on "
            f"{record['eval_samples']} rows x {record['max_new_tokens']} tokens {record['generation_s_mean']:.1f} s",
            f"  cost             : one evaluation = {record['eval_in_steps']:.1f} training steps; every "
            f"{record['eval_steps']} steps it adds {100 * record['overhead']:.0f}% to the training time",
        ]
    lines.append(f"  report           : {record['report']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    record = summarize(run(args), args)
    record["benchmark_s"] = time.perf_counter() - start
    print(describe(record))
    out = Path(os.environ.get("OUT") or args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval_cost.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"record: {out / 'eval_cost.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
