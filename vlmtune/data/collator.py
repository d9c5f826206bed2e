"""From canonical rows to model tensors: chat template, image expansion, labels, padding.

Shared by every family; the family's descriptor supplies image processing, the placeholder expansion and the extra
batch keys. Labels cover assistant turns only (their text and the end-of-turn token, not the newline the
template writes after it); prompt, image and pad positions are -100. Labels are placed by character spans: the
conversation is rendered with the chat template, the span of each assistant turn is found by rendering the
conversation up to that turn, placeholders are expanded outside those spans, and the expanded text is tokenized
once with offsets, so ``input_ids`` are exactly what the family's processor produces for the same text.

Text written in an assistant turn is the answer, never markup: a literal image tag there (``<image>``,
``<|image_pad|>``, ``<start_of_image>`` ...) is not counted as an image, not expanded, and where it spells one of
the tokenizer's special tokens it is tokenized as plain text (see :func:`tokenize`). The family's processor would
turn it into an image token with no image behind it; here it stays what the user wrote.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlmtune.data.bad_rows import BadRows, describe, write_bad_rows
from vlmtune.data.schema import DataError, decoded_messages, load_image, validate_row
from vlmtune.families.base import Family, ImageBatch, validate_image_options

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
OVERFLOW = ("drop", "error")
BAD_ROWS = ("error", "skip")


class SampleTooLong(DataError):
    """A sample's tokens exceed ``max_length``; images are atoms, so it is never cut."""


@dataclass
class Encoded:
    """One encoded conversation: token ids, labels and its processed images."""

    input_ids: list[int]
    labels: list[int]
    images: ImageBatch = field(default_factory=ImageBatch)


