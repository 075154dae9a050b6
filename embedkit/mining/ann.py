"""ANN hard-negative mining: FlagEmbedding's `hn_mine.py` procedure on faiss, with counts.

For every row {query, pos, neg} the query is embedded (with the retrieval instruction, as
FlagEmbedding's `encode_queries`) and searched against the candidate pool (by default the
de-duplicated union of every `pos` and `neg` text of the input, FlagEmbedding's default) with the
inner product of L2-normalised embeddings, i.e. cosine. Then, per row:

1. take the retrieved list as the slice [a:b] of `range_for_sampling = "a-b"` (0-based ranks:
   "10-210" is ranks 11..210 in 1-based terms, FlagEmbedding's code default; "2-200" is its
   documented example);
2. drop candidates equal to the query or to any positive (compared stripped), and, when
   `near_dup_threshold` is set, those whose score reaches it (likely false negatives);
3. sample `negative_number` of the survivors uniformly (default 15, FlagEmbedding's);
4. fill any shortfall with random pool texts that are not the query, a positive or already chosen
   (FlagEmbedding's back-fill may repeat a negative; this one does not).

The input's `neg` is replaced, as in FlagEmbedding. The report counts negatives taken from the
ranking (`mined`), candidates removed in step 2 (`dropped`) and random fills (`filled`).

`keep_candidates = K` also stores each row's clean ranking (query and positives removed, rank 0
first) as `candidates`, K texts long: the precomputed rankings the dynamic miner
(embedkit/mining/dynamic.py) draws replacement windows from.

Search: `faiss.IndexFlatIP` (exact, FlagEmbedding's) or `index="ivf"` (`IndexIVFFlat` with inner
product, `nlist` cells, `nprobe` probed) for large pools. With CUDA and a faiss GPU build the index
is cloned to all GPUs (`use_gpu="auto"`); otherwise it stays on the CPU.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np

from embedkit.data.instructions import instructed_query

log = logging.getLogger(__name__)

INDEX_KINDS = ("flat", "ivf")


def parse_range(spec) -> tuple[int, int]:
    """`"10-210"`, `[10, 210]` or `(10, 210)` -> (10, 210), checked."""
    if isinstance(spec, str):
        parts = spec.split("-")
        if len(parts) != 2:
            raise ValueError(f"range_for_sampling must look like 'a-b' (e.g. '10-210'), got {spec!r}")
        try:
            start, stop = int(parts[0]), int(parts[1])
        except ValueError:
            raise ValueError(f"range_for_sampling must be two integers 'a-b', got {spec!r}") from None
    else:
        start, stop = (int(x) for x in spec)
    if not 0 <= start < stop:
        raise ValueError(f"range_for_sampling needs 0 <= a < b, got {start}-{stop}")
    return start, stop


def _gpu_wanted(use_gpu) -> bool:
    import faiss

    if use_gpu is False or use_gpu is None:
        return False
    available = hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
    if use_gpu == "auto":
        return available
    if not available:
        raise RuntimeError("use_gpu=true, but this faiss build sees no GPU (faiss-cpu, or no CUDA)")
    return True


def build_index(vectors: np.ndarray, index: str = "flat", nlist: int | None = None,
                nprobe: int = 16, use_gpu="auto", seed: int = 0):
    """An inner-product faiss index over `vectors` (float32, L2-normalised for cosine)."""
    import faiss

    if index not in INDEX_KINDS:
        raise ValueError(f"index must be one of {INDEX_KINDS}, got {index!r}")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    if index == "flat":
        ix = faiss.IndexFlatIP(dim)
    else:
        # faiss warns below ~39 training points per cell; 4·sqrt(n) is its usual starting point.
        cells = nlist or max(1, int(4 * math.sqrt(n)))
        cells = max(1, min(cells, n // 39 or 1))
        quantizer = faiss.IndexFlatIP(dim)
        ix = faiss.IndexIVFFlat(quantizer, dim, cells, faiss.METRIC_INNER_PRODUCT)
        ix.cp.seed = seed
        ix.train(vectors)
        ix.nprobe = min(nprobe, cells)
    if _gpu_wanted(use_gpu):
        ix = faiss.index_cpu_to_all_gpus(ix)
    ix.add(vectors)
    return ix


def search(ix, queries: np.ndarray, k: int, batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, ids) per query; ids of −1 mark empty slots (an IVF probe may find fewer)."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = min(k, ix.ntotal)
    scores = np.empty((len(queries), k), dtype=np.float32)
    ids = np.empty((len(queries), k), dtype=np.int64)
    for s in range(0, len(queries), batch_size):
        scores[s:s + batch_size], ids[s:s + batch_size] = ix.search(queries[s:s + batch_size], k)
    return scores, ids


@dataclass
class MiningReport:
    rows: int = 0
    mined: int = 0          # negatives taken from the ranked slice
    dropped: int = 0        # candidates in the slice removed: the query, a positive, a near-duplicate
    dropped_near_dup: int = 0
    filled: int = 0         # negatives filled with random pool texts
    short_rows: int = 0     # rows that needed any fill
    pool: int = 0
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        out = asdict(self)
        out.update(out.pop("extra"))
        return out

    def __str__(self) -> str:
        return (f"mined {self.mined} negatives for {self.rows} rows from a pool of {self.pool}; "
                f"dropped {self.dropped} candidates (query/positive, {self.dropped_near_dup} near-"
                f"duplicates); filled {self.filled} with random texts ({self.short_rows} rows short)")


def candidate_pool(rows: Sequence[dict]) -> list[str]:
    """FlagEmbedding's default pool: every pos and neg text of the input, de-duplicated in order."""
    return list(dict.fromkeys(t for r in rows for t in (*r["pos"], *r.get("neg", ()))))


