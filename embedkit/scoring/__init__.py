"""Teacher scores for knowledge distillation: `pos_scores` / `neg_scores` added to a training jsonl.

FlagEmbedding distils a student from teacher scores stored in the training rows themselves,
`{"query", "pos", "neg", "pos_scores", "neg_scores"}` with `pos_scores[i]` the teacher's score of
(query, pos[i]) (FE:examples/finetune/embedder/README.md "Teacher Scores"; the M3 data format,
FE:research/old-examples/unified_finetune/README.md). `score_file` writes the same rows with those
two fields, from one of two teachers:

- `CrossEncoderTeacher`: a reranker through sentence-transformers' `CrossEncoder`, as
  FE:scripts/add_reranker_score.py scores every (query, pos) and (query, neg) pair. Its defaults:
  raw logits (`normalize=False`; `activation="sigmoid"` is its `normalize=True`), pairs cut at 512
  tokens (`reranker_max_length`), no query instruction (`query_instruction_for_rerank=None`; the
  row's `prompt` is an embedding instruction and is not read, as there). The teacher FlagEmbedding's
  README runs that script with is BAAI/bge-reranker-v2-m3, and the maintainers advise distilling
  from its scores (FlagEmbedding #949, #832); BAAI/bge-reranker-large is the earlier (BGE v1.5-era)
  Chinese/English cross-encoder. BGE-M3's own fine-tuning (paper §3.3) distils from its
  self-ensemble s_inter instead, which needs no stored scores.
- `EmbeddingTeacher`: an embedding model, loaded as the teacher-score filter loads one
  (embedkit/filters/teacher.py: an embedkit folder with its pooling, or a sentence-transformers
  folder with its own Pooling, Normalize, max_seq_length and lower-casing), and

      score(q, p) = E(q)·E(p) / (‖E(q)‖ ‖E(p)‖)

  the dot product of the L2-normalised embeddings that BGE trains and scores with (C-Pack §4).
  Queries get the row's `prompt`, else `query_instruction`, in front (embedkit/data/instructions.py,
  as training reads the row); passages get none.

Scores are cosines in [-1, 1] for an embedding teacher and logits for a reranker: FlagEmbedding's
KD losses softmax them without a temperature, so the two give very different targets.

The input is read with `embedkit.data.readers.iter_retrieval_jsonl`, whole, before any pair is
scored: a bad row stops the command at once with `file:line: reason` instead of after hours of
scoring. Rows are then scored in chunks and written through `embedkit.atomic_files.write_atomic`,
so a killed run leaves no half-written output. Other fields pass through; existing `pos_scores` /
`neg_scores` are replaced.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Iterable, Iterator, Protocol, Sequence

import numpy as np

from embedkit.data.instructions import instructed_query
from embedkit.data.readers import iter_retrieval_jsonl

log = logging.getLogger(__name__)

TEACHERS = ("cross-encoder", "embedding")
ACTIVATIONS = ("none", "sigmoid")
#: FE:scripts/add_reranker_score.py `reranker_max_length`.
RERANKER_MAX_LENGTH = 512
#: Rows scored per chunk: enough pairs for the teachers' length-sorted batching to pad little,
#: few enough that the texts of one chunk never dominate memory on a large file.
CHUNK_ROWS = 1024


class Teacher(Protocol):
    def score_rows(self, rows: Sequence[dict]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per row, (its positives' scores, its negatives' scores)."""


