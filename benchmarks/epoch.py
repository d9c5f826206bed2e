"""One epoch of generated LaTeX-OCR rows per stack, each at its best setting under one memory cap.

    python -m benchmarks.epoch --model qwen2_5_vl-7b --rows 20000 --memory-cap-gib 24      # CUDA, QLoRA
    python -m benchmarks.epoch --model gemma3-4b --rows 20000 --memory-cap-gib 80
    python -m benchmarks.epoch --tiny --out /tmp/epoch                                       # anywhere, seconds

Every stack trains on the same ``--rows`` rows (``vlmtune.data.latex_ocr``, seed 0), one epoch, in a process of its
own (fresh CUDA context, ``torch.cuda.set_per_process_memory_fraction`` holding it to ``--memory-cap-gib``):

* ``vlmtune``: ``vlmtune.train`` with token-budget packing and ``max_tokens_per_step="auto"`` under the cap (the
  kernels on CUDA, data workers by default);
* ``hf_qlora`` / ``unsloth`` (and ``hf_bf16`` on the CPU): the model set up as ``benchmarks/train_step/worker.py``
  does, at the largest batch that fits the cap (``vlmtune.step_search`` over probe steps on the longest rows,
  weights restored after), then the plain loop of that benchmark over padded batches of vlmtune's collator, fed by
  a DataLoader with the same workers.

``--baseline-batch N`` gives the baselines a batch size instead of the search (each of its probes at a new size can
cost a compilation in Unsloth). A baseline stopped by ``--timeout`` still reports the rows it trained so far and
their rate (status ``partial``).

Reported per stack: epoch wall time (the training alone, after set-up and the search; vlmtune's includes its
probe, ``probe_s``, and ``train_s`` is its training steps alone), rows/s, optimiser steps, the step size chosen,
peak allocated memory, the mean loss of the last 10%% of steps, and ``held_out_loss``: after the epoch, the loss
per supervised token on ``--eval-rows`` other generated rows (seed :data:`EVAL_SEED`, the same rows and collator
for every stack, padded batches in eval mode). The training losses compare only between runs of as many optimiser
steps; the held-out loss compares what each stack's epoch taught. The records go to ``<out>/epoch_<model>.json``
(``$OUT`` when set), the table to stdout.
``--tiny`` runs the tiny Qwen2.5-VL on the CPU: 8 rows, stacks ``vlmtune,hf_bf16``, no memory cap.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "@@EPOCH "
PROGRESS = "@@PROGRESS "
GIB = 2**30
LR = 2e-4
CPU_BATCH = 4
EVAL_SEED = 10_000
"""The held-out rows' seed: the epoch's parts are seeds 0 .. --render-workers - 1."""
EVAL_BATCH = 4


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2_5_vl-7b", help="a benchmarks/train_step/specs.py MODELS key")
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--stacks", default="vlmtune,unsloth,hf_qlora")
    parser.add_argument("--memory-cap-gib", type=float, default=24.0)
    parser.add_argument("--vision", default="frozen", choices=("frozen", "lora"), help="vision tower, every stack")
    parser.add_argument("--eval-rows", type=int, default=64, help="held-out rows scored after the epoch (0: none)")
    parser.add_argument("--tiny", action="store_true", help="tiny Qwen2.5-VL on the CPU, 8 rows")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/vlmtune-bench"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--peer-site", default="/tmp/peer-site", help="site folder holding Unsloth")
    parser.add_argument("--render-workers", type=int, default=os.cpu_count() or 1, help="processes rendering rows")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per stack; a stack over it is stopped")
    parser.add_argument(
        "--baseline-batch", type=int, default=None, help="the baselines' batch size (default: the largest that fits)"
    )
    args = parser.parse_args(argv)
    if args.tiny:
        args.model, args.rows, args.stacks, args.memory_cap_gib = "tiny-qwen", min(args.rows, 8), "vlmtune,hf_bf16", 0
        args.eval_rows = min(args.eval_rows, 4)
    return args


# ------------------------------------------------------------------------------------------------------ worker


def _render_part(folder: Path, rows: int, seed: int) -> Path:
    from vlmtune.data.latex_ocr import make_latex_ocr

    return make_latex_ocr(rows, folder, seed=seed, test_fraction=0.0)["train"]


def render_rows(args) -> Path:
    """The epoch's rows, rendered once per machine: ``--render-workers`` processes each render a part (seed = the
    part's number), joined in part order into one ``train.parquet``; the same arguments give the same rows."""
    import concurrent.futures

    import datasets

    folder = args.cache / f"latex_ocr_epoch_{args.rows}_w{args.render_workers}"
    if (folder / "train.parquet").exists():
        return folder
    parts = min(args.render_workers, args.rows)
    sizes = [args.rows // parts + (i < args.rows % parts) for i in range(parts)]
    with concurrent.futures.ProcessPoolExecutor(parts) as pool:
        files = list(pool.map(_render_part, [folder / f"part{i}" for i in range(parts)], sizes, range(parts)))
    joined = datasets.concatenate_datasets([datasets.Dataset.from_parquet(str(f)) for f in files])
    joined.to_parquet(str(folder / "train.parquet.tmp"))
    (folder / "train.parquet.tmp").rename(folder / "train.parquet")
    return folder


def render_eval_rows(args) -> Path | None:
    """The held-out rows (``--eval-rows`` of seed :data:`EVAL_SEED`), rendered once per machine."""
    if not args.eval_rows:
        return None
    folder = args.cache / f"latex_ocr_eval_{args.eval_rows}"
    if not (folder / "train.parquet").exists():
        _render_part(folder, args.eval_rows, EVAL_SEED)
    return folder


def _data(args, folder: Path) -> Any:
    from vlmtune.data.spec import load_rows

    return load_rows("latex_ocr", split="train", path=folder)


def held_out(args, model, collator, device: str, keep=lambda batch: batch) -> float:
    """:func:`held_out_loss` of the ``--eval-rows`` held-out rows."""
    from vlmtune.data.collator import PreparedDataset

    rows = _data(args, render_eval_rows(args))
    return held_out_loss(model, collator, PreparedDataset(rows, collator), device, keep)


def held_out_loss(model, collator, prepared, device: str, keep=lambda batch: batch) -> float:
    """Loss per supervised token of the ``prepared`` rows (padded batches of ``collator``, eval mode, no gradients):
    each batch's mean loss weighted by its supervised tokens, as the model's own loss counts them (labels shifted
    by one)."""
    import torch

    from vlmtune.data.collator import IGNORE_INDEX

    total = tokens = 0.0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(prepared), EVAL_BATCH):
            batch = collator([prepared[i] for i in range(start, min(start + EVAL_BATCH, len(prepared)))])
            count = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in keep(batch).items()}
            total += float(model(**inputs).loss) * count
            tokens += count
    return total / tokens


