"""MinHash near-duplicate removal (Conan-Embedding's pre-training filter, after InternLM2.5's
pipeline), with datasketch's `MinHash` and `MinHashLSH`.

A row's text (its query and first positive by default) becomes a set of character n-gram shingles
(n = 3 by default: Chinese has no spaces to split words on, and character n-grams are what MinHash
deduplication of Chinese text uses). MinHash with `num_perm` permutations estimates the Jaccard
similarity J(A, B) = |A ∩ B| / |A ∪ B| of two shingle sets; LSH (banding chosen by datasketch for
`threshold`) finds the rows likely above the threshold. Rows are taken in order: a row whose LSH
query returns an earlier kept row is dropped as a near-duplicate of it, so the first copy survives.
Defaults: threshold 0.8, 128 permutations, 3-grams.
"""

from __future__ import annotations

import logging
from typing import Sequence

from embedkit.filters import FilterReport

log = logging.getLogger(__name__)


def shingles(text: str, n: int = 3) -> set[str]:
    """Character n-grams, whitespace removed; a text shorter than n is one shingle."""
    text = "".join(text.split())
    if len(text) <= n:
        return {text} if text else set()
    return {text[i:i + n] for i in range(len(text) - n + 1)}


class MinHashDedup:
    def __init__(self, threshold: float = 0.8, num_perm: int = 128, ngram: int = 3,
                 fields: Sequence[str] = ("query", "pos"), seed: int = 1):
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold is a Jaccard similarity in (0, 1], got {threshold}")
        if ngram < 1:
            raise ValueError(f"ngram must be >= 1, got {ngram}")
        self.threshold = threshold
        self.num_perm = num_perm
        self.ngram = ngram
        self.fields = tuple(fields)
        self.seed = seed

    def text_of(self, row: dict) -> str:
        parts = []
        for f in self.fields:
            value = row.get(f)
            parts.append(value[0] if isinstance(value, list) and value else value or "")
        return "\n".join(str(p) for p in parts)

    def minhash(self, text: str):
        from datasketch import MinHash

        m = MinHash(num_perm=self.num_perm, seed=self.seed)
        for s in shingles(text, self.ngram):
            m.update(s.encode("utf-8"))
        return m

    def __call__(self, rows: Sequence[dict], encoder=None) -> tuple[list[dict], FilterReport]:
        from datasketch import MinHashLSH

        lsh = MinHashLSH(threshold=self.threshold, num_perm=self.num_perm)
        report = FilterReport("minhash_dedup", extra={"threshold": self.threshold})
        kept = []
        for i, row in enumerate(rows):
            m = self.minhash(self.text_of(row))
            if lsh.query(m):
                report.dropped += 1
                continue
            lsh.insert(str(i), m)
            kept.append(row)
            report.kept += 1
        log.info("%s", report)
        return kept, report
