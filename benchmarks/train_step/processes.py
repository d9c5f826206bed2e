"""The child processes of ``python -m benchmarks.train_step``: how the driver starts them, and their entry points.

Preparing a model (building its checkpoint, writing the batches) and every configuration run in processes of their
own: a fresh CUDA context each, so a configuration's peak memory is its own, and the driver never holds the GPU.
Both are the package's command again with a first word:

    python -m benchmarks.train_step prepare --model M --shape S --batch B --count N --cache DIR
    python -m benchmarks.train_step worker --config C --model M --checkpoint DIR --batches FILE --device D ...

Each prints one line, ``@@PREPARED {json}`` or ``@@RESULT {json}``, which the driver reads; the rest of its output
is echoed as ``[label] ...`` and logged. They start in the repository root, so ``benchmarks`` and ``vlmtune``
import from this checkout even when ``PYTHONPATH`` holds only Unsloth's site folder.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

ROOT = Path(__file__).resolve().parents[2]
COMMAND = ("python", "-m", "benchmarks.train_step")
"""How a user runs the benchmark: logged and recorded with the run's arguments."""
RESULT_PREFIX = "@@RESULT "
PREPARED_PREFIX = "@@PREPARED "
LOG_FILES: list[Path] = []
"""The run's log file under ``--out``, once the driver named it: :func:`say` appends to it."""


def say(text: str, stream: TextIO | None = None) -> None:
    """Print ``text`` (to stderr unless ``stream``) and append it to the run's log."""
    print(text, file=stream or sys.stderr, flush=True)
    for path in LOG_FILES:
        with path.open("a") as log:
            log.write(text + "\n")


def _python_env(extra: dict[str, str] | None = None, pythonpath: str | None = None) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    env.update(extra or {})
    return env


def _child(cmd: list[str], env: dict[str, str], prefix: str, label: str, timeout: float | None) -> dict[str, Any]:
    """Run ``cmd``, echo its output to stderr as ``[label] ...``, return the JSON after ``prefix`` (or a failure)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    timer = threading.Timer(timeout, proc.kill) if timeout else None
    if timer:
        timer.start()
    tail: collections.deque[str] = collections.deque(maxlen=40)
    record = None
    try:
        for line in proc.stdout:
            if line.startswith(prefix):
                record = json.loads(line[len(prefix) :])
                continue
            tail.append(line.rstrip())
            say(f"[{label}] {line.rstrip()}")
        proc.wait()
    finally:
        if timer:
            timer.cancel()
    wall = time.perf_counter() - start
    if record is None:
        if timeout is not None and wall >= timeout:
            record = {"status": "timeout", "reason": f"killed after {timeout:.0f} s, the rest of --time-budget"}
        else:
            # Progress bars say nothing about the failure; the traceback's last lines do.
            tail_text = [t for t in tail if "it/s]" not in t and "\r" not in t]
            record = {"status": "error", "reason": f"exit code {proc.returncode}; " + " | ".join(tail_text[-8:])}
    record["wall_s"] = wall
    return record


def prepare(args, batch: int) -> dict[str, Any]:
    """Build (or reuse) the checkpoint and write the batches, in a child process that then frees the GPU."""
    count = 1 if args.shape == "fixed" else args.warmup + args.steps
    cmd = [sys.executable, "-m", "benchmarks.train_step", "prepare", "--model", args.model, "--shape", args.shape]
    cmd += ["--batch", str(batch), "--count", str(count), "--cache", str(args.cache), "--device", args.device]
    record = _child(cmd, _python_env(), PREPARED_PREFIX, "prepare", None)
    if "checkpoint" not in record:
        raise SystemExit(f"preparing {args.model} failed: {record.get('reason')}")
    return record


def run_config(args, name: str, prepared: dict[str, Any], timeout: float | None, **extra) -> dict[str, Any]:
    """One configuration in its own process; Unsloth's with its peer site folder on the path."""
    from benchmarks.train_step.specs import CONFIGS, split_name

    base, _ = split_name(name)
    env = _python_env()
    if CONFIGS[base].stack == "unsloth":
        peer = Path(args.peer_site)
        # Unsloth pins older transformers / trl / datasets than vlmtune: it gets its own site folder.
        pythonpath = str(peer) if peer.is_dir() else None
        env = _python_env({"HF_HUB_OFFLINE": "1", "UNSLOTH_DISABLE_STATISTICS": "1"}, pythonpath)
    cmd = [sys.executable, "-m", "benchmarks.train_step", "worker", "--config", name, "--model", args.model]
    cmd += ["--checkpoint", prepared["checkpoint"], "--batches", prepared["batches"], "--device", prepared["device"]]
    cmd += ["--warmup", str(extra.get("warmup", args.warmup)), "--steps", str(extra.get("steps", args.steps))]
    cmd += ["--vision", args.vision]
    if extra.get("profile"):
        cmd.append("--profile")
    if extra.get("memory_limit_gib") is not None:
        cmd += ["--memory-limit-gib", str(extra["memory_limit_gib"])]
    record = _child(cmd, env, RESULT_PREFIX, name, timeout)
    record.setdefault("config", name)
    return record


def prepare_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_step prepare")
    parser.add_argument("--model", required=True)
    parser.add_argument("--shape", required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--cache", required=True)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    import torch

    from benchmarks.train_step.batches import build_steps, describe
    from benchmarks.train_step.checkpoints import build_checkpoint

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    folder = Path(args.cache) / args.model
    start = time.perf_counter()
    build_checkpoint(args.model, folder, device)
    build_s = time.perf_counter() - start
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    # "steps_": padded batches, packed rows and per-step counts in one file (earlier "batches_" files held a list).
    batches_file = folder / f"steps_{args.shape}_b{args.batch}_n{args.count}.pt"
    if not batches_file.exists():
        steps = build_steps(args.model, folder, args.shape, args.batch, args.count, Path(args.cache))
        torch.save(steps, batches_file)
    steps = torch.load(batches_file, weights_only=True)
    device_name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    record = {"checkpoint": str(folder), "batches": str(batches_file), "device": device, "device_name": device_name}
    record.update(data=describe(steps), build_s=build_s)
    print(PREPARED_PREFIX + json.dumps(record), flush=True)
    return 0


def worker_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_step worker")
    parser.add_argument("--config", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--batches", required=True)
    parser.add_argument("--device", required=True)
    parser.add_argument("--warmup", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--vision", default="lora")
    parser.add_argument("--memory-limit-gib", type=float, default=None)
    parser.add_argument("--profile", action="store_true", help="one more step under torch.profiler after timing")
    args = parser.parse_args(argv)
    if args.config.startswith("unsloth"):
        # Unsloth patches transformers and peft at import: it must come before them (its own instructions).
        try:
            import unsloth  # noqa: F401
        except (ImportError, NotImplementedError, RuntimeError) as err:
            print(RESULT_PREFIX + json.dumps({"config": args.config, "status": "n/a", "reason": f"unsloth: {err}"}))
            return 0
    from benchmarks.train_step import worker

    return worker.main(args)
