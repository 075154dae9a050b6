"""BGE-M3's retrieval modes as mteb search models, so that mteb's own metrics score them.

mteb 2.x lets a model do its own search on retrieval tasks (`mteb.models.SearchProtocol`: `index`
the corpus, then `search` the queries, honouring `top_ranked` on re-ranking tasks), as its BM25
baseline does. `M3Search` implements that protocol for one weighting of M3's three scores,

    s_rank = w1·s_dense + w2·s_lex + w3·s_mul        (FlagEmbedding docs, bge_m3.rst)

e.g. (0, 1, 0) for sparse only, (1, 0.3, 0) for dense+sparse and (1, 0.3, 1) for all three
(FlagEmbedding's MKQA scripts and the paper's MIRACL / MKQA runs; embedkit/objectives/m3.py
WEIGHT_PRESETS).
FlagEmbedding's `compute_score` also divides by w1 + w2 + w3, which does not change a ranking, so
it is left out. Search is exhaustive: every query is scored against the whole corpus with every
weighted head (FlagEmbedding's MKQA/MLDR scripts instead re-score a dense top-k with multi-vector,
because multi-vector is too costly for first-stage retrieval on large corpora; the mini C-MTEB
corpora are small). On a re-ranking task only the query's `top_ranked` candidates are scored.

`M3Representer` runs the encoder and heads once per distinct text and keeps, per text, the dense
vector, the {token id: weight} lexical vector (max over repeats, specials dropped) and the
multi-vector matrix (CLS and padding dropped), as FlagEmbedding's inference does. Several
`M3Search` models (one per weighting) share a representer, which also caches the component score
matrices, so the modes of one model encode every text and compute every score matrix once.

Query instruction: as `MtebEncoder` (BGE's C-MTEB rule), `query_instruction` is prepended to
retrieval and re-ranking queries only; documents never get it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from embedkit.models.m3_heads import M3Heads, dense_from_hidden, multivec_scores

if TYPE_CHECKING:
    from embedkit.models.encoder import TextEncoder

log = logging.getLogger(__name__)

INSTRUCTION_TASK_TYPES = frozenset({"Retrieval", "Reranking"})
COMPONENTS = ("dense", "sparse", "multivec")
# cache a component's (queries x corpus) matrix only when it is at most this many floats
_CACHE_LIMIT = 25_000_000


@dataclass
class TextReps:
    """One text as M3 sees it at inference."""

    dense: np.ndarray                  # (D,)
    sparse_ids: np.ndarray | None      # (k,) distinct token ids with weight > 0
    sparse_weights: np.ndarray | None  # (k,) their (max) weights
    colbert: np.ndarray | None         # (n, d) unit vectors of tokens 1..n (CLS, padding dropped)


class M3Representer:
    """Encoder + M3 heads → `TextReps`, cached per text (the model is frozen during evaluation)."""

    def __init__(self, encoder: TextEncoder, heads: M3Heads, batch_size: int = 64,
                 max_length: int | None = None):
        self.encoder = encoder
        self.heads = heads
        self.batch_size = batch_size
        self.max_length = max_length
        self.cache: dict[str, TextReps] = {}
        self.score_cache: dict[tuple, np.ndarray] = {}

    @property
    def tokenizer(self):
        return self.encoder.tokenizer

    @torch.no_grad()
    def _encode_batch(self, texts: list[str]) -> list[TextReps]:
        device = next(self.encoder.parameters()).device
        tok = self.tokenizer(texts, padding=True, truncation=True,
                             max_length=self.max_length or self.encoder.max_length,
                             return_tensors="pt")
        ids, mask = tok["input_ids"].to(device), tok["attention_mask"].to(device)
        hidden = self.encoder.hidden_states(ids, mask)
        dense = dense_from_hidden(self.encoder, hidden, mask).float().cpu().numpy()
        weights = (self.heads.token_weights(hidden, ids, mask).float().cpu()
                   if self.heads.has_sparse else None)
        if self.heads.has_multivec:
            vecs, vmask = self.heads.colbert_vectors(hidden, mask)
            vecs, vmask = vecs.float().cpu(), vmask.bool().cpu()
        out = []
        ids_cpu = ids.cpu()
        for r in range(len(texts)):
            sp_ids = sp_w = col = None
            if weights is not None:
                keep = weights[r] > 0
                uniq, inverse = torch.unique(ids_cpu[r][keep], return_inverse=True)
                best = torch.zeros(len(uniq)).scatter_reduce(0, inverse, weights[r][keep], "amax")
                sp_ids, sp_w = uniq.numpy().astype(np.int64), best.numpy().astype(np.float32)
            if self.heads.has_multivec:
                col = vecs[r][vmask[r]].numpy()
            out.append(TextReps(dense[r], sp_ids, sp_w, col))
        return out

    def encode(self, texts: Sequence[str], batch_size: int | None = None,
               show_progress: bool = False, desc: str = "m3 encode") -> list[TextReps]:
        """Representations of `texts` in order; each distinct text is encoded once, ever."""
        texts = list(texts)
        missing = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if missing:
            was_training = (self.encoder.training, self.heads.training)
            self.encoder.eval()
            self.heads.eval()
            size = batch_size or self.batch_size
            order = sorted(missing, key=len, reverse=True)  # less padding
            starts = range(0, len(order), size)
            if show_progress:
                from tqdm.auto import tqdm

                starts = tqdm(starts, desc=desc, leave=False)
            try:
                for start in starts:
                    chunk = order[start:start + size]
                    for text, reps in zip(chunk, self._encode_batch(chunk)):
                        self.cache[text] = reps
            finally:
                self.encoder.train(was_training[0])
                self.heads.train(was_training[1])
        return [self.cache[t] for t in texts]

    def sparse_weights(self, texts: Sequence[str]) -> list[dict[str, float]]:
        """{token string: weight} per text, weights > 0 only, largest first."""
        if not self.heads.has_sparse:
            raise RuntimeError("these M3 heads have no sparse head")
        out = []
        for reps in self.encode(texts):
            tokens = self.tokenizer.convert_ids_to_tokens(reps.sparse_ids.tolist())
            pairs = sorted(zip(tokens, reps.sparse_weights.tolist()), key=lambda x: -x[1])
            out.append({t: round(float(w), 6) for t, w in pairs})
        return out

    # ------------------------------------------------------------------ scores

    def component_scores(self, component: str, queries: Sequence[TextReps],
                         docs: Sequence[TextReps], cache_key: tuple | None = None) -> np.ndarray:
        """(len(queries), len(docs)) raw scores of one head (τ = 1, as at inference)."""
        key = None if cache_key is None else (*cache_key, component)
        if key is not None and key in self.score_cache:
            return self.score_cache[key]
        if component == "dense":
            scores = np.stack([q.dense for q in queries]) @ np.stack([d.dense for d in docs]).T
        elif component == "sparse":
            scores = _sparse_matrix(queries, docs)
        elif component == "multivec":
            scores = _multivec_matrix(queries, docs)
        else:
            raise ValueError(f"unknown component {component!r}; choose from {COMPONENTS}")
        scores = np.asarray(scores, dtype=np.float32)
        if key is not None and scores.size <= _CACHE_LIMIT:
            self.score_cache[key] = scores
        return scores


def _sparse_matrix(queries: Sequence[TextReps], docs: Sequence[TextReps]) -> np.ndarray:
    from scipy.sparse import csr_matrix

    if any(r.sparse_ids is None for r in (*queries, *docs)):
        raise RuntimeError("sparse scores need the sparse head")
    size = 1 + max((int(r.sparse_ids.max()) for r in (*queries, *docs) if len(r.sparse_ids)), default=0)

    def matrix(rows):
        indptr = np.cumsum([0] + [len(r.sparse_ids) for r in rows])
        ids = np.concatenate([r.sparse_ids for r in rows]) if rows else np.zeros(0, np.int64)
        w = np.concatenate([r.sparse_weights for r in rows]) if rows else np.zeros(0, np.float32)
        return csr_matrix((w, ids, indptr), shape=(len(rows), size))

    return (matrix(queries) @ matrix(docs).T).toarray()


def _padded(rows: Sequence[TextReps]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max(len(r.colbert) for r in rows))
    dim = rows[0].colbert.shape[1]
    vecs = torch.zeros(len(rows), width, dim)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        vecs[i, :len(r.colbert)] = torch.from_numpy(r.colbert)
        mask[i, :len(r.colbert)] = True
    return vecs, mask


def _multivec_matrix(queries: Sequence[TextReps], docs: Sequence[TextReps],
                     budget: int = 8_000_000) -> np.ndarray:
    """Exhaustive late interaction, in query x document chunks of about `budget` token pairs."""
    if any(r.colbert is None for r in (*queries, *docs)):
        raise RuntimeError("multi-vector scores need the multi-vector head")
    out = np.zeros((len(queries), len(docs)), dtype=np.float32)
    if not len(queries) or not len(docs):
        return out
    # sort by length so chunks pad little; scatter back at the end
    q_order = np.argsort([-len(r.colbert) for r in queries], kind="stable")
    d_order = np.argsort([-len(r.colbert) for r in docs], kind="stable")
    q_len = max(1, len(queries[q_order[0]].colbert))
    d_len = max(1, len(docs[d_order[0]].colbert))
    q_step = max(1, min(len(queries), 64))
    d_step = max(1, budget // (q_step * q_len * d_len))
    for qs in range(0, len(queries), q_step):
        q_idx = q_order[qs:qs + q_step]
        q_vecs, q_mask = _padded([queries[i] for i in q_idx])
        for ds in range(0, len(docs), d_step):
            d_idx = d_order[ds:ds + d_step]
            d_vecs, d_mask = _padded([docs[i] for i in d_idx])
            block = multivec_scores(q_vecs, q_mask, d_vecs, d_mask).numpy()
            out[np.ix_(q_idx, d_idx)] = block
    return out


def _digest(items: Sequence[str]) -> str:
    h = hashlib.sha1()
    for item in items:
        h.update(str(item).encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def corpus_texts(corpus) -> list[str]:
    """A document's text as mteb's dataloader builds it: "title text", stripped."""
    titles = corpus["title"] if "title" in corpus.column_names else [None] * len(corpus)
    return [(f"{title} {text}" if title else text).strip() for title, text in zip(titles, corpus["text"])]


def query_texts(queries, prefix: str = "") -> list[str]:
    """A query's text as mteb reads it (its own instruction column appended), after `prefix`."""
    texts = list(queries["text"])
    if "instruction" in queries.column_names:
        texts = [t + " " + i if i is not None else t for t, i in zip(texts, queries["instruction"])]
    return [prefix + t for t in texts]


