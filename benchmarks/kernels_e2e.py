"""Kernels on vs off end to end: the same LoRA run of a real-size random model, per-step losses side by side.

    python -m benchmarks.kernels_e2e                                  # qwen2_5_vl-7b and gemma3-4b, 20 steps
    python -m benchmarks.kernels_e2e --models gemma3-4b --quant nf4   # QLoRA
    python -m benchmarks.kernels_e2e --models tiny-qwen --steps 2 --batch 2    # anywhere (CPU: interpreter)

Each model is one of ``benchmarks/train_step/specs.py``'s ``MODELS``: a random checkpoint of the released
config's real size (all layers), written once under ``--cache`` and loaded with ``vlmtune.load`` in bf16
(CUDA). LoRA (r 16) goes on the language tower's attention and MLP with the vision tower frozen, as
``vlmtune.apply_tuning`` does it (gradient checkpointing on, adapters in fp32). Then ``vlmtune.train`` runs
``--steps`` steps on the same generated LaTeX-OCR rows twice from the same LoRA initialisation: with
``TrainConfig(kernels=False)`` and with ``kernels=True`` (``apply_kernels`` after tuning). Both runs use
Trainer's bf16 autocast, its data order and its loss scaling (Gemma-3 receives ``num_items_in_batch``).

Printed per model: the two loss columns, their difference per step, the largest absolute and relative
difference, and each run's wall time (Triton's first compilation included). In bf16 the two paths round in
different places (the kernels run the LoRA product in bf16 where PEFT upcasts, the fused loss never rounds
logits to bf16 twice...), so they agree to about a percent, not bit for bit; the process exits with 1 when the
largest relative difference passes ``--rtol``. Records go to ``$OUT/kernels_e2e.json`` when ``OUT`` is set
(else ``--out``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import

HERE = Path(__file__).resolve().parent
DEFAULT_MODELS = ("qwen2_5_vl-7b", "gemma3-4b")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated MODELS keys")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4, help="samples per step")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--quant", choices=("none", "nf4"), default="none")
    parser.add_argument("--rtol", type=float, default=2e-2, help="largest relative loss difference accepted")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/vlmtune-bench"), help="checkpoints, data")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="used when $OUT is not set")
    return parser.parse_args(argv)


def _run(folder: Path, rows, args, kernels: bool, lora_init: dict[str, torch.Tensor] | None, work: Path):
    """One training run from the LoRA initialisation ``lora_init`` (taken from this run when None)."""
    import vlmtune

    model, processor, adapter = vlmtune.load(folder, quant=args.quant)
    tuning = vlmtune.TuningConfig(vision="frozen", language="lora", r=16, alpha=16)
    model = vlmtune.apply_tuning(model, adapter, tuning)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if lora_init is None:
        lora_init = {n: p.detach().clone() for n, p in trainable.items()}
    else:
        with torch.no_grad():
            for name, param in trainable.items():
                param.copy_(lora_init[name])
    config = vlmtune.TrainConfig(
        output_dir=str(work / f"kernels_{kernels}"),
        max_steps=args.steps,
        batch_size=args.batch,
        lr=args.lr,
        logging_steps=1,
        kernels=kernels,
    )
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    losses = vlmtune.train(model, processor, adapter, rows, config, tuning).losses
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    record = {
        "kernels": kernels,
        "losses": losses,
        "wall_s": time.perf_counter() - start,
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
    }
    del model, trainable
    gc.collect()  # the 7B model of the first run must be gone before the second loads
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return record, lora_init


def compare(name: str, args) -> dict[str, Any]:
    from benchmarks.train_step.checkpoints import build_checkpoint
    from vlmtune.data.latex_ocr import make_latex_ocr
    from vlmtune.data.spec import DataSpec, load_rows

    device = "cuda" if torch.cuda.is_available() else "cpu"
    folder = build_checkpoint(name, args.cache / name, device)
    data = args.cache / f"latex_ocr_{args.batch * args.steps}"
    if not (data / "train.parquet").exists():
        make_latex_ocr(args.batch * args.steps, data, seed=0, test_fraction=0.0)
    rows = load_rows(DataSpec(source_type="parquet", path=str(data)), "train")
    work = args.cache / "runs" / name
    plain, lora_init = _run(folder, rows, args, kernels=False, lora_init=None, work=work)
    fused, _ = _run(folder, rows, args, kernels=True, lora_init=lora_init, work=work)
    diffs = [abs(a - b) for a, b in zip(plain["losses"], fused["losses"], strict=True)]
    rel = [d / max(abs(a), 1e-12) for d, a in zip(diffs, plain["losses"], strict=True)]
    print(f"\n{name} ({args.quant}, batch {args.batch}, lr {args.lr})")
    print(f"{'step':>4} {'kernels off':>12} {'kernels on':>12} {'abs diff':>10}")
    for step, (a, b, d) in enumerate(zip(plain["losses"], fused["losses"], diffs, strict=True), 1):
        print(f"{step:>4} {a:>12.6f} {b:>12.6f} {d:>10.2e}")
    print(f"max abs diff {max(diffs):.3e}, max rel diff {max(rel):.3e}")
    for run in (plain, fused):
        peak = run["peak_allocated_gib"]
        peak_text = f", peak allocated {peak:.1f} GiB" if peak is not None else ""
        print(f"kernels {'on ' if run['kernels'] else 'off'}: {run['wall_s']:.1f} s for the run{peak_text}")
    return {
        "model": name,
        "quant": args.quant,
        "off": plain,
        "on": fused,
        "max_abs_diff": max(diffs),
        "max_rel_diff": max(rel),
    }


def main(argv: list[str] | None = None) -> int:
    import transformers

    args = parse_args(argv)
    results = [compare(name, args) for name in args.models.split(",")]
    record = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "steps": args.steps,
        "batch": args.batch,
        "results": results,
    }
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels_e2e.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {out / 'kernels_e2e.json'}")
    worst = max(r["max_rel_diff"] for r in results)
    if worst > args.rtol:
        print(f"FAIL: relative loss difference {worst:.3e} > --rtol {args.rtol}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