def run_vlmtune(args, checkpoint: Path, rows, device: str) -> dict[str, Any]:
    import vlmtune
    from vlmtune.step_probe import step_size_of

    quant = "nf4" if device == "cuda" else "none"
    model, processor, family = vlmtune.load(checkpoint, quant=quant)
    tuning = vlmtune.TuningConfig(vision=args.vision, language="lora", r=16, alpha=16)
    model = vlmtune.apply_tuning(model, family, tuning)
    config = vlmtune.TrainConfig(
        output_dir=str(args.cache / "epoch_runs" / args.model),
        epochs=1,
        lr=LR,
        packing=True,
        max_tokens_per_step="auto",
        memory_limit_gib=args.memory_cap_gib or None,
        logging_steps=1,
        report=False,
    )
    clock = _train_clock()
    start = time.perf_counter()
    result = vlmtune.train(model, processor, family, rows, config, tuning, callbacks=[clock])
    wall = time.perf_counter() - start
    chosen = step_size_of(result.model) or {}
    # train() runs the memory probe before the first step: its seconds are inside epoch_s (a user waits for them).
    run = {"epoch_s": wall, "losses": result.losses, "step": {"max_tokens_per_step": chosen.get("value")}}
    run["peak_alloc_gib"] = _peak(device)  # the epoch's, before the held-out rows
    if args.eval_rows:
        from vlmtune.data.collator import Collator

        collator = Collator(family, processor, result.model.config)
        run["held_out_loss"] = held_out(args, result.model, collator, device)
    return run | {"probe_s": chosen.get("probe_s"), "train_s": clock.seconds()}