class M3Search:
    """An mteb `SearchProtocol` model scoring with w1·dense + w2·sparse + w3·multi-vector."""

    def __init__(self, representer: M3Representer, weights: Sequence[float], model_name: str,
                 revision: str, query_instruction: str | None = None,
                 sparse_examples_path: str | Path | None = None, n_examples: int = 5):
        weights = tuple(float(w) for w in weights)
        if len(weights) != 3 or not any(weights):
            raise ValueError(f"weights are (dense, sparse, multivec), not all zero; got {weights}")
        if not revision or not str(revision).strip():
            raise ValueError("revision must be a non-empty string that identifies this run")
        self.representer = representer
        self.weights = dict(zip(COMPONENTS, weights))
        self.query_instruction = query_instruction or None
        self.sparse_examples_path = Path(sparse_examples_path) if sparse_examples_path else None
        self.n_examples = n_examples
        self._doc_ids: list[str] = []
        self._doc_texts: list[str] = []
        self._doc_reps: list[TextReps] = []
        self._meta = self._build_meta(model_name, str(revision))

    # ------------------------------------------------------------------ mteb metadata

    def _build_meta(self, model_name: str, revision: str):
        from mteb.models.model_meta import ModelMeta, ScoringFunction

        used = [c for c in COMPONENTS if self.weights[c]]
        if used == ["sparse"]:
            kind, similarity = "sparse", ScoringFunction.DOT_PRODUCT
        elif used == ["multivec"]:
            kind, similarity = "late-interaction", ScoringFunction.MAX_SIM
        elif used == ["dense"]:
            kind, similarity = "dense", ScoringFunction.COSINE
        else:
            kind, similarity = "hybrid", ScoringFunction.CUSTOM
        n_params = sum(p.numel() for p in self.representer.encoder.parameters()) + \
            sum(p.numel() for p in self.representer.heads.parameters())
        return ModelMeta(
            loader=None,
            name=model_name if "/" in model_name else f"embedkit/{model_name}",
            revision=revision,
            release_date=None,
            languages=None,
            n_parameters=int(n_params),
            memory_usage_mb=None,
            max_tokens=None,
            embed_dim=None,
            license=None,
            open_weights=None,
            public_training_code=None,
            public_training_data=None,
            framework=["PyTorch"],
            similarity_fn_name=similarity,
            use_instructions=self.query_instruction is not None,
            training_datasets=None,
            model_type=[kind],
        )

    @property
    def mteb_model_meta(self):
        return self._meta

    # ------------------------------------------------------------------ SearchProtocol

    def index(self, corpus, *, task_metadata, hf_split: str, hf_subset: str,
              encode_kwargs: dict, num_proc: int | None = None, **kwargs: Any) -> None:
        self._doc_ids = [str(i) for i in corpus["id"]]
        self._doc_texts = corpus_texts(corpus)
        self._doc_reps = self.representer.encode(
            self._doc_texts, batch_size=encode_kwargs.get("batch_size"),
            show_progress=bool(encode_kwargs.get("show_progress_bar", False)),
            desc=f"{task_metadata.name} documents")
        self._corpus_key = (task_metadata.name, hf_subset, hf_split, _digest(self._doc_ids))
        self._dump_examples(task_metadata.name, "documents", self._doc_texts)

    def search(self, queries, *, task_metadata, hf_split: str, hf_subset: str, top_k: int,
               encode_kwargs: dict, top_ranked: dict[str, list[str]] | None = None,
               num_proc: int | None = None, **kwargs: Any) -> dict[str, dict[str, float]]:
        if not self._doc_reps and self._doc_ids:
            raise ValueError("call index() before search()")
        prefix = (self.query_instruction or "") if task_metadata.type in INSTRUCTION_TASK_TYPES else ""
        qids = [str(i) for i in queries["id"]]
        texts = query_texts(queries, prefix)
        q_reps = self.representer.encode(
            texts, batch_size=encode_kwargs.get("batch_size"),
            show_progress=bool(encode_kwargs.get("show_progress_bar", False)),
            desc=f"{task_metadata.name} queries")
        self._dump_examples(task_metadata.name, "queries", texts)
        if top_ranked is None:
            return self._full_search(qids, texts, q_reps, top_k)
        return self._rerank(qids, q_reps, top_ranked, top_k)

    # ------------------------------------------------------------------ scoring

    def score(self, q_reps: Sequence[TextReps], d_reps: Sequence[TextReps],
              cache_key: tuple | None = None) -> np.ndarray:
        """(queries, docs) weighted sum of the used components."""
        total = np.zeros((len(q_reps), len(d_reps)), dtype=np.float32)
        for component, w in self.weights.items():
            if w:
                total += w * self.representer.component_scores(component, q_reps, d_reps, cache_key)
        return total

    def _full_search(self, qids, texts, q_reps, top_k) -> dict[str, dict[str, float]]:
        results: dict[str, dict[str, float]] = {qid: {} for qid in qids}
        if not self._doc_ids:
            return results
        k = min(top_k, len(self._doc_ids))
        key = (*self._corpus_key, "full", _digest(texts))
        scores = self.score(q_reps, self._doc_reps, key)
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < scores.shape[1] else \
            np.tile(np.arange(scores.shape[1]), (len(qids), 1))
        for row, qid in enumerate(qids):
            results[qid] = {self._doc_ids[j]: float(scores[row, j]) for j in top[row]}
        return results

    def _rerank(self, qids, q_reps, top_ranked, top_k) -> dict[str, dict[str, float]]:
        position = {doc_id: i for i, doc_id in enumerate(self._doc_ids)}
        results: dict[str, dict[str, float]] = {qid: {} for qid in qids}
        for qid, reps in zip(qids, q_reps):
            candidates = [str(d) for d in (top_ranked.get(qid) or [])]
            if not candidates:
                if qid not in top_ranked:
                    log.warning("no pre-ranked documents for query %s", qid)
                continue
            docs = [self._doc_reps[position[d]] for d in candidates]
            key = (*self._corpus_key, "rerank", qid, _digest(candidates))
            scores = self.score([reps], docs, key)[0]
            best = np.argsort(-scores, kind="stable")[:min(top_k, len(candidates))]
            results[qid] = {candidates[j]: float(scores[j]) for j in best}
        return results

    # ------------------------------------------------------------------ inspection

    def sparse_weights(self, texts: Sequence[str]) -> list[dict[str, float]]:
        return self.representer.sparse_weights(texts)

    def _dump_examples(self, task: str, kind: str, texts: list[str]) -> None:
        if self.sparse_examples_path is None or not self.representer.heads.has_sparse:
            return
        chosen = texts[:self.n_examples]
        path = self.sparse_examples_path
        data = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        data.setdefault(task, {})[kind] = [
            {"text": t, "weights": w} for t, w in zip(chosen, self.representer.sparse_weights(chosen))]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
