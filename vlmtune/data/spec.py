"""Data specs: YAML files that say where rows come from and how their columns map to conversations.

A spec (see ``data_specs/latex_ocr.yaml``)::

    name: latex_ocr
    format: image_text            # image_text: one image column + one answer column; chat: messages + images
    source:
      type: parquet               # parquet | jsonl | json | csv | imagefolder | hub
      path: data/latex_ocr        # a folder (files found by split name) or a file; or `hub: owner/name`
    columns: {image: image, text: text}
    instruction: Write the LaTeX representation for this image.
    system: null                  # optional system prompt

:func:`load_rows` turns a spec and a split into a list-like of canonical rows (``vlmtune.data.schema``), with
images left encoded until a row is read.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vlmtune.data.schema import DataError

SOURCE_TYPES = ("parquet", "jsonl", "json", "csv", "imagefolder", "hub")
FORMATS = ("image_text", "chat")
_SUFFIXES = {"parquet": (".parquet",), "jsonl": (".jsonl",), "json": (".json",), "csv": (".csv",)}


@dataclass
class DataSpec:
    """Where rows come from and how they become conversations.

    Attributes:
        name: a label for logs.
        format: ``"image_text"`` (an image column and an answer column, turned into one user turn with the
            image and ``instruction``, and one assistant turn) or ``"chat"`` (a messages column and an images
            column already in the canonical shape).
        source_type: one of :data:`SOURCE_TYPES`.
        path: local folder or file (``None`` for ``hub``).
        hub: dataset name on the Hugging Face hub (only when ``source_type == "hub"``), read through the Hugging
            Face cache (fetched once online; with ``HF_HUB_OFFLINE=1`` the cache only, see :mod:`vlmtune.hub`).
        columns: canonical name → the dataset's column name (``image``/``text`` or ``messages``/``images``).
        instruction: the user's prompt for ``image_text`` rows.
        system: optional system prompt prepended to every conversation.
    """

    name: str = "data"
    format: str = "image_text"
    source_type: str = "parquet"
    path: str | None = None
    hub: str | None = None
    columns: dict[str, str] = field(default_factory=lambda: {"image": "image", "text": "text"})
    instruction: str = "Write the LaTeX representation for this image."
    system: str | None = None

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"spec {self.name!r}: format {self.format!r} is not one of {FORMATS}")
        if self.source_type not in SOURCE_TYPES:
            raise ValueError(f"spec {self.name!r}: source type {self.source_type!r} is not one of {SOURCE_TYPES}")
        if self.source_type == "hub" and not self.hub:
            raise ValueError(f"spec {self.name!r}: source type 'hub' needs `hub: owner/name`")
        needed = ("image", "text") if self.format == "image_text" else ("messages", "images")
        missing = [k for k in needed if k not in self.columns]
        if missing:
            raise ValueError(f"spec {self.name!r}: columns must map {list(needed)}; missing {missing}")

    @classmethod
    def from_yaml(cls, path: str | Path) -> DataSpec:
        """Read a spec file; a bare name like ``"latex_ocr"`` is one of the specs shipped in ``vlmtune/data_specs/``."""
        path = resolve_spec_path(path)
        raw = yaml.safe_load(Path(path).read_text()) or {}
        source = raw.get("source", {})
        return cls(
            name=raw.get("name", Path(path).stem),
            format=raw.get("format", "image_text"),
            source_type=source.get("type", "parquet"),
            path=source.get("path"),
            hub=source.get("hub"),
            columns=raw.get("columns", {"image": "image", "text": "text"}),
            instruction=raw.get("instruction", cls.instruction),
            system=raw.get("system"),
        )


def resolve_spec_path(path: str | Path) -> Path:
    """A spec file path, trying the bundled ``data_specs/<name>.yaml`` for bare names.

    The repository's top-level ``data_specs/`` is the package's ``vlmtune/data_specs/`` (a link in a checkout,
    package data in a wheel), so the same lookup works installed or not.
    """
    candidate = Path(path)
    if candidate.exists():
        return candidate
    bundled = Path(__file__).resolve().parents[1] / "data_specs" / f"{path}.yaml"
    if bundled.exists():
        return bundled
    raise FileNotFoundError(f"data spec {str(path)!r} not found (also looked for {bundled})")


def _data_files(spec: DataSpec, path: Path, split: str) -> list[str]:
    if path.is_file():
        return [str(path)]
    if not path.is_dir():
        raise FileNotFoundError(f"spec {spec.name!r}: data path {str(path)!r} does not exist")
    suffixes = _SUFFIXES[spec.source_type]
    files = sorted(str(p) for p in path.iterdir() if p.name.startswith(split) and p.suffix in suffixes)
    if not files:
        present = sorted(p.name for p in path.iterdir())
        raise FileNotFoundError(
            f"spec {spec.name!r}: no {spec.source_type} file for split {split!r} in {str(path)!r} "
            f"(files there: {present})"
        )
    return files


def check_utf8(path: str | Path) -> None:
    """Raise :class:`DataError` naming the file and line of the first byte that is not UTF-8.

    ``datasets`` reads jsonl / json / csv as UTF-8 and fails with a bare ``UnicodeDecodeError`` (or an Arrow error
    deep in its builder) that names neither; a file in another encoding is a whole-file problem that skipping rows
    would not fix, so it stops the run whatever ``on_bad_row`` says.
    """
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(
                    f"{path}:{number}",
                    f"not valid UTF-8 (byte 0x{line[err.start]:02x} at byte {err.start + 1} of the line: "
                    f"{err.reason}); re-encode the file as UTF-8, e.g. `iconv -f latin1 -t utf-8`",
                    kind="non-UTF-8 text",
                    where=f"{path} line {number}",
                ) from err


def _load_dataset(spec: DataSpec, split: str, path: str | Path | None):
    import datasets

    path = Path(path if path is not None else (spec.path or "."))
    if spec.source_type == "hub":
        files = _hub_files(spec, split)
        return datasets.load_dataset(_BUILDERS[Path(files[0]).suffix], data_files={split: files}, split=split)
    if spec.source_type == "imagefolder":
        return datasets.load_dataset("imagefolder", data_dir=str(path), split=split)
    builder = "json" if spec.source_type in ("jsonl", "json") else spec.source_type
    files = _data_files(spec, path, split)
    if builder in ("json", "csv"):
        for file in files:
            check_utf8(file)
    options = _csv_as_written(files[0]) if builder == "csv" else {}
    return datasets.load_dataset(builder, data_files={split: files}, split=split, **options)


_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}


def _hub_files(spec: DataSpec, split: str) -> list[str]:
    """The data files of ``split`` in the hub dataset's snapshot: named for it (``train-00000-of-00001.parquet``,
    ``train.jsonl``) or in a folder named for it, all of one format (parquet is preferred)."""
    from vlmtune.hub import hub_snapshot

    folder = hub_snapshot(spec.hub, repo_type="dataset")
    found = [p for p in sorted(folder.rglob("*")) if p.suffix in _BUILDERS and split in (p.parent.name, _split_of(p))]
    for suffix in _BUILDERS:
        files = [str(p) for p in found if p.suffix == suffix]
        if files:
            return files
    present = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    raise FileNotFoundError(f"spec {spec.name!r}: no data file for split {split!r} in {spec.hub} (files: {present})")


def _split_of(path: Path) -> str:
    # "train-00000-of-00001.parquet", "train_0.jsonl", "train.csv" -> "train"
    return path.stem.split("-")[0].split("_")[0]


def _csv_as_written(first_file: str) -> dict[str, Any]:
    # pandas would infer types and missing values: an answer "007" would become 7, "1.50" 1.5, and "NA" or an
    # empty cell in a numeric column NaN (then the text "nan"). Every column is read as the string written; an
    # empty cell is "" (an empty answer, refused by the collator).
    import datasets

    with open(first_file, newline="", encoding="utf-8-sig") as handle:  # pandas drops a BOM too
        header = next(csv.reader(handle), [])
    return {"features": datasets.Features({c: datasets.Value("string") for c in header}), "na_filter": False}


def check_columns(spec: DataSpec, column_names: Sequence[str]) -> None:
    """Raise naming the missing column(s) and listing the ones the data has."""
    missing = [c for c in spec.columns.values() if c not in column_names]
    if missing:
        raise ValueError(
            f"spec {spec.name!r} names column(s) {missing} that the data does not have; "
            f"available columns: {list(column_names)}"
        )


class Rows(Sequence):
    """Canonical rows over a ``datasets.Dataset``; images stay encoded (bytes or path) until read."""

    def __init__(self, dataset, spec: DataSpec, base_dir: str | Path | None = None):
        import datasets

        self.base_dir = Path(base_dir) if base_dir is not None else None
        check_columns(spec, dataset.column_names)
        self.spec = spec
        image_column = spec.columns.get("image") if spec.format == "image_text" else spec.columns["images"]
        feature = dataset.features.get(image_column)
        if isinstance(feature, datasets.Image):
            dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        elif isinstance(feature, datasets.Sequence | list) and isinstance(
            getattr(feature, "feature", feature[0] if isinstance(feature, list) else None), datasets.Image
        ):
            dataset = dataset.cast_column(image_column, [datasets.Image(decode=False)])
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return to_canonical(self.dataset[int(index)], self.spec, self.base_dir)


def _resolve(image: Any, base_dir: Path | None) -> Any:
    # Relative image paths in jsonl/csv rows are relative to the data folder, not the working directory.
    if isinstance(image, str) and base_dir is not None and not Path(image).is_absolute():
        return str(base_dir / image)
    return image


def _answer_text(answer: Any) -> str | bytes:
    # A missing answer (None, or a NaN from a numeric column) becomes "" so the row is refused as an empty
    # answer, not trained on "None" / "nan". Bytes stay bytes: the collator decodes them as UTF-8 or refuses the
    # row naming it (vlmtune.data.schema.decode_text).
    if answer is None or (isinstance(answer, float) and math.isnan(answer)):
        return ""
    return answer if isinstance(answer, (str, bytes, bytearray)) else str(answer)


def to_canonical(raw: dict[str, Any], spec: DataSpec, base_dir: Path | None = None) -> dict[str, Any]:
    """One dataset record → ``{"messages", "images"}`` according to the spec."""
    if spec.format == "chat":
        messages = list(raw[spec.columns["messages"]])
        images = [_resolve(i, base_dir) for i in raw[spec.columns["images"]] or []]
    else:
        image = _resolve(raw[spec.columns["image"]], base_dir)
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": spec.instruction}]},
            {"role": "assistant", "content": [{"type": "text", "text": _answer_text(raw[spec.columns["text"]])}]},
        ]
        images = [image]
    if spec.system:
        messages = [{"role": "system", "content": [{"type": "text", "text": spec.system}]}, *messages]
    return {"messages": messages, "images": images}


def has_split(spec: DataSpec | str | Path, split: str, path: str | Path | None = None) -> bool:
    """Whether :func:`load_rows` has its own rows for ``split``: a folder with files named for it.

    A single file is one set of rows whatever the split asked, so it has no held-out split of its own. Hub and
    image-folder sources name their splits themselves and are taken at their word (``True``).
    """
    if not isinstance(spec, DataSpec):
        spec = DataSpec.from_yaml(spec)
    if spec.source_type in ("hub", "imagefolder"):
        return True
    folder = Path(path if path is not None else (spec.path or "."))
    suffixes = _SUFFIXES[spec.source_type]
    return folder.is_dir() and any(p.name.startswith(split) and p.suffix in suffixes for p in folder.iterdir())


def load_rows(spec: DataSpec | str | Path, split: str = "train", path: str | Path | None = None) -> Rows:
    """Canonical rows of ``split`` for a spec (object, file, or bundled name); ``path`` overrides the spec's."""
    if not isinstance(spec, DataSpec):
        spec = DataSpec.from_yaml(spec)
    base = Path(path if path is not None else (spec.path or "."))
    return Rows(_load_dataset(spec, split, path), spec, base_dir=base if base.is_dir() else base.parent)
