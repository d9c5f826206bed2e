"""Generation and OCR metrics: exact match, character error rate, BLEU-4.

predictions = generate(model, processor, rows, max_new_tokens=128)
scores = ocr_metrics(predictions, [answer_of(r) for r in rows])
"""

from __future__ import annotations

import math
from collections import Counter

import torch

from vlmtune.data.schema import load_image, text_of


def answer_of(row: dict) -> str:
    """The reference answer of a row: its last assistant turn's text."""
    return text_of([m for m in row["messages"] if m["role"] == "assistant"][-1]["content"])


def prompt_messages(row: dict) -> list[dict]:
    """The conversation up to (not including) its last assistant turn."""
    messages = row["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last]


@torch.no_grad()
def generate(model, processor, rows, max_new_tokens: int = 128, image_options: dict | None = None) -> list[str]:
    """Greedy predictions for ``rows`` through the family's own processor (one row at a time).

    Args:
        model: a transformers or PEFT model.
        processor: the family's processor.
        rows: canonical rows; their last assistant turn is the reference and is not shown to the model.
        max_new_tokens: generation budget per row.
        image_options: image-processor kwargs (``max_pixels`` ...), as in training.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    predictions = []
    for index, row in enumerate(rows):
        text = processor.apply_chat_template(prompt_messages(row), tokenize=False, add_generation_prompt=True)
        images = [load_image(s, index) for s in row.get("images") or []]
        kwargs = {k: v for k, v in (image_options or {}).items() if v is not None}
        inputs = processor(
            text=[text], images=[images] if images else None, add_special_tokens=False, return_tensors="pt", **kwargs
        ).to(device)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1] :]
        predictions.append(processor.tokenizer.decode(new, skip_special_tokens=True).strip())
    model.train(was_training)
    return predictions


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance between two strings (insertions, deletions, substitutions cost 1)."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def character_error_rate(predictions: list[str], references: list[str]) -> float:
    """Total edit distance over total reference length (corpus CER)."""
    errors = sum(edit_distance(p, r) for p, r in zip(predictions, references, strict=True))
    return errors / max(1, sum(len(r) for r in references))


def bleu(predictions: list[str], references: list[str], max_n: int = 4) -> float:
    """Corpus BLEU-4 on whitespace tokens with add-one smoothing of higher orders (Papineni et al., 2002)."""
    matches, totals = [0] * max_n, [0] * max_n
    pred_len = ref_len = 0
    for pred, ref in zip(predictions, references, strict=True):
        p, r = pred.split(), ref.split()
        pred_len, ref_len = pred_len + len(p), ref_len + len(r)
        for n in range(1, max_n + 1):
            p_grams = Counter(tuple(p[i : i + n]) for i in range(len(p) - n + 1))
            r_grams = Counter(tuple(r[i : i + n]) for i in range(len(r) - n + 1))
            matches[n - 1] += sum(min(c, r_grams[g]) for g, c in p_grams.items())
            totals[n - 1] += max(0, len(p) - n + 1)
    if pred_len == 0 or matches[0] == 0:
        return 0.0
    smooth = [1 if n > 0 else 0 for n in range(max_n)]
    log_precision = sum(
        math.log((matches[n] + smooth[n]) / (totals[n] + smooth[n])) if totals[n] + smooth[n] else -math.inf
        for n in range(max_n)
    )
    brevity = 1.0 if pred_len > ref_len else math.exp(1 - ref_len / pred_len)
    return brevity * math.exp(log_precision / max_n)


def _normalise(text: str) -> str:
    return " ".join(text.split())


def ocr_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """``exact_match`` (whitespace-normalised), ``cer`` and ``bleu`` over the pairs."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    exact = sum(_normalise(p) == _normalise(r) for p, r in zip(predictions, references, strict=True))
    return {
        "exact_match": exact / max(1, len(references)),
        "cer": character_error_rate(predictions, references),
        "bleu": bleu(predictions, references),
    }