def _peak(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / GIB if device == "cuda" else None


def _train_clock():
    """A callback timing the training steps alone (first step's start to the end: no probe, no set-up), the part
    of vlmtune's epoch comparable with a baseline's rate after its warm-up. Built here: the worker imports
    transformers only after Unsloth, which must come first."""
    from transformers import TrainerCallback

    class TrainClock(TrainerCallback):
        start = end = None

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = self.start or time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            self.end = time.perf_counter()

        def seconds(self) -> float | None:
            return None if self.start is None or self.end is None else self.end - self.start

    return TrainClock()


def run_baseline(args, stack: str, checkpoint: Path, rows, device: str) -> dict[str, Any]:
    import torch

    from benchmarks.train_step.specs import CONFIGS, HF_PROCESSOR_KEYS, MODELS
    from benchmarks.train_step.worker import SETUPS, train_step
    from vlmtune.data.collator import Collator, PreparedDataset
    from vlmtune.data.host import default_workers
    from vlmtune.families import detect
    from vlmtune.step_probe import TOLERANCE, _Probe, cuda_peak
    from vlmtune.step_search import largest_fitting

    cfg, spec = CONFIGS[stack], MODELS[args.model]
    model, _ = SETUPS[cfg.stack](cfg, spec, checkpoint, device, args.vision)
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(checkpoint)
    collator = Collator(detect(model.config), processor, model.config)
    start = time.perf_counter()
    prepared = PreparedDataset(rows, collator)
    _phase(f"{stack} set up, rows encoded", start)
    cuda = device == "cuda"

    def optimizer():
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, fused=cuda or None)

    def keep(batch):
        return {k: v for k, v in batch.items() if k in HF_PROCESSOR_KEYS}

    order = sorted(range(len(prepared)), key=lambda i: -prepared.lengths[i])
    batch_size = args.baseline_batch or CPU_BATCH
    if cuda and args.baseline_batch is None:
        probe = _Probe(model, optimizer, cuda_peak)
        found = largest_fitting(
            lambda n: probe(keep(collator([prepared[i] for i in order[:n]]))),
            int(args.memory_cap_gib * GIB * 0.9),
            1,
            min(len(prepared), 512),
            what=f"{stack} batch_size",
            tolerance=TOLERANCE,
        )
        probe.reset()
        batch_size = found.size
        _phase(f"{stack} batch_size {batch_size} fits {args.memory_cap_gib} GiB", start)
    loader = torch.utils.data.DataLoader(
        prepared, batch_size=batch_size, collate_fn=collator, num_workers=default_workers(), pin_memory=cuda
    )
    opt, losses = optimizer(), []
    model.train()
    if cuda:
        torch.cuda.synchronize()
    start, seen = time.perf_counter(), 0
    for batch in loader:
        inputs = {k: v.to(device, non_blocking=True) for k, v in keep(batch).items()}
        losses.append(train_step(model, opt, inputs, cuda))
        seen += len(batch["input_ids"])
        if len(losses) % 5 == 0:  # what a stopped run still reports: rows and seconds so far
            progress = {"rows": seen, "epoch_s": time.perf_counter() - start, "batch_size": batch_size}
            print(PROGRESS + json.dumps(progress | {"losses": losses}), flush=True)
    if cuda:
        torch.cuda.synchronize()
    run = {"epoch_s": time.perf_counter() - start, "losses": losses, "step": {"batch_size": batch_size}}
    run["peak_alloc_gib"] = _peak(device)  # the epoch's, before the held-out rows
    if args.eval_rows:
        run["held_out_loss"] = held_out(args, model, collator, device, keep)
    return run


