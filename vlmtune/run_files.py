"""The files a run writes into its output folder while it trains, and how they are read back.

    OUT/run.json            what ran: model, family, towers, LoRA, data rows kept / skipped, config, versions
    OUT/metrics.jsonl       one line per logged step ({"kind": "train"}) and per evaluation ({"kind": "eval"})
    OUT/predictions.jsonl   one line per evaluation: the held-out samples' predictions at that step
    OUT/eval_samples/       the held-out samples: samples.json (references, image files) and their images
    OUT/report.html         built from the files above (:mod:`vlmtune.report`)

Every line carries its ``step``. The jsonl files are only appended to, one flushed line at a time, so a killed
run leaves whole lines (at most a torn last one, which readers skip); on resume from a checkpoint the lines after
the checkpoint's step are dropped first (:func:`keep_through`), so the resumed run adds no step twice and loses
none. The json files are replaced atomically.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

RUN = "run.json"
METRICS = "metrics.jsonl"
PREDICTIONS = "predictions.jsonl"
SAMPLES = "eval_samples"
SAMPLES_INDEX = "eval_samples/samples.json"
REPORT = "report.html"


def append_line(path: Path, record: dict[str, Any]) -> None:
    """Append ``record`` as one JSON line and flush it to the OS (it survives a SIGKILL of the process)."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")
        handle.flush()


def read_lines(path: Path) -> list[dict[str, Any]]:
    """The records of a jsonl file (``[]`` when it is missing); a torn last line of a killed run is skipped."""
    if not path.exists():
        return []
    records = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number != len(lines):
                raise ValueError(f"{path}: line {number} is not JSON ({err})") from err
            logger.warning("%s: skipping a torn last line (the run was killed while writing it)", path)
    return records


def keep_through(path: Path, step: int) -> list[dict[str, Any]]:
    """Drop the records of ``path`` after ``step`` (the checkpoint a run resumes from); return the kept ones."""
    kept = [r for r in read_lines(path) if r["step"] <= step]
    write_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
    return kept


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: readers see the old or the new file."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def write_json(path: Path, record: dict[str, Any]) -> None:
    """``record`` as indented JSON, atomically."""
    write_atomic(path, json.dumps(record, indent=2, sort_keys=True) + "\n")


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file as a dict (``{}`` when it is missing)."""
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
