"""Small helpers for tests of families and data code: random images, conversations, collating rows.

from vlmtune.testing import collate, noise, single
batch = collate(collator, (single("Read it.", "x^{2}"), [noise((64, 32))]))
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import torch
from PIL import Image


def noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A random RGB image of PIL ``size`` (width, height): every pixel matters for pixel_values equality."""
    width, height = size
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def init_lora_b(model: torch.nn.Module, std: float = 0.02, seed_per_matrix: bool = False) -> None:
    """Give every ``lora_B`` random values: PEFT starts them at zero, which leaves each ``lora_A`` gradient zero.

    The values come from one generator seeded 0 walked in parameter order, or with ``seed_per_matrix`` from a
    generator per matrix seeded by the length of its name (equal values in two models built alike, whatever
    else they hold). Generators live on each parameter's device.
    """
    generators: dict[torch.device, torch.Generator] = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." not in name:
                continue
            if seed_per_matrix:
                generator = torch.Generator(param.device).manual_seed(len(name))
            else:
                if param.device not in generators:
                    generators[param.device] = torch.Generator(param.device).manual_seed(0)
                generator = generators[param.device]
            param.normal_(0.0, std, generator=generator)


def turn(role: str, text: str, n_images: int = 0) -> dict:
    """One message: ``n_images`` image parts, then the text."""
    return {"role": role, "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}


def single(question: str, answer: str, n_images: int = 1) -> list[dict]:
    """A one-turn conversation: the user's images and question, the assistant's answer."""
    return [turn("user", question, n_images), turn("assistant", answer)]


def collate(collator, *rows):
    """Collate ``(messages, images)`` pairs as dataset items numbered from 0."""
    return collator([{"index": i, "row": {"messages": m, "images": imgs}} for i, (m, imgs) in enumerate(rows)])


def run_two_processes(script: str, args: list[str], timeout: float) -> str:
    """Run ``script`` under ``torchrun --standalone --nproc-per-node 2`` (one thread each); its output.

    Raises:
        TimeoutError: past ``timeout`` seconds (a hung collective): torchrun and both ranks are killed first.
        RuntimeError: on a non-zero exit, with the end of the output.
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", script, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # torchrun and both ranks share the new session's group
        output, _ = process.communicate()
        raise TimeoutError(f"two-process run hung (killed after {timeout:.0f} s):\n{output[-3000:]}") from None
    if process.returncode != 0:
        raise RuntimeError(f"two-process run exited {process.returncode}:\n{output[-3000:]}")
    return output
