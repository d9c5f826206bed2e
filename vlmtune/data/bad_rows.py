"""Every bad row of a dataset, reported at once: the first few on screen, all of them in ``bad_rows.jsonl``.

Preparation (:class:`~vlmtune.data.collator.PreparedDataset`) checks every row before it stops, so a user fixes
their data in one pass rather than one row per run. ``bad_rows.jsonl`` holds one line per bad row, rows that were
skipped (``on_bad_row="skip"``, or over-long rows with ``overflow="drop"``) included::

    {"row": 7, "kind": "missing image", "reason": "image file 'images/7.png' not found"}
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

from vlmtune.data.schema import DataError

logger = logging.getLogger(__name__)

SHOWN = 20
"""Bad rows written out in a message; the rest are counted by kind (and all are in ``bad_rows.jsonl``)."""


def describe(errors: list[DataError], total: int, path: Path | None = None) -> str:
    """The first :data:`SHOWN` errors one per line, then the count of all of them by kind (and where the list is)."""
    lines = [str(err) for err in errors[:SHOWN]]
    if len(errors) > SHOWN:
        lines.append(f"... and {len(errors) - SHOWN} more")
    kinds = ", ".join(f"{kind} {count}" for kind, count in Counter(e.kind for e in errors).most_common())
    where = f"; every one is listed in {path}" if path is not None else ""
    lines.append(f"{len(errors)} bad row(s) of {total} ({kinds}){where}")
    return "\n".join(lines)


class BadRows(DataError):
    """The data holds rows that cannot be used; raised once every row has been checked.

    The message lists the first :data:`SHOWN` rows (each ``row N: reason``), then counts them all by kind.
    ``row``, ``reason`` and ``kind`` are the first bad row's; :attr:`errors` holds them all.

    Args:
        errors: one :class:`DataError` per bad row, in row order.
        total: rows checked.
        path: the ``bad_rows.jsonl`` written, named in the message.
    """

    def __init__(self, errors: list[DataError], total: int, path: Path | None = None):
        self.errors, self.total, self.path = errors, total, path
        first = errors[0]
        self.row, self.reason, self.kind = first.row, first.reason, first.kind
        ValueError.__init__(self, describe(errors, total, path))


def write_bad_rows(errors: list[DataError], path: str | Path) -> Path:
    """Write one JSON line ``{"row", "kind", "reason"}`` per error to ``path`` (its folder is created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for err in errors:
            handle.write(json.dumps({"row": err.row, "kind": err.kind, "reason": err.reason}, ensure_ascii=False))
            handle.write("\n")
    logger.info("wrote %d bad row(s) to %s", len(errors), path)
    return path
