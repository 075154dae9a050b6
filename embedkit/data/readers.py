"""Strict readers for the two jsonl training formats embedkit consumes.

Why a dedicated reader instead of ``datasets.load_dataset("json")``: a single bad
row in a training file (an empty positive, a number where a sentence should be, a
positive that was also mined as a negative) does not crash training, it silently
teaches the model something wrong. So every row is checked on load, and a failure
points at ``file:line`` the way a compiler would, so it can be fixed in an editor.

Formats
-------
Retrieval (FlagEmbedding fine-tuning format)::

    {"query": str, "pos": [str, ...], "neg": [str, ...]}

``neg`` is optional; when missing it is filled in as ``[]`` so downstream code
never has to special-case it. Any other keys (``pos_scores``, ``neg_scores``,
``prompt``, ``type``, ...) are passed through untouched.

STS pairs::

    {"sentence1": str, "sentence2": str, "score": number}

``score`` is returned as a ``float``.

Bad rows
--------
``on_bad_row="error"`` (default) raises :class:`BadRowError` at the first bad
row. ``on_bad_row="skip"`` drops bad rows and records them; the reader then
returns a :class:`ReadResult`, which *is* the list of good rows (a ``list``
subclass, so existing ``list[dict]`` callers keep working) and additionally
carries ``.skipped``: ``[(line_number, reason), ...]``. Under ``"error"`` the
same type is returned with an empty ``.skipped``.

A file with no rows at all (or, under ``"skip"``, no *good* rows) raises
:class:`EmptyFileError`: training on nothing is never what was meant, and the
error is far clearer here than as an empty-dataloader failure later.

A line longer than ``max_line_bytes`` (1 MiB by default) is a bad row: a training row that size is
a missing newline that glued many rows together, or a dump of binary data, and decoding and
tokenising it would only waste memory before truncation threw it away.

Blank lines are ignored (trailing newlines, hand-edited files). The file is read
as bytes and split on ``b"\\n"`` only, and each line is decoded on its own, so
invalid UTF-8 is reported with its line number and so that unescaped U+2028 /
U+2029 inside a JSON string (legal JSON, and they do occur in scraped Chinese
text) is not mistaken for a line break as ``str.splitlines`` would do.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, Iterator, Literal

__all__ = [
    "BadRowError",
    "EmptyFileError",
    "ReadResult",
    "iter_retrieval_jsonl",
    "read_retrieval_jsonl",
    "read_sts_jsonl",
]

OnBadRow = Literal["error", "skip"]
MAX_LINE_BYTES = 1 << 20
PathLike = str | os.PathLike


class BadRowError(ValueError):
    """A row failed validation. ``str(err)`` reads ``path:line: reason``."""

    def __init__(self, path: PathLike, line: int, reason: str):
        self.path = os.fspath(path)
        self.line = line
        self.reason = reason
        super().__init__(f"{self.path}:{line}: {reason}")


class EmptyFileError(ValueError):
    """The file holds no usable rows."""


class ReadResult(list):
    """The good rows (this object itself is the list) plus the skip report.

    Kept as a ``list`` subclass so a reader's result can be indexed, sliced,
    ``len``-ed and passed wherever ``list[dict]`` is expected, while the skip
    report stays attached to the data it describes instead of being a second
    return value that callers forget to unpack.
    """

    def __init__(self, rows=(), skipped=(), path: PathLike | None = None):
        super().__init__(rows)
        self.skipped: list[tuple[int, str]] = list(skipped)
        self.path = None if path is None else os.fspath(path)

    @property
    def rows(self) -> list[dict]:
        return self

    @property
    def skipped_by_path(self) -> dict[str, list[tuple[int, str]]]:
        """{file: [(line, reason), ...]}: the skip report of one file, or of several concatenated."""
        if hasattr(self, "_by_path"):
            return self._by_path
        return {self.path: self.skipped} if self.path is not None else {}

    def head(self, n: int | None) -> "ReadResult":
        """The first n good rows (all if n is falsy), keeping the skip report."""
        out = ReadResult(self[:n] if n else self, self.skipped, self.path)
        if hasattr(self, "_by_path"):
            out._by_path = self._by_path
        return out

    @classmethod
    def concat(cls, results: "list[ReadResult]") -> "ReadResult":
        out = cls([row for r in results for row in r],
                  [s for r in results for s in r.skipped])
        out._by_path = {}
        out.file_rows = [len(r) for r in results]   # rows per file, in order: the batching unit
        for r in results:
            for path, skipped in r.skipped_by_path.items():
                out._by_path.setdefault(path, []).extend(skipped)
        return out

    def __repr__(self) -> str:  # a few thousand dicts is not a useful repr
        return f"ReadResult(path={self.path!r}, rows={len(self)}, skipped={len(self.skipped)})"


class _RowProblem(Exception):
    """Internal: raised by validators, turned into BadRowError / a skip entry."""


def _iter_lines(path: PathLike) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as fh:  # FileNotFoundError already names the path
        data = fh.read()
    if data.startswith(b"\xef\xbb\xbf"):  # BOM left by some Windows editors
        data = data[3:]
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        raw = raw.rstrip(b"\r")
        if raw.strip():
            yield lineno, raw


def _parse_line(raw: bytes, validate: Callable[[dict], dict], max_line_bytes: int | None) -> dict:
    """One line's row, checked; raises _RowProblem with the reason."""
    if max_line_bytes is not None and len(raw) > max_line_bytes:
        raise _RowProblem(f"line of {len(raw):,} bytes exceeds max_line_bytes={max_line_bytes:,} "
                          f"(a missing newline?)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _RowProblem(f"invalid UTF-8 at byte {e.start} of the line") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise _RowProblem(f"malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise _RowProblem(f"expected a JSON object, got {_json_type(obj)}")
    return validate(obj)


def _read(path: PathLike, on_bad_row: OnBadRow, validate: Callable[[dict], dict],
          max_line_bytes: int | None = MAX_LINE_BYTES) -> ReadResult:
    skipped: list[tuple[int, str]] = []
    rows = [row for _, row in _iter_rows(path, on_bad_row, validate, skipped, max_line_bytes,
                                         _iter_lines(path))]
    return ReadResult(rows, skipped, os.fspath(path))


def _iter_rows(path: PathLike, on_bad_row: OnBadRow, validate: Callable[[dict], dict],
               skipped: list[tuple[int, str]], max_line_bytes: int | None,
               lines: Iterator[tuple[int, bytes]]) -> Iterator[tuple[int, dict]]:
    """(line, row) of the good rows; bad ones raise BadRowError or are appended to `skipped`."""
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    path_s = os.fspath(path)
    n_lines = n_rows = 0
    for lineno, raw in lines:
        n_lines += 1
        try:
            row = _parse_line(raw, validate, max_line_bytes)
        except _RowProblem as p:
            if on_bad_row == "error":
                raise BadRowError(path_s, lineno, str(p)) from None
            skipped.append((lineno, str(p)))
            continue
        n_rows += 1
        yield lineno, row
    if n_lines == 0:
        raise EmptyFileError(f"{path_s}: file is empty (no JSON lines)")
    if not n_rows:
        raise EmptyFileError(
            f"{path_s}: all {n_lines} rows were skipped as bad; first: "
            f"line {skipped[0][0]}: {skipped[0][1]}"
        )


def _stream_lines(path: PathLike) -> Iterator[tuple[int, bytes]]:
    """`_iter_lines` without reading the whole file: binary iteration splits on b"\\n" only."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            raw = raw.rstrip(b"\n").rstrip(b"\r")
            if raw.strip():
                yield lineno, raw


def iter_retrieval_jsonl(path: PathLike, on_bad_row: OnBadRow = "error",
                         skipped: list[tuple[int, str]] | None = None,
                         max_line_bytes: int | None = MAX_LINE_BYTES) -> Iterator[tuple[int, dict]]:
    """`read_retrieval_jsonl` as a stream of (line, row), for files too large to hold
    (embedkit/data/store.py): the same checks, bad rows raise or go to `skipped`."""
    return _iter_rows(path, on_bad_row, _validate_retrieval, [] if skipped is None else skipped,
                      max_line_bytes, _stream_lines(path))


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "an array"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__


def _preview(s: str, n: int = 30) -> str:
    return repr(s if len(s) <= n else s[:n] + "…")


def _check_text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise _RowProblem(f"{where} must be a string, got {_json_type(value)}")
    if not value.strip():
        raise _RowProblem(f"{where} is an empty or whitespace-only string")
    return value


def _check_text_list(obj: dict, key: str, required: bool) -> list[str]:
    if key not in obj:
        if required:
            raise _RowProblem(f"missing key {key!r}")
        return []
    value = obj[key]
    if not isinstance(value, list):
        raise _RowProblem(f"{key!r} must be a list of strings, got {_json_type(value)}")
    if required and not value:
        raise _RowProblem(f"{key!r} is an empty list")
    for i, item in enumerate(value):
        _check_text(item, f"{key}[{i}]")
    return value


def _validate_retrieval(obj: dict) -> dict:
    if "query" not in obj:
        raise _RowProblem("missing key 'query'")
    _check_text(obj["query"], "'query'")
    pos = _check_text_list(obj, "pos", required=True)
    neg = _check_text_list(obj, "neg", required=False)
    if neg:
        # A positive that was also mined as a negative is a false negative: the
        # contrastive loss would push the query towards and away from the same
        # text. Compare stripped text so trailing spaces do not hide it.
        neg_index = {n.strip(): j for j, n in enumerate(neg)}
        for i, p in enumerate(pos):
            j = neg_index.get(p.strip())
            if j is not None:
                raise _RowProblem(
                    f"pos[{i}] also appears as neg[{j}] (false negative): {_preview(p)}"
                )
    if "prompt" in obj and not isinstance(obj["prompt"], str):
        raise _RowProblem(f"'prompt' (the row's query instruction) must be a string, got "
                          f"{_json_type(obj['prompt'])}")
    if "neg" not in obj:
        obj["neg"] = neg
    return obj


def _make_sts_validator(score_range: tuple[float, float] | None) -> Callable[[dict], dict]:
    if score_range is not None:
        lo, hi = score_range
        if not lo <= hi:
            raise ValueError(f"score_range must be (low, high) with low <= high, got {score_range!r}")

    def validate(obj: dict) -> dict:
        for key in ("sentence1", "sentence2"):
            if key not in obj:
                raise _RowProblem(f"missing key {key!r}")
            _check_text(obj[key], repr(key))
        if "score" not in obj:
            raise _RowProblem("missing key 'score'")
        score = obj["score"]
        # bool is an int subclass in Python; true/false are not scores.
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            raise _RowProblem(f"'score' must be a number, got {_json_type(score)}: {score!r}")
        if not math.isfinite(score):
            raise _RowProblem(f"'score' must be finite, got {score!r}")
        if score_range is not None and not lo <= score <= hi:
            raise _RowProblem(f"'score' {score!r} is outside score_range [{lo}, {hi}]")
        obj["score"] = float(score)
        return obj

    return validate


def read_retrieval_jsonl(path: PathLike, on_bad_row: OnBadRow = "error",
                         max_line_bytes: int | None = MAX_LINE_BYTES) -> ReadResult:
    """Read a ``{"query", "pos", "neg"}`` file; see the module docstring for rules."""
    return _read(path, on_bad_row, _validate_retrieval, max_line_bytes)


def read_sts_jsonl(
    path: PathLike,
    on_bad_row: OnBadRow = "error",
    score_range: tuple[float, float] | None = None,
    max_line_bytes: int | None = MAX_LINE_BYTES,
) -> ReadResult:
    """Read a ``{"sentence1", "sentence2", "score"}`` file.

    ``score_range`` is inclusive, e.g. ``(0, 5)`` for STS-B; leaving it ``None``
    accepts any finite number, since label scales differ between datasets.
    """
    return _read(path, on_bad_row, _make_sts_validator(score_range), max_line_bytes)


def _make_text_validator(field: str) -> Callable[[dict], dict]:
    def validate(obj: dict) -> dict:
        if field not in obj:
            raise _RowProblem(f"missing key {field!r}")
        return {"text": _check_text(obj[field], repr(field))}

    return validate


def read_text_jsonl(path: PathLike, field: str = "text", on_bad_row: OnBadRow = "error",
                    max_line_bytes: int | None = MAX_LINE_BYTES) -> ReadResult:
    """Read a jsonl file of documents, one JSON object per line, keeping `field` as {"text"}
    (e.g. WuDaoCorpora's `content`)."""
    return _read(path, on_bad_row, _make_text_validator(field), max_line_bytes)


def teacher_scores_of(row: dict, where: str) -> tuple[list[float], list[float]] | None:
    """(pos_scores, neg_scores) of a FlagEmbedding row as floats, or None when it has neither.

    Each must hold one finite number per text of `pos` / `neg` (FlagEmbedding's format); a row
    with no negatives may leave `neg_scores` out. Anything else is an error naming `where`."""
    if row.get("pos_scores") is None and row.get("neg_scores") is None:
        return None
    out = []
    for key, texts in (("pos_scores", "pos"), ("neg_scores", "neg")):
        scores = row.get(key)
        scores = [] if scores is None and not row.get(texts) else scores
        n = len(row.get(texts) or ())
        if not isinstance(scores, (list, tuple)) or len(scores) != n:
            raise ValueError(f"{where}: `{key}` must be a list of {n} numbers, one per `{texts}` text "
                             f"(FlagEmbedding's teacher-score format), got {scores!r}")
        for x in scores:
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
                raise ValueError(f"{where}: `{key}` must hold finite numbers, got {x!r}")
        out.append([float(x) for x in scores])
    return out[0], out[1]