def _device(device: str | None) -> str:
    if device in (None, "", "auto"):
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _split(rows: Sequence[dict], flat: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Flat scores in row order (each row's pos, then its neg) back into per-row pairs."""
    out, at = [], 0
    for row in rows:
        n_pos, n_neg = len(row["pos"]), len(row["neg"])
        out.append((flat[at:at + n_pos], flat[at + n_pos:at + n_pos + n_neg]))
        at += n_pos + n_neg
    if at != len(flat):
        raise RuntimeError(f"the teacher returned {len(flat)} scores for {at} pairs")
    return out


class CrossEncoderTeacher:
    """s(q, p) = the reranker's logit on the pair "q [SEP] p" (sigmoid of it with
    `activation="sigmoid"`), through `sentence_transformers.CrossEncoder`."""

    def __init__(self, model_path: str, batch_size: int = 256, max_length: int | None = None,
                 query_instruction: str | None = None, device: str | None = None,
                 activation: str = "none", show_progress: bool = False):
        import torch
        from sentence_transformers import CrossEncoder

        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.batch_size = batch_size
        self.query_instruction = query_instruction or ""
        self.show_progress = show_progress
        # CrossEncoder's own default for one label is a sigmoid; FlagEmbedding stores raw logits.
        self.model = CrossEncoder(
            str(model_path), device=_device(device), max_length=max_length or RERANKER_MAX_LENGTH,
            activation_fn=torch.nn.Sigmoid() if activation == "sigmoid" else torch.nn.Identity())
        if self.model.num_labels != 1:
            raise ValueError(f"{model_path}: a teacher reranker gives one score per pair, this one has "
                             f"num_labels={self.model.num_labels}")

    def score_rows(self, rows: Sequence[dict]) -> list[tuple[np.ndarray, np.ndarray]]:
        pairs = [(self.query_instruction + row["query"], p)
                 for row in rows for p in (*row["pos"], *row["neg"])]
        flat = self.model.predict(pairs, batch_size=self.batch_size,
                                  show_progress_bar=self.show_progress, convert_to_numpy=True)
        return _split(rows, np.asarray(flat, dtype=np.float64).reshape(-1))


class EmbeddingTeacher:
    """s(q, p) = cos(E(q), E(p)) with the encoder at `model_path` (see the module docstring)."""

    def __init__(self, model_path: str, batch_size: int = 256, max_length: int | None = None,
                 query_instruction: str | None = None, device: str | None = None,
                 pooling: str | None = None, show_progress: bool = False):
        from embedkit.filters.teacher import TeacherScoreFilter

        # The filter's loader reads a folder exactly as the teacher-score filter scores with it.
        self.encoder, self.lowercase = TeacherScoreFilter(
            model_path=str(model_path), pooling=pooling, device=_device(device)).load_teacher()
        self.batch_size = batch_size
        self.max_length = max_length
        self.query_instruction = query_instruction or ""
        self.show_progress = show_progress

    def _embed(self, texts: list[str], desc: str) -> dict[str, np.ndarray]:
        """{text: unit vector}, each distinct text embedded once."""
        distinct = list(dict.fromkeys(texts))
        vecs = self.encoder.encode([t.lower() for t in distinct] if self.lowercase else distinct,
                                   batch_size=self.batch_size, max_length=self.max_length,
                                   show_progress=self.show_progress, desc=desc).astype(np.float64)
        vecs /= np.clip(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12, None)
        return dict(zip(distinct, vecs))

    def score_rows(self, rows: Sequence[dict]) -> list[tuple[np.ndarray, np.ndarray]]:
        queries = [instructed_query(row, self.query_instruction) for row in rows]
        q = self._embed(queries, "queries")
        p = self._embed([t for row in rows for t in (*row["pos"], *row["neg"])], "passages")
        flat = np.array([q[query] @ p[t] for query, row in zip(queries, rows)
                         for t in (*row["pos"], *row["neg"])], dtype=np.float64)
        return _split(rows, flat)


def build_teacher(kind: str, model_path: str, **kwargs) -> Teacher:
    """`kind` is "cross-encoder" or "embedding"; kwargs go to its class (`activation` only to the
    cross-encoder, `pooling` only to the embedding teacher; None values are left out)."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if kind == "cross-encoder":
        if "pooling" in kwargs:
            raise ValueError("--pooling applies to an embedding teacher; a cross-encoder scores the pair")
        return CrossEncoderTeacher(model_path, **kwargs)
    if kind == "embedding":
        if kwargs.pop("activation", "none") != "none":
            raise ValueError("--activation applies to a cross-encoder; an embedding teacher scores cosines")
        return EmbeddingTeacher(model_path, **kwargs)
    raise ValueError(f"teacher must be one of {TEACHERS}, got {kind!r}")


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def score_file(input_path: str | os.PathLike, output_path: str | os.PathLike, teacher: Teacher,
               show_progress: bool = True, chunk_rows: int = CHUNK_ROWS) -> int:
    """Write `input_path`'s rows with the teacher's `pos_scores` and `neg_scores` to `output_path`
    (atomically); returns the number of rows. `output_path` may be `input_path`."""
    from tqdm.auto import tqdm

    from embedkit.atomic_files import write_atomic

    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
    n_rows = sum(1 for _ in iter_retrieval_jsonl(input_path))   # every row checked before any scoring
    path = os.fspath(input_path)

    def write(fh) -> None:
        with tqdm(total=n_rows, desc="teacher scores", unit="row", disable=not show_progress) as bar:
            for chunk in _chunks(iter_retrieval_jsonl(input_path), chunk_rows):
                rows = [row for _, row in chunk]
                for (line, row), (pos, neg) in zip(chunk, teacher.score_rows(rows)):
                    for key, scores in (("pos_scores", pos), ("neg_scores", neg)):
                        values = [float(s) for s in scores]
                        bad = [i for i, s in enumerate(values) if not math.isfinite(s)]
                        if bad:
                            field = key.split("_")[0]
                            raise ValueError(f"{path}:{line}: the teacher scored {field}[{bad[0]}] "
                                             f"{values[bad[0]]} (a non-finite score; fp16 overflow?)")
                        row[key] = values
                    fh.write(json.dumps(row, ensure_ascii=False))
                    fh.write("\n")
                bar.update(len(chunk))

    write_atomic(Path(output_path), write)
    log.info("wrote %d scored rows to %s", n_rows, output_path)
    return n_rows
