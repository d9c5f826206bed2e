"""Time a LoRA / QLoRA training step of vlmtune against the plain Hugging Face stack and Unsloth, side by side.

Run from the repository root (``benchmarks`` is imported as a package, not installed):

    python -m benchmarks.train_step --model qwen2_5_vl-7b --shape fixed
    python -m benchmarks.train_step --model gemma3-4b --shape real --configs hf_qlora,unsloth,vlmtune_qlora
    python -m benchmarks.train_step --model qwen2_5_vl-7b --shape real \
        --configs vlmtune_qlora_kernels,vlmtune_qlora_kernels_packed               # padding-free packing's gain
        --configs vlmtune_qlora_kernels,vlmtune_qlora_kernels_compile_language     # per-layer torch.compile's gain
    python -m benchmarks.train_step --model qwen2_5_vl-7b --shape fixed --max-batch     # largest batch in 24/80 GiB
    python -m benchmarks.train_step --model qwen2_5_vl-7b --profile      # where one step's time goes (ours, hf_qlora)
    python -m benchmarks.train_step --model qwen2_5_vl-3b --suite final --out $OUT       # a fixed set, one call
    python -m benchmarks.train_step --model tiny-qwen --shape fixed --device cpu --steps 2 --warmup 1   # anywhere
    python -m benchmarks.train_step report benchmarks/results/h100/*/qwen2_5_vl-7b_fixed_*.json  # a record's tables
    python -m benchmarks.train_step report --write PAGE.md $OUT/*.json       # fill a page's report blocks

Models (``--model``): random models of real size built from the released configs (``qwen2_5_vl-7b``,
``qwen2_5_vl-3b``, ``gemma3-4b``, ``minicpmv2_6-8b``, ``minicpmv4_6-1.3b``), written once per machine under
``--cache`` with a processor and loaded as a user loads a download; ``tiny-qwen`` / ``tiny-gemma`` /
``tiny-minicpmv`` / ``tiny-minicpmv4_6`` are ``vlmtune.tiny``'s checkpoints and run on the CPU. A stack that does
not serve a family (the hf and Unsloth stacks on the MiniCPM-V 2.6 layout, which upstream is remote code only)
reports ``n/a`` with the reason.

Shapes (``--shape``): ``fixed`` — ``--batch`` samples, each one random-noise image (448x448 for Qwen-VL: 256
tokens; 896 px for Gemma-3: 256 tokens; 896 px for MiniCPM-V: 5 views, 320 tokens), 24 prompt tokens and 128
supervised answer tokens; ``real`` — batches of generated LaTeX-OCR rows through vlmtune's collator, counting
non-pad tokens only. The ``*_packed`` configurations (real shape only; ``n/a`` on the fixed one, which has no
padding) train on each step's samples packed into one padding-free row: same samples, tokens and labels per step
as the padded batch, no pad token (``batches.py``).

Configurations (``--configs``, comma-separated; ``name:frozen`` runs one with the vision tower frozen, no
LoRA in it; ``--vision frozen`` does that for all): see ``CONFIGS`` in ``specs.py``. Each runs in
its own process (fresh CUDA context, honest peak memory) through the same plain loop on the same batches.
``unsloth`` runs with ``--peer-site`` as its ``PYTHONPATH`` when that folder exists: a site folder holding Unsloth
and the packages it pins, installed apart from vlmtune's environment (e.g. ``pip install --target /tmp/peer-site
unsloth unsloth-zoo``); configurations that cannot run report ``n/a`` and the others go on.

Reported per configuration: step time (median of the timed steps after ``--warmup`` untimed ones), tokens/s and
images/s (median over timed steps), peak allocated and reserved GPU memory over the whole process, first and
last loss, warm-up (load start to the end of the first step) and load time, and the ratio of each to
``hf_qlora`` and to ``hf_qlora_noupcast``. The table goes to stdout, the raw records to
``<out>/<model>_<shape>_<device>.json``, everything printed also to ``<out>/<model>_<shape>.log``.

``--profile [CONFIGS]`` runs one more step of those configurations after their timed ones, under
``torch.profiler`` with ranges around the vision tower, projector, language tower, loss/head, backward and
optimizer step, and sorts the GPU kernels by kind (``profiling.py`` says how); the record gets a
``profile`` key and a table is printed. ``--suite NAME`` runs the fixed set ``SUITES[NAME][model]`` of
``specs.py`` (configurations, profiled ones, steps, time budget); options given explicitly win.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks.train_step.processes import (
    COMMAND,
    LOG_FILES,
    ROOT,
    prepare,
    prepare_main,
    run_config,
    say,
    worker_main,
)

RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_CONFIGS = (
    "hf_qlora",
    "hf_qlora_noupcast",
    "unsloth",
    "vlmtune_qlora",
    "vlmtune_qlora_kernels",
    "hf_qlora:frozen",
    "vlmtune_qlora:frozen",
    "vlmtune_qlora_kernels:frozen",
    "hf_qlora_liger",
    "hf_bf16",
    "vlmtune_bf16",
)
# The configurations that need neither bitsandbytes' CUDA kernels, Triton nor Unsloth (run on the CPU).
CPU_CONFIGS = ("hf_bf16", "vlmtune_bf16")
# What --profile without a list profiles: ours against the baseline (on the CPU: the bf16 pair).
PROFILE_CONFIGS = ("vlmtune_qlora_kernels", "hf_qlora")
CPU_PROFILE_CONFIGS = ("vlmtune_bf16", "hf_bf16")


# --------------------------------------------------------------------------------------------------- output


def device_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower() or "cpu"


def write(path: Path, meta: dict[str, Any], results: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------------ modes


def benchmark(args) -> list[dict[str, Any]]:
    """Every configuration once, side by side (profiling those in ``args.profile``); returns the records."""
    from benchmarks.train_step.report import add_ratios, fmt, step_table, table, targets
    from benchmarks.train_step.specs import CONFIGS, split_name

    started = time.perf_counter()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    LOG_FILES[:] = [Path(args.out) / f"{args.model}_{args.shape}.log"]
    say(f"$ {' '.join([*COMMAND, *sys.argv[1:]])}")
    prepared = prepare(args, args.batch)
    say(f"prepared {args.model} on {prepared['device_name']} in {prepared['wall_s']:.0f} s")
    say(f"data: {json.dumps(prepared['data'])}")
    meta = _meta(args, prepared)
    path = Path(args.out) / f"{args.model}_{args.shape}_{device_slug(prepared['device_name'])}.json"
    results: list[dict[str, Any]] = []
    for name in args.configs:
        base, _ = split_name(name)
        left = None if args.time_budget is None else args.time_budget - (time.perf_counter() - started)
        if not prepared["device"].startswith("cuda") and CONFIGS[base].needs_cuda:
            record = {
                "config": name,
                "status": "skipped",
                "reason": "needs CUDA (bitsandbytes 4-bit, Triton or Unsloth)",
            }
        elif left is not None and left < 30:
            record = {"config": name, "status": "skipped", "reason": f"--time-budget {args.time_budget} s spent"}
        else:
            record = run_config(args, name, prepared, left, profile=name in args.profile)
        results.append(record)
        add_ratios(results)
        write(path, meta, results)  # after each configuration, so a killed run keeps what it measured
        profile = record.get("profile", {})
        line = f"{name}: {record.get('status')} {fmt(record.get('tokens_per_s'), 0)} tok/s"
        line += f" ({fmt(record.get('wall_s'), 0)} s)"
        say(line + (f"; profile {profile.get('status')} {profile.get('reason', '')}" if profile else ""))
    say(f"\n{args.model}, {args.shape} shape, batch {args.batch}, {prepared['device_name']}\n", sys.stdout)
    say(table(results), sys.stdout)
    say("\n" + "\n".join(targets(results)), sys.stdout)
    for record in results:
        if record.get("profile", {}).get("status") == "ok":
            say(f"\nwhere the time goes, {record['config']}:\n", sys.stdout)
            say(step_table(record["profile"], record.get("step_s")), sys.stdout)
    say(f"\nraw records: {path} (total {time.perf_counter() - started:.0f} s)", sys.stdout)
    return results


def _probe(args, name: str, batch: int, limit: float) -> float | None:
    """Peak reserved GiB of two steps at ``batch`` under ``limit`` GiB, or None when it does not fit."""
    prepared = prepare(args, batch)
    record = run_config(args, name, prepared, None, warmup=1, steps=1, memory_limit_gib=limit)
    peak = record.get("peak_reserved_gib")
    say(f"{name} batch {batch} in {limit} GiB: {record.get('status')} (peak reserved {peak} GiB)")
    return record.get("peak_reserved_gib") if record.get("status") == "ok" else None


def largest_batch(probe: Callable[[int, float], float | None], limits: list[float], start: int, cap: int) -> dict:
    """Largest batch (up to ``cap``) whose two steps fit each of ``limits`` GiB: predict, then verify.

    ``probe(batch, limit)`` runs one process and returns its peak GiB, or None when it ran out of memory.
    Memory grows linearly with the batch (weights + batch x activations), so two probes under the largest
    limit give the line, and each limit then needs its predicted batch and the one after it (bisection only
    when the line misses): 6 processes per configuration instead of ~20 for doubling and bisection.
    """
    top = max(limits)
    first = probe(start, top)
    tried = [(start, first)]
    if first is not None and 2 * start <= cap:
        tried.append((2 * start, probe(2 * start, top)))
    found = {}
    for limit in sorted(limits):
        low = max((b for b, peak in tried if peak is not None and peak <= limit), default=0)  # fits
        high = min((b for b, peak in tried if peak is None or peak > limit), default=None)  # does not
        if high is None and len(tried) == 2:
            (b1, p1), (b2, p2) = tried
            slope = (p2 - p1) / (b2 - b1)
            guess = cap if slope <= 0 else min(cap, b2 + int((limit - p2) / slope))
            guess, step = max(guess, low + 1), 1
            while guess <= cap:
                if probe(guess, limit) is None:
                    high = guess
                    break
                low, guess, step = guess, guess + step, step * 2
        high = cap + 1 if high is None else high
        while high - low > 1:  # the line missed, or there was no line: bisect
            mid = (low + high) // 2
            low, high = (mid, high) if probe(mid, limit) is not None else (low, mid)
        found[f"{limit:g}GiB"] = low
    return found


def max_batch(args) -> dict[str, dict[str, int]]:
    """Largest fixed-shape batch that trains two steps within each memory limit (see :func:`largest_batch`).

    Every probe is logged to ``<out>/<model>_<shape>_maxbatch.log`` as it finishes, so a search cut short
    (each probe reloads the model) still leaves what it found; the JSON is written at the end.
    """
    Path(args.out).mkdir(parents=True, exist_ok=True)
    LOG_FILES[:] = [Path(args.out) / f"{args.model}_{args.shape}_maxbatch.log"]
    say(f"$ {' '.join([*COMMAND, *sys.argv[1:]])}")
    found: dict[str, dict[str, int]] = {}
    for name in args.configs:
        found[name] = largest_batch(
            lambda batch, limit, name=name: _probe(args, name, batch, limit),
            args.max_batch_limits,
            args.batch,
            args.max_batch_cap,
        )
        say(f"{name}: largest batch {found[name]}")
    prepared = prepare(args, args.batch)
    path = Path(args.out) / f"{args.model}_{args.shape}_{device_slug(prepared['device_name'])}_maxbatch.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": _meta(args, prepared), "max_batch": found}, indent=2) + "\n")
    print(json.dumps(found, indent=2))
    return found


def _meta(args, prepared: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": args.model,
        "shape": args.shape,
        "batch": args.batch,
        "warmup": args.warmup,
        "steps": args.steps,
        "vision": args.vision,
        "suite": args.suite,
        "profile": args.profile,
        "time_budget": args.time_budget,
        "device": prepared["device_name"],
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([*COMMAND, *sys.argv[1:]]),
        "data": prepared["data"],
        "prepare_s": prepared.get("wall_s"),
        "build_s": prepared.get("build_s"),
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    from benchmarks.train_step.specs import MODELS, SUITES, VISION_MODES, split_name

    parser = argparse.ArgumentParser(prog=" ".join(COMMAND), description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, choices=sorted(MODELS))
    parser.add_argument("--shape", default="fixed", choices=("fixed", "real"))
    parser.add_argument("--configs", default=None, help="comma-separated; default: all (CPU: the CPU-capable ones)")
    parser.add_argument("--vision", default="lora", choices=VISION_MODES, help="vision tower of every config")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 5)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3)")
    parser.add_argument(
        "--profile",
        nargs="?",
        const="",
        default=None,
        help="configurations to profile one step of after their timed steps (comma-separated; alone: "
        f"{','.join(PROFILE_CONFIGS)}, on the CPU {','.join(CPU_PROFILE_CONFIGS)}); run even if not in --configs",
    )
    parser.add_argument("--suite", default=None, choices=sorted(SUITES), help="a fixed set of runs (SUITES)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cuda or cpu")
    parser.add_argument("--out", default=str(RESULTS), help="folder of the JSON records and the log")
    parser.add_argument("--cache", default="/tmp/vlmtune-bench", help="checkpoints and batches, built once")
    parser.add_argument("--peer-site", default="/tmp/peer-site", help="site folder holding Unsloth")
    parser.add_argument("--time-budget", type=float, default=None, help="seconds; later configs are skipped")
    parser.add_argument("--max-batch", action="store_true", help="find the largest batch per memory limit")
    parser.add_argument("--max-batch-limits", default="24,80", help="GiB, comma-separated")
    parser.add_argument("--max-batch-cap", type=int, default=128)
    args = parser.parse_args(argv)
    cpu = args.device == "cpu"
    if args.suite is not None:
        suite = SUITES[args.suite].get(args.model)
        if suite is None:
            parser.error(f"--suite {args.suite} has no runs for {args.model}; it has {sorted(SUITES[args.suite])}")
        # The suite's settings fill in what the command line left open.
        args.configs = args.configs if args.configs is not None else ",".join(suite.configs)
        args.profile = args.profile if args.profile is not None else ",".join(suite.profile)
        args.warmup = args.warmup if args.warmup is not None else suite.warmup
        args.steps = args.steps if args.steps is not None else suite.steps
        args.time_budget = args.time_budget if args.time_budget is not None else suite.time_budget
    args.warmup = 3 if args.warmup is None else args.warmup
    args.steps = 5 if args.steps is None else args.steps
    if args.profile == "":
        args.profile = ",".join(CPU_PROFILE_CONFIGS if cpu else PROFILE_CONFIGS)
    args.profile = _names(args.profile or "")
    if args.configs is None:
        if args.max_batch:
            args.configs = "hf_qlora,vlmtune_qlora,vlmtune_qlora_kernels"
        elif args.profile:
            args.configs = ""
        else:
            args.configs = ",".join(CPU_CONFIGS if cpu else DEFAULT_CONFIGS)
    args.configs = _names(args.configs)
    args.configs += [name for name in args.profile if name not in args.configs]
    for name in args.configs:
        try:
            split_name(name)
        except ValueError as err:
            parser.error(str(err))
    args.max_batch_limits = [float(x) for x in args.max_batch_limits.split(",")]
    if args.steps < 1 or args.warmup < 0 or args.batch < 1:
        parser.error("--steps must be >= 1, --warmup >= 0, --batch >= 1")
    return args


def _names(text: str) -> list[str]:
    return [c.strip() for c in text.split(",") if c.strip()]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "report":
        from benchmarks.train_step.report import report_main

        return report_main(argv[1:])
    if argv and argv[0] == "prepare":
        return prepare_main(argv[1:])
    if argv and argv[0] == "worker":
        return worker_main(argv[1:])
    args = parse_args(argv)
    if args.max_batch:
        max_batch(args)
    else:
        benchmark(args)
    return 0