def worker(args, stack: str) -> int:
    import logging

    # vlmtune's own lines (the probe's sizes, the chosen budget, each step's loss) go to the stack's log.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    if stack.startswith("unsloth"):
        import unsloth  # noqa: F401  (its patches must come before transformers)
    import torch

    from benchmarks.train_step.checkpoints import build_checkpoint

    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    if device == "cuda" and args.memory_cap_gib:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gib * GIB / total))
    start = time.perf_counter()
    checkpoint = build_checkpoint(args.model, args.cache / args.model, device)
    _phase(f"checkpoint {checkpoint}", start)
    rows = _data(args, render_rows(args))
    _phase(f"{len(rows)} rows loaded", start)
    run = run_vlmtune(args, checkpoint, rows, device) if stack == "vlmtune" else None
    if run is None:
        run = run_baseline(args, stack, checkpoint, rows, device)
    _phase("epoch done", start)
    losses = run.pop("losses")
    tail = losses[-max(1, len(losses) // 10) :]
    record = {"stack": stack, "rows": len(rows), "steps": len(losses), **run}
    record.update(rows_per_s=len(rows) / run["epoch_s"], final_loss=statistics.mean(tail), device=device)
    print(PREFIX + json.dumps(record), flush=True)
    return 0


# ------------------------------------------------------------------------------------------------------ driver


def _child(args, stack: str, argv: list[str], log: Path) -> dict[str, Any]:
    """Run one stack's worker; its output goes to ``log`` as it comes (a stopped run leaves what it printed)."""
    # Every stack gets the allocator setting vlmtune sets on import (Unsloth sets the same one).
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if stack.startswith("unsloth") and Path(args.peer_site).is_dir():
        env["PYTHONPATH"] = f"{args.peer_site}{os.pathsep}{ROOT}"
    command = [sys.executable, "-m", "benchmarks.epoch", "worker", stack, *argv]
    with log.open("w") as sink:
        try:
            proc = subprocess.run(
                command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT, timeout=args.timeout
            )
            status = f"exit {proc.returncode}"
        except subprocess.TimeoutExpired:
            status = f"stopped after {args.timeout:.0f} s"
    return record_from_log(stack, status, log.read_text(errors="replace").splitlines())


def record_from_log(stack: str, status: str, lines: list[str]) -> dict[str, Any]:
    """A stack's record from its log: the worker's result line, else an error or, after progress lines, the
    ``partial`` rate of the rows trained before it stopped."""
    for line in lines:
        if line.startswith(PREFIX):
            return json.loads(line[len(PREFIX) :])
    record = {"stack": stack, "status": "error", "reason": f"{status}: " + " | ".join(lines[-6:])}
    progress = [json.loads(line[len(PROGRESS) :]) for line in lines if line.startswith(PROGRESS)]
    if progress:  # stopped part-way: the rows it trained on so far give its rate
        last = progress[-1]
        losses = last.pop("losses")
        tail = losses[-max(1, len(losses) // 10) :]
        record.update(status="partial", steps=len(losses), final_loss=statistics.mean(tail), peak_alloc_gib=None)
        record.update(rows=last["rows"], epoch_s=last["epoch_s"], rows_per_s=last["rows"] / last["epoch_s"])
        record["step"] = {"batch_size": last["batch_size"]}
    return record


def _phase(name: str, start: float) -> None:
    """A progress line in the stack's log: where a slow or stopped run spent its time."""
    print(f"[{time.perf_counter() - start:8.1f} s] {name}", flush=True)


def table(records: list[dict[str, Any]]) -> str:
    lines = ["| stack | step | epoch s | rows/s | peak GiB | final loss | held-out loss |", "|---" * 7 + "|"]
    for r in records:
        if "epoch_s" not in r:
            lines.append(f"| {r['stack']} | {r.get('status')}: {r.get('reason', '')[:80]} | | | | | |")
            continue
        peak = "-" if r["peak_alloc_gib"] is None else f"{r['peak_alloc_gib']:.2f}"
        held_out = "-" if r.get("held_out_loss") is None else f"{r['held_out_loss']:.4f}"
        step = ", ".join(f"{k}={v}" for k, v in r["step"].items())
        name = r["stack"] + (f" (stopped after {r['rows']} rows)" if r.get("status") == "partial" else "")
        lines.append(
            f"| {name} | {step} | {r['epoch_s']:.1f} | {r['rows_per_s']:.2f} | {peak} | {r['final_loss']:.4f} "
            f"| {held_out} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["worker"]:
        return worker(parse_args(argv[2:]), argv[1])
    args = parse_args(argv)
    out = Path(os.environ.get("OUT") or args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    render_rows(args)  # before any stack, so no stack's time or timeout holds the rendering
    render_eval_rows(args)
    print(f"{args.rows} rows ready in {time.perf_counter() - start:.0f} s", flush=True)
    meta = {"model": args.model, "rows": args.rows, "memory_cap_gib": args.memory_cap_gib, "vision": args.vision}
    meta["command"] = "python -m benchmarks.epoch " + " ".join(argv)
    records = []
    for stack in args.stacks.split(","):
        records.append(_child(args, stack, argv, out / f"epoch_{args.model}_{stack}.log"))
        print(table(records[-1:]).splitlines()[-1], flush=True)
        # Written after every stack, so a call that runs out of time keeps the stacks that finished.
        (out / f"epoch_{args.model}.json").write_text(json.dumps({"meta": meta, "results": records}, indent=2) + "\n")
    print(table(records))
    return 0 if all(r.get("status") not in ("error", "partial") for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
