"""Useful FLOPs of one fixed-shape training step, and how much of the GPU's matmul rate a configuration turns into them.

    python -m benchmarks.train_step.flops benchmarks/results/h200/*_fixed*/*.json    # fixed-shape records

Useful work is what any implementation of the step must compute: the forward pass and the gradient with respect to
the activations (LoRA trains adapters inside every layer of both towers, so the gradient has to flow back through
all of them), counted as matmul FLOPs (2 per multiply-add) from the model's published dimensions (``specs.py``):

- linear layers: ``2 x in x out`` per token forward, the same again for the input gradient;
- attention: ``QK^T`` and ``PV`` forward (``4 x seq^2 x width`` per sequence and layer, halved when causal), twice
  that for the gradients (``dQ``, ``dK``, ``dV`` and ``dP``);
- the LM head on the supervised tokens only (a fused loss needs no logits anywhere else).

Left out as not useful: LoRA's own small matmuls and its weight gradients (under 1 % at r 16), the recomputation of
gradient checkpointing, dequantisation, norms and elementwise work. Utilisation is useful FLOPs / step time / the
measured bf16 matmul rate (``--peak``; an H200 runs 8192^3 bf16 products at about 790 TFLOP/s).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from benchmarks.train_step.specs import MODELS, ModelSpec

H200_BF16_MATMUL = 790e12
"""FLOP/s of an 8192^3 bf16 matmul on an H200 (torch.matmul, measured)."""


def _language(text: dict[str, Any], tokens: int, samples: int, supervised: int) -> tuple[float, float, float]:
    """(linear, attention, head) forward FLOPs of the language tower for ``tokens`` in ``samples`` equal sequences."""
    h, inter, layers = text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"]
    heads, kv = text["num_attention_heads"], text["num_key_value_heads"]
    head_dim = text.get("head_dim", h // heads)
    per_layer = 2 * h * heads * head_dim + 2 * h * kv * head_dim + 3 * h * inter  # q and o, k and v, gated MLP
    seq = tokens / samples
    keys = min(seq, text.get("sliding_window") or seq)  # Gemma-3's windows (1024) exceed these sequences
    attention = layers * 2 * seq * keys * heads * head_dim * samples  # causal: half of 4 x seq x keys x width
    return layers * 2 * per_layer * tokens, attention, 2 * h * text["vocab_size"] * supervised


def _vision(vision: dict[str, Any], image_px: tuple[int, int], images: int) -> tuple[float, float]:
    """(linear, attention) forward FLOPs of the vision tower for ``images`` images of ``image_px``."""
    h, inter, patch = vision["hidden_size"], vision["intermediate_size"], vision["patch_size"]
    patches = (image_px[0] // patch) * (image_px[1] // patch)
    if "fullatt_block_indexes" in vision:  # Qwen2.5-VL's ViT: gated MLP, windowed attention, a 2x2 merger
        layers, full = vision["depth"], len(vision["fullatt_block_indexes"])
        window = (vision["window_size"] // patch) ** 2
        per_layer = 4 * h * h + 3 * h * inter
        attention = 4 * h * patches * (full * patches + (layers - full) * min(window, patches))
        merged = 4 * h
        merger = (merged * merged + merged * vision["out_hidden_size"]) * patches / 4
        return images * (2 * per_layer * patches * layers + 2 * merger), images * attention
    layers = vision["num_hidden_layers"]  # SigLIP: non-gated MLP, full attention over each image's patches
    per_layer = 4 * h * h + 2 * h * inter
    return images * 2 * per_layer * patches * layers, images * 4 * h * patches * patches * layers


def step_flops(spec: ModelSpec, tokens: int, samples: int, images: int, supervised: int) -> dict[str, float]:
    """Useful FLOPs of one step by part: forward + input gradient of each tower and of the head."""
    text_linear, text_attention, head = _language(spec.text, tokens, samples, supervised)
    vision_linear, vision_attention = _vision(spec.vision, spec.image_size, images)
    # Input gradients: a linear layer costs its forward again, attention twice its forward.
    parts = {
        "vision": 2 * vision_linear + 3 * vision_attention,
        "language": 2 * text_linear + 3 * text_attention,
        "head": 2 * head,
    }
    return {**parts, "total": sum(parts.values())}


def utilisation(record: dict[str, Any], peak: float = H200_BF16_MATMUL) -> list[dict[str, Any]]:
    """Per configuration of a ``train_step`` record: useful TFLOP per step and the share of ``peak`` reached."""
    meta, data = record["meta"], record["meta"]["data"]
    spec = MODELS[meta["model"]]
    flops = step_flops(
        spec,
        tokens=data["tokens_per_batch"][0],
        samples=data["batch_size"],
        images=data["images_per_batch"][0],
        supervised=data["supervised_tokens_per_batch"][0],
    )
    rows = []
    for result in record["results"]:
        if result.get("step_s"):
            rows.append(
                {
                    "config": result["config"],
                    "step_s": result["step_s"],
                    "useful_tflop": flops["total"] / 1e12,
                    "utilisation": flops["total"] / result["step_s"] / peak,
                    **{f"{part}_tflop": flops[part] / 1e12 for part in ("vision", "language", "head")},
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_step.flops", description=__doc__.split("\n")[0])
    parser.add_argument(
        "records", nargs="+", type=Path, help="fixed-shape JSON records of python -m benchmarks.train_step"
    )
    parser.add_argument("--peak", type=float, default=H200_BF16_MATMUL, help="bf16 matmul FLOP/s of the device")
    args = parser.parse_args(argv)
    print("| model | configuration | step s | useful TFLOP (vision / language / head) | utilisation |")
    print("|---|---|---|---|---|")
    for path in args.records:
        record = json.loads(path.read_text())
        if record["meta"]["shape"] != "fixed":
            print(f"{path}: not a fixed-shape record", file=sys.stderr)
            return 2
        for row in utilisation(record, args.peak):
            parts = " / ".join(f"{row[f'{p}_tflop']:.1f}" for p in ("vision", "language", "head"))
            print(
                f"| {record['meta']['model']} | {row['config']} | {row['step_s']:.3f} | {row['useful_tflop']:.1f} "
                f"({parts}) | {row['utilisation']:.1%} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
