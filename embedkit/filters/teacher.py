"""Teacher-score filtering: a given embedding model scores every (query, positive) pair and pairs
below a threshold are dropped.

score(q, p) = cos(E(q), E(p)) with the teacher E (L2-normalised embeddings, so the dot product).
C-Pack filters its weak pairs with `shibing624/text2vec-base-chinese` at 0.43 (FlagEmbedding README,
C-MTP unlabeled); Conan-Embedding scores its pre-training pairs with `BAAI/bge-large-zh-v1.5` and
drops those below 0.4 (keeping about 89%). Defaults: threshold 0.4.

A row with several positives keeps the positives that pass and is dropped when none does; the
report counts pairs (`kept`/`dropped`) and whole rows dropped (`rows_dropped`). The teacher is a
saved model folder (`model_path`, read with `load_encoder`: embedkit's or any HF encoder; at paper
scale a local copy of the teacher named above) or, when none is given, the encoder the pipeline
runs with.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from embedkit.filters import FilterReport
from embedkit.data.instructions import instructed_query

log = logging.getLogger(__name__)


class TeacherScoreFilter:
    def __init__(self, threshold: float = 0.4, model_path: str | None = None,
                 query_instruction: str | None = None, batch_size: int = 256,
                 max_length: int | None = None, device: str = "cpu"):
        if not -1.0 <= threshold <= 1.0:
            raise ValueError(f"threshold is a cosine and must be in [-1, 1], got {threshold}")
        self.threshold = threshold
        self.model_path = model_path
        self.query_instruction = query_instruction or ""
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = device

    def scores(self, rows: Sequence[dict], encoder) -> list[np.ndarray]:
        """Per row, the cosine of its query with each of its positives."""
        queries = encoder.encode([instructed_query(r, self.query_instruction) for r in rows],
                                 batch_size=self.batch_size, max_length=self.max_length)
        passages = [p for r in rows for p in r["pos"]]
        pvecs = encoder.encode(passages, batch_size=self.batch_size, max_length=self.max_length)
        out, at = [], 0
        for q, r in zip(queries, rows):
            out.append(pvecs[at:at + len(r["pos"])] @ q)
            at += len(r["pos"])
        return out

    def __call__(self, rows: Sequence[dict], encoder=None) -> tuple[list[dict], FilterReport]:
        if self.model_path:
            from embedkit.models.build import load_encoder

            encoder = load_encoder(self.model_path, device=self.device)
        if encoder is None:
            raise ValueError("TeacherScoreFilter needs a teacher: set model_path or pass an encoder")
        report = FilterReport("teacher_score", extra={"threshold": self.threshold, "rows_dropped": 0})
        kept_rows = []
        for row, s in zip(rows, self.scores(rows, encoder)):
            keep = s >= self.threshold
            report.kept += int(keep.sum())
            report.dropped += int((~keep).sum())
            if keep.any():
                kept_rows.append({**row, "pos": [p for p, k in zip(row["pos"], keep) if k]})
            else:
                report.extra["rows_dropped"] += 1
        log.info("%s", report)
        return kept_rows, report