def mine_from_embeddings(rows: Sequence[dict], query_vecs: np.ndarray, pool: Sequence[str],
                         pool_vecs: np.ndarray, range_for_sampling="10-210",
                         negative_number: int = 15, near_dup_threshold: float | None = None,
                         keep_candidates: int = 0, index: str = "flat", nlist: int | None = None,
                         nprobe: int = 16, use_gpu="auto", seed: int = 0
                         ) -> tuple[list[dict], MiningReport]:
    """The mining rule on given embeddings (row i's query is `query_vecs[i]`); returns new rows."""
    start, stop = parse_range(range_for_sampling)
    if negative_number < 0:
        raise ValueError(f"negative_number must be >= 0, got {negative_number}")
    if len(query_vecs) != len(rows) or len(pool_vecs) != len(pool):
        raise ValueError(f"{len(rows)} rows / {len(query_vecs)} query vectors, {len(pool)} pool "
                         f"texts / {len(pool_vecs)} pool vectors: the counts must match")
    max_pos = max((len(r["pos"]) for r in rows), default=0)
    ix = build_index(pool_vecs, index=index, nlist=nlist, nprobe=nprobe, use_gpu=use_gpu, seed=seed)
    # +1 (the query itself) + max_pos: the clean ranking keeps K entries after both are removed.
    k = max(stop, keep_candidates + max_pos + 1)
    scores, ids = search(ix, query_vecs, k)
    rng = np.random.default_rng(seed)
    stripped_pool = [t.strip() for t in pool]
    report = MiningReport(rows=len(rows), pool=len(pool))
    out = []
    for row, row_scores, row_ids in zip(rows, scores, ids):
        forbidden = {row["query"].strip(), *(p.strip() for p in row["pos"])}
        window = []
        for rank, (s, j) in enumerate(zip(row_scores, row_ids)):
            if j < 0 or rank >= stop:
                break
            if rank < start:
                continue
            if stripped_pool[j] in forbidden:
                report.dropped += 1
            elif near_dup_threshold is not None and s >= near_dup_threshold:
                report.dropped += 1
                report.dropped_near_dup += 1
            else:
                window.append(int(j))
        take = window if len(window) <= negative_number else \
            [window[i] for i in sorted(rng.choice(len(window), negative_number, replace=False))]
        report.mined += len(take)
        chosen = set(take)
        missing = negative_number - len(take)
        if missing:
            report.short_rows += 1
            eligible = [j for j in range(len(pool)) if stripped_pool[j] not in forbidden and j not in chosen]
            fill = rng.choice(len(eligible), min(missing, len(eligible)), replace=False) if eligible else []
            take += [eligible[i] for i in fill]
            report.filled += len(fill)
        new = {**row, "neg": [pool[j] for j in take]}
        if keep_candidates:
            new["candidates"] = [pool[j] for j in row_ids
                                 if j >= 0 and stripped_pool[j] not in forbidden][:keep_candidates]
        out.append(new)
    return out, report


class HardNegativeMiner:
    """Embeds with an encoder (`encode(texts, batch_size=, max_length=)`, e.g. embedkit's
    TextEncoder) and mines with `mine_from_embeddings`; Hydra builds it from conf/mine.yaml."""

    def __init__(self, range_for_sampling="10-210", negative_number: int = 15,
                 query_instruction: str | None = None, near_dup_threshold: float | None = None,
                 keep_candidates: int = 0, index: str = "flat", nlist: int | None = None,
                 nprobe: int = 16, use_gpu="auto", batch_size: int = 256,
                 query_max_len: int | None = None, passage_max_len: int | None = None,
                 seed: int = 0):
        parse_range(range_for_sampling)   # fail at configuration time, not after embedding
        if index not in INDEX_KINDS:
            raise ValueError(f"index must be one of {INDEX_KINDS}, got {index!r}")
        self.settings = dict(range_for_sampling=range_for_sampling, negative_number=negative_number,
                             near_dup_threshold=near_dup_threshold, keep_candidates=keep_candidates,
                             index=index, nlist=nlist, nprobe=nprobe, use_gpu=use_gpu, seed=seed)
        self.query_instruction = query_instruction or ""
        self.batch_size = batch_size
        self.query_max_len = query_max_len
        self.passage_max_len = passage_max_len

    def __call__(self, rows: Sequence[dict], encoder, pool: Sequence[str] | None = None,
                 encode: Callable | None = None) -> tuple[list[dict], MiningReport]:
        rows = list(rows)
        pool = list(dict.fromkeys(pool)) if pool is not None else candidate_pool(rows)
        enc = encode or encoder.encode
        query_vecs = enc([instructed_query(r, self.query_instruction) for r in rows],
                         batch_size=self.batch_size, max_length=self.query_max_len)
        pool_vecs = enc(pool, batch_size=self.batch_size, max_length=self.passage_max_len)
        out, report = mine_from_embeddings(rows, query_vecs, pool, pool_vecs, **self.settings)
        log.info("hard-negative mining: %s", report)
        return out, report