def render_with_spans(processor, messages: list[dict], index: int) -> tuple[str, list[tuple[int, int]]]:
    """Render ``messages`` with the chat template; return the text and the character spans to supervise.

    The span of assistant turn ``i`` runs from the end of ``render(messages[:i], add_generation_prompt=True)``
    to the end of ``render(messages[: i + 1])`` minus trailing whitespace. This needs the template to be
    prefix-stable (rendering more turns only appends), which the supported families' templates are; a template
    that is not raises rather than mislabel.
    """
    if messages[0]["role"] == "assistant":
        raise DataError(index, "conversation starts with an assistant turn")

    def render(msgs, generation_prompt=False):
        return processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)

    full = render(messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt, upto = render(messages[:i], True), render(messages[: i + 1])
        if not (upto.startswith(prompt) and full.startswith(upto)):
            raise DataError(index, f"the chat template is not prefix-stable at turn {i}; cannot place labels")
        spans.append((len(prompt), len(upto.rstrip())))
    return full, spans


def expand_images(
    text: str, spans: list[tuple[int, int]], placeholder: str, expansions: list[str], index: int
) -> tuple[str, list[tuple[int, int]]]:
    """Replace each image placeholder outside the supervised spans with its expansion; shift the spans.

    Placeholders inside assistant text are left alone (a literal tag in an answer is text, not an image).
    """
    pieces, cursor = [], 0
    for start, end in spans:
        pieces += [(text[cursor:start], False), (text[start:end], True)]
        cursor = end
    pieces.append((text[cursor:], False))
    n_tags = sum(p.count(placeholder) for p, supervised in pieces if not supervised)
    if n_tags != len(expansions):
        raise DataError(
            index,
            f"the rendered prompt holds {n_tags} image tag(s) for {len(expansions)} image(s) "
            f"(a {placeholder!r} written in a user or system turn counts as a tag)",
            kind="image count",
        )
    out, new_spans, next_image = [], [], iter(expansions)
    length = 0
    for piece, supervised in pieces:
        if not supervised:
            parts = piece.split(placeholder)
            piece = parts[0] + "".join(next(next_image) + part for part in parts[1:])
        else:
            new_spans.append((length, length + len(piece)))
        out.append(piece)
        length += len(piece)
    return "".join(out), new_spans


def answer_regions(text: str, spans: list[tuple[int, int]], end_of_turn: str) -> list[tuple[int, int]]:
    """The part of each supervised span that the assistant's message wrote: the span less the template's
    closing ``end_of_turn`` token (which stays markup)."""
    return [(s, e - len(end_of_turn)) if text[s:e].endswith(end_of_turn) else (s, e) for s, e in spans]


def tokenize(tokenizer, text: str, literal: list[tuple[int, int]]) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets of ``text``; inside the ``literal`` ranges special tokens are plain text.

    Without literal ranges this is one tokenizer call, exactly what the family's processor does. Otherwise the
    text is tokenized piece by piece, a literal piece exactly as ``tokenizer(piece, split_special_tokens=True)``
    would. A literal range is an answer: it ends at the end-of-turn token, where the tokenizer cuts its input
    anyway, and starts after the template's newline, where the supported families' pre-tokenizers split too
    (so the other tokens come out as in one call; labels follow these offsets whatever the tokenizer).
    """
    pieces, cursor = [], 0
    for start, end in literal:
        pieces += [(cursor, start, False), (start, end, True)]
        cursor = end
    pieces.append((cursor, len(text), False))
    ids, offsets = [], []
    for start, end, split in pieces:
        if start == end:
            continue
        enc = tokenizer(
            text[start:end], add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=split
        )
        ids += enc["input_ids"]
        offsets += [(a + start, b + start) for a, b in enc["offset_mapping"]]
    return ids, offsets


class Collator:
    """Encode canonical rows for one family and pad them into a batch.

    Args:
        family: the model's family descriptor (``vlmtune.families.detect(model.config)``).
        processor: the family's processor (tokenizer + image processor + chat template).
        model_config: the model's config (image token ids, merge size ...).
        max_length: longest sample in tokens, images included.
        image_options: family image options (see the family's ``image_options``), e.g. ``max_pixels``.
        train_on: ``"assistant"`` (labels on assistant turns only) or ``"all"`` (every text token).
    """

    def __init__(
        self,
        family: Family,
        processor,
        model_config,
        max_length: int = 2048,
        image_options: dict[str, Any] | None = None,
        train_on: str = "assistant",
    ):
        if train_on not in ("assistant", "all"):
            raise ValueError(f"train_on must be 'assistant' or 'all', got {train_on!r}")
        if max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}")
        self.family, self.processor, self.model_config = family, processor, model_config
        self.max_length, self.train_on = max_length, train_on
        self.image_options = validate_image_options(family, image_options or {})
        tokenizer = processor.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        special = {i: t.content for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        self.special_ids, self.special_strings = special, sorted(set(special.values()))

    def encode(self, row: dict[str, Any], index: int) -> Encoded:
        """Encode one canonical row; raise :class:`DataError` naming ``index`` on bad input or overflow."""
        validate_row(row, index)
        images = [load_image(source, index) for source in row.get("images") or []]
        try:
            batch = self.family.process_images(self.processor, images, self.image_options) if images else None
        except (ValueError, RuntimeError) as err:
            raise DataError(index, f"the image processor rejected an image ({err})", kind="image rejected") from err
        batch = batch or ImageBatch()
        text, spans = render_with_spans(self.processor, decoded_messages(row["messages"], index), index)
        expansions = [self.family.expand_image(self.processor, batch, i) for i in range(len(images))]
        text, spans = expand_images(text, spans, self.family.image_placeholder, expansions, index)
        literal = [
            (start, end)
            for start, end in answer_regions(text, spans, self.family.end_of_turn)
            if any(token in text[start:end] for token in self.special_strings)
        ]
        input_ids, offsets = tokenize(self.processor.tokenizer, text, literal)
        if len(input_ids) > self.max_length:
            raise SampleTooLong(
                index, f"has {len(input_ids)} tokens, more than max_length={self.max_length}", kind="too long"
            )
        self._check_image_markers(input_ids, expansions, index)
        labels = self._labels(input_ids, offsets, spans, len(text))
        return Encoded(input_ids=input_ids, labels=labels, images=batch)

    def _check_image_markers(self, input_ids: list[int], expansions: list[str], index: int) -> None:
        # Every image token and image marker (boi/eoi, <image>/<slice> ...) must come from an image's expansion:
        # one written literally in a user or system turn would give the model image tokens with no image.
        tokenizer = self.processor.tokenizer
        joined = "".join(expansions)
        expanded = tokenizer(joined, add_special_tokens=False)["input_ids"] if expansions else []
        # Special tokens spelled out in the expansions (not byte-fallback pieces such as <0x0A> of a newline).
        need = Counter(i for i in expanded if i in self.special_ids and self.special_ids[i] in joined)
        markers = set(need) | set(self.image_token_ids())
        found = Counter(i for i in input_ids if i in markers)
        for token in sorted(markers):
            if found[token] != need[token]:
                name = tokenizer.convert_ids_to_tokens(token)
                raise DataError(
                    index,
                    f"holds {found[token]} {name!r} token(s) where its {len(expansions)} image(s) need "
                    f"{need[token]} (is an image tag written literally in a user or system turn?)",
                    kind="image count",
                )

    def _labels(self, input_ids, offsets, spans, text_length) -> list[int]:
        if self.train_on == "all":
            spans = [(0, text_length)]
        image_ids = self.image_token_ids()
        labels = []
        span_iter, current = iter(spans), None
        current = next(span_iter, None)
        for token, (start, _end) in zip(input_ids, offsets, strict=True):
            while current is not None and start >= current[1]:
                current = next(span_iter, None)
            inside = current is not None and current[0] <= start < current[1]
            labels.append(token if inside and token not in image_ids else IGNORE_INDEX)
        return labels

    def image_token_ids(self) -> list[int]:
        """Token ids that stand for image content (never supervised): the model config's, else the processor's
        (MiniCPM-V 2.6's config names no image token; its processor knows the ``<unk>`` query filler)."""
        config = self.model_config
        ids = {getattr(config, a, None) for a in ("image_token_id", "image_token_index", "video_token_id")} - {None}
        if not ids:
            ids = {getattr(self.processor, "image_token_id", None)} - {None}
        return sorted(ids)

    def pad(self, encoded: list[Encoded]) -> dict[str, torch.Tensor]:
        """Right-pad a list of encoded samples and add the family's image tensors and extra keys."""
        length = max(len(e.input_ids) for e in encoded)
        input_ids = torch.full((len(encoded), length), self.pad_id, dtype=torch.long)
        labels = torch.full((len(encoded), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), length), dtype=torch.long)
        for b, e in enumerate(encoded):
            n = len(e.input_ids)
            input_ids[b, :n] = torch.tensor(e.input_ids)
            labels[b, :n] = torch.tensor(e.labels)
            attention_mask[b, :n] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        images = ImageBatch.cat([e.images for e in encoded])
        batch.update(images.tensors)
        batch.update(self.family.batch_extras(batch, images, self.processor, self.model_config))
        return batch

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Collate dataset items ``{"index": i, "row": canonical_row}`` into a padded batch."""
        return self.pad([self.encode(item["row"], item["index"]) for item in items])


class PreparedDataset(torch.utils.data.Dataset):
    """Rows checked once before training, so that no row can break a run deep inside the model.

    Every row is checked before anything stops. Bad rows (missing or unreadable image, empty answer, tag/image
    mismatch ...) stop the run listing them all (``on_bad_row="error"``, the default; see
    :class:`~vlmtune.data.bad_rows.BadRows`) or are skipped and counted by kind (``"skip"``); over-long rows are
    handled as ``overflow`` says (``"drop"``: skipped and counted; ``"error"``: they stop the run too). Nothing is
    replaced: a skipped row is gone, and :attr:`skipped` says why; :attr:`bad_rows` holds every bad row's error,
    and with ``bad_rows_path`` they are written there (see :func:`~vlmtune.data.bad_rows.write_bad_rows`).
    ``what`` names the rows in log messages (``"training rows"``).

    Items are ``{"index": original_row_index, "row": canonical_row}``; images are re-read per batch, so
    memory holds only the kept indices and lengths.
    """

    def __init__(
        self,
        rows,
        collator: Collator,
        overflow: str = "drop",
        on_bad_row: str = "error",
        bad_rows_path: str | Path | None = None,
        what: str = "rows",
    ):
        if overflow not in OVERFLOW:
            raise ValueError(f"overflow must be one of {OVERFLOW}, got {overflow!r}")
        if on_bad_row not in BAD_ROWS:
            raise ValueError(f"on_bad_row must be one of {BAD_ROWS}, got {on_bad_row!r}")
        self.rows = rows
        self.kept: list[int] = []
        self.lengths: list[int] = []
        # Image tokens per kept row: the vision load that token-budget packing balances (vlmtune.data.budget).
        self.image_tokens: list[int] = []
        image_ids = set(collator.image_token_ids())
        self.skipped: Counter[str] = Counter()
        self.bad_rows: list[DataError] = []
        fatal: list[DataError] = []
        for index in range(len(rows)):
            try:
                encoded = collator.encode(rows[index], index)
            except DataError as err:
                self.bad_rows.append(err)
                self.skipped[err.kind] += 1
                if (overflow if isinstance(err, SampleTooLong) else on_bad_row) == "error":
                    fatal.append(err)
                continue
            self.kept.append(index)
            self.lengths.append(len(encoded.input_ids))
            self.image_tokens.append(sum(1 for token in encoded.input_ids if token in image_ids))
        path = None
        if bad_rows_path is not None and self.bad_rows:
            path = write_bad_rows(self.bad_rows, bad_rows_path)
        elif bad_rows_path is not None:
            Path(bad_rows_path).unlink(missing_ok=True)  # an earlier run's list would name rows since fixed
        if fatal:
            raise BadRows(fatal, len(rows), path)
        if self.bad_rows:
            logger.warning("skipped these %s:\n%s", what, describe(self.bad_rows, len(rows), path))
        if not self.kept:
            raise DataError("*", f"no usable rows out of {len(rows)} (skipped: {dict(self.skipped)})")
        logger.info("prepared %d of %d %s; skipped %s", len(self.kept), len(rows), what, dict(self.skipped) or 0)

    def __len__(self) -> int:
        return len(self.kept)

    def __getitem__(self, i: int) -> dict[str, Any]:
        index = self.kept[i]
        return {"index": index, "row": self.rows[index]}

    def to_hf_dataset(self):
        """The kept rows as a ``datasets.Dataset`` of the same ``{"index", "row"}`` items, for trainers that take
        nothing else (TRL's ``SFTTrainer``). It stores only the indices; each row is read when an item is."""
        import datasets

        def read(batch: dict[str, list]) -> dict[str, list]:
            return {"index": batch["index"], "row": [self.rows[i] for i in batch["index"]]}

        return datasets.Dataset.from_dict({"index": list(self.kept)}).with_transform(read)
