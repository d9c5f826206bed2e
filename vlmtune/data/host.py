"""A host that keeps up: DataLoader workers by default where they are safe, and the collator's cost measured.

Image decoding and the family's processor run in the collate function (:class:`~vlmtune.data.collator.Collator`
reads and processes the images of a batch; :class:`~vlmtune.data.collator.PreparedDataset` hands out rows only),
so with DataLoader workers they run in those processes, ``prefetch_factor`` batches ahead of the training loop.

Default workers (``TrainConfig.dataloader_workers=None``): ``min(4, cpu_count - 1)`` on Linux when CUDA is
available, else 0. Linux's workers are forked: the children only decode, tokenize and build CPU tensors, never
touch CUDA or launch a Triton kernel, which is what makes a fork after CUDA initialisation safe. On macOS and
Windows workers are spawned (every worker re-imports the caller's script, which breaks a script without an
``if __name__ == "__main__"`` guard), and on the CPU the training itself needs the cores: 0 there.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

logger = logging.getLogger(__name__)

MAX_DEFAULT_WORKERS = 4


def default_workers() -> int:
    """DataLoader workers when the config says ``None``: see the module docstring."""
    if not sys.platform.startswith("linux") or not torch.cuda.is_available():
        return 0
    return max(0, min(MAX_DEFAULT_WORKERS, (os.cpu_count() or 1) - 1))


def dataloader_arguments(workers: int | None, prefetch_factor: int, on_cuda: bool) -> dict[str, Any]:
    """The ``TrainingArguments`` of the data path: workers, pinned memory on CUDA, prefetch, persistent workers."""
    workers = default_workers() if workers is None else workers
    return {
        "dataloader_num_workers": workers,
        "dataloader_pin_memory": on_cuda,
        # Only meaningful (and only accepted by the DataLoader) with workers.
        "dataloader_prefetch_factor": prefetch_factor if workers > 0 else None,
        "dataloader_persistent_workers": workers > 0,
    }


class TimedCollate:
    """A collate function that adds its own wall time to a counter shared with the training process.

    The counter is a ``multiprocessing.Value`` created before the workers start, so a forked (or spawned) worker
    adds to the same memory the training process reads.
    """

    def __init__(self, collate: Callable[[list], Any]):
        self.collate = collate
        self.seconds = multiprocessing.Value("d", 0.0)
        self.batches = multiprocessing.Value("q", 0)

    def __call__(self, items: list) -> Any:
        start = time.perf_counter()
        batch = self.collate(items)
        elapsed = time.perf_counter() - start
        with self.seconds.get_lock():
            self.seconds.value += elapsed
        with self.batches.get_lock():
            self.batches.value += 1
        return batch

    def totals(self) -> tuple[float, int]:
        """Seconds spent collating and batches collated so far (in every process)."""
        return self.seconds.value, self.batches.value


def collate_time_callback(timer: TimedCollate, workers: int):
    """A ``TrainerCallback`` that puts ``collate_s`` (seconds of collation per batch since the last log) into each
    training log line (metrics.jsonl), and logs the run's mean at the end."""
    from transformers import TrainerCallback

    class CollateTime(TrainerCallback):
        def __init__(self):
            self.last = (0.0, 0)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:
                return
            seconds, batches = timer.totals()
            done = batches - self.last[1]
            if done > 0:
                logs["collate_s"] = (seconds - self.last[0]) / done
            self.last = (seconds, batches)

        def on_train_end(self, args, state, control, **kwargs):
            seconds, batches = timer.totals()
            if batches:
                where = f"in {workers} worker(s)" if workers else "on the training thread"
                logger.info("collation: %.1f ms per batch %s (%d batches)", 1e3 * seconds / batches, where, batches)

    return CollateTime()
