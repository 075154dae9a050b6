"""Teacher-score filtering: a given embedding model scores every (query, positive) pair and pairs
below a threshold are dropped.

score(q, p) = cos(E(q), E(p)) = E(q)·E(p) / (‖E(q)‖ ‖E(p)‖) with the teacher E, whether or not E
normalises its embeddings itself. C-Pack filters its weak pairs with
`shibing624/text2vec-base-chinese` at 0.43 (FlagEmbedding README, C-MTP unlabeled), a MEAN-pooled
model without normalisation; Conan-Embedding scores its pre-training pairs with
`BAAI/bge-large-zh-v1.5` (CLS pooling, normalised) and drops those below 0.4 (keeping about 89%).
Defaults: threshold 0.4.

A row with several positives keeps the positives that pass and is dropped when none does; the
report counts pairs (`kept`/`dropped`) and whole rows dropped (`rows_dropped`).

The teacher is a saved model folder (`model_path`; at paper scale a local copy of the teacher named
above) or, when none is given, the encoder the pipeline runs with. A folder embeds as the
checkpoint itself says: an embedkit folder (embedkit_encoder.json) through `load_encoder`; a
sentence-transformers folder (modules.json, as both teachers above ship) with its own Pooling module
(CLS or mean), Normalize, max_seq_length and do_lower_case (`load_sentence_transformers_encoder`),
so its scores are `SentenceTransformer(model_path)`'s cosines; a plain HF folder, which declares no
pooling, with `load_encoder`'s CLS. `pooling` ("cls" / "mean") replaces the checkpoint's pooling;
None keeps it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from embedkit.filters import FilterReport
from embedkit.data.instructions import instructed_query

log = logging.getLogger(__name__)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)


class TeacherScoreFilter:
    def __init__(self, threshold: float = 0.4, model_path: str | None = None,
                 pooling: str | None = None, query_instruction: str | None = None,
                 batch_size: int = 256, max_length: int | None = None, device: str = "cpu"):
        from embedkit.models.encoder import POOLINGS

        if not -1.0 <= threshold <= 1.0:
            raise ValueError(f"threshold is a cosine and must be in [-1, 1], got {threshold}")
        if pooling is not None and pooling not in POOLINGS:
            raise ValueError(f"filter pooling must be one of {POOLINGS} or null (the checkpoint's own), "
                             f"got {pooling!r}")
        if pooling is not None and not model_path:
            raise ValueError("filter pooling overrides the pooling of the teacher at model_path; with no "
                             "model_path the teacher is the pipeline's encoder, which pools as configured")
        self.threshold = threshold
        self.model_path = model_path
        self.pooling = pooling
        self.query_instruction = query_instruction or ""
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = device

    def load_teacher(self):
        """The encoder at `model_path`, and whether its texts are lower-cased first (a
        sentence-transformers `do_lower_case`)."""
        from embedkit.models.build import (load_encoder, load_sentence_transformers_encoder,
                                           sentence_transformers_settings)
        from embedkit.models.encoder import ENCODER_CONFIG

        path = Path(self.model_path)
        if not path.is_dir():
            raise FileNotFoundError(f"filter model_path {path} is not a local model folder; save the "
                                    f"teacher first (e.g. `hf download <name> --local-dir <folder>`)")
        # An embedkit folder also carries sentence-transformers files (export.py); its own record
        # says the same and also covers a projection head, which would be a Dense module there.
        settings = None if (path / ENCODER_CONFIG).exists() else sentence_transformers_settings(path)
        if settings is not None:
            encoder = load_sentence_transformers_encoder(path, device=self.device, pooling=self.pooling)
            lowercase = settings["do_lower_case"]
        else:
            encoder = load_encoder(path, device=self.device)
            if self.pooling is not None:
                encoder.pooling = self.pooling
            lowercase = False
        log.info("teacher %s: %s pooling, max length %d%s", path, encoder.pooling, encoder.max_length,
                 ", lower-cased" if lowercase else "")
        return encoder, lowercase

    def scores(self, rows: Sequence[dict], encoder, lowercase: bool = False) -> list[np.ndarray]:
        """Per row, the cosine of its query with each of its positives."""
        def prepared(texts):
            return [t.lower() for t in texts] if lowercase else list(texts)

        queries = encoder.encode(prepared(instructed_query(r, self.query_instruction) for r in rows),
                                 batch_size=self.batch_size, max_length=self.max_length)
        passages = [p for r in rows for p in r["pos"]]
        pvecs = encoder.encode(prepared(passages), batch_size=self.batch_size, max_length=self.max_length)
        queries, pvecs = _unit_rows(queries), _unit_rows(pvecs)
        out, at = [], 0
        for q, r in zip(queries, rows):
            out.append(pvecs[at:at + len(r["pos"])] @ q)
            at += len(r["pos"])
        return out

    def __call__(self, rows: Sequence[dict], encoder=None) -> tuple[list[dict], FilterReport]:
        lowercase = False
        if self.model_path:
            encoder, lowercase = self.load_teacher()
        if encoder is None:
            raise ValueError("TeacherScoreFilter needs a teacher: set model_path or pass an encoder")
        report = FilterReport("teacher_score", extra={"threshold": self.threshold, "rows_dropped": 0})
        kept_rows = []
        for row, s in zip(rows, self.scores(rows, encoder, lowercase)):
            keep = s >= self.threshold
            report.kept += int(keep.sum())
            report.dropped += int((~keep).sum())
            if keep.any():
                kept_rows.append({**row, "pos": [p for p, k in zip(row["pos"], keep) if k]})
            else:
                report.extra["rows_dropped"] += 1
        log.info("%s", report)
        return kept_rows, report
