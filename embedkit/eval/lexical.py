"""The lexical floor: what a bag of characters scores on the suite's tasks, without any training.

Every mini table gets this row (eval.lexical_floor, conf/eval/mini_cmteb.yaml) so that a model's
scores read against what surface overlap alone achieves: CMRC questions share most of their
characters with their paragraph (the zh-mini README: a character TF-IDF scores ~99 nDCG@10 on
CMRCRetrieval), so a model below the floor there has learnt less than counting characters.

The encoder, per task, fitted on that task's own distinct texts (every text the task will ask it
to embed, each once: queries, with the suite's instruction where the suite adds it, and documents;
both sentences of each pair; classification train and test texts; clustering texts). Once, because
the encoder embeds each distinct text once too (MtebEncoder), and an idf that counted a premise
once per hypothesis it is paired with would weigh the data's layout, not its words:

    x = tfidf(t)            TfidfVectorizer(analyzer="char", ngram_range=(1, 2), sublinear_tf=True):
                            tf = 1 + log(count), idf = ln((1 + n) / (1 + df)) + 1, row L2-normalised
    z = x V                 TruncatedSVD(256): V the top-256 right singular vectors of the task's
                            tf-idf matrix (randomized algorithm, random_state 0)
    e = z / ||z||           sklearn.preprocessing.normalize

It is scored exactly as a model is: `FloorMtebEncoder` is the suite's `MtebEncoder` with the model
swapped for a freshly fitted `LexicalFloor` whenever mteb moves to the next task, and
`evaluate_tasks` (embedkit/eval/cmteb.py) runs the same mteb evaluators on the same task objects.

The scores are cached on disk (`<cache_dir>/lexical_floor/<key>/floor.json`), keyed by a content
hash (`floor_key`) of what decides them: every task's name, type, main score, data revision (a hash
of its files and row sampling, embedkit/eval/tasks.py) and the texts the floor fits on (so the
instruction counts), the settings below and the sklearn and mteb versions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedkit.eval.encoder import MtebEncoder

if TYPE_CHECKING:
    from mteb.abstasks.abstask import AbsTask

log = logging.getLogger(__name__)

NGRAM_RANGE = (1, 2)
DIM = 256
# TruncatedSVD's default random_state is None (a new projection every fit); fixed, the floor is
# the same number on every call, which is what lets it be cached.
RANDOM_STATE = 0
LABEL = f"lexical floor: char {NGRAM_RANGE[0]}-{NGRAM_RANGE[1]}-gram TF-IDF -> SVD {DIM}"
# Bump when the computation changes in a way the key does not see, so old cache entries go stale.
VERSION = 1
CACHE_SUBDIR = "lexical_floor"
CACHE_FILE = "floor.json"


def settings() -> dict[str, Any]:
    """The floor's settings as its results and cache key record them."""
    return {"analyzer": "char", "ngram_range": list(NGRAM_RANGE), "sublinear_tf": True, "svd_dim": DIM,
            "svd_algorithm": "randomized", "random_state": RANDOM_STATE, "normalize": "l2",
            "fit": "per task, on its distinct texts"}


class LexicalFloor:
    """Character n-gram TF-IDF -> TruncatedSVD -> L2, fitted on a fixed set of texts (`fit`).

    A task smaller than the SVD width (fewer distinct n-grams or texts than `dim`) keeps every
    direction it has: `n_components = min(dim, n_texts, n_features - 1)`.
    """

    def __init__(self, dim: int = DIM, ngram_range: tuple[int, int] = NGRAM_RANGE,
                 random_state: int = RANDOM_STATE):
        self.dim = dim
        self.ngram_range = tuple(ngram_range)
        self.random_state = random_state
        self._tfidf = self._svd = None

    def fit(self, texts: Sequence[str]) -> LexicalFloor:
        from sklearn.decomposition import TruncatedSVD
        from sklearn.feature_extraction.text import TfidfVectorizer

        texts = list(texts)
        if not texts:
            raise ValueError("the lexical floor needs at least one text to fit on")
        self._tfidf = TfidfVectorizer(analyzer="char", ngram_range=self.ngram_range, sublinear_tf=True)
        x = self._tfidf.fit_transform(texts)
        width = min(self.dim, x.shape[0], x.shape[1] - 1)
        if width < 1:
            raise ValueError(f"the lexical floor cannot fit on these {len(texts)} texts: they hold "
                             f"{x.shape[1]} distinct character n-gram(s), the SVD needs at least 2")
        self._svd = TruncatedSVD(width, random_state=self.random_state).fit(x)
        return self

    def encode(self, texts: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """float32, L2-normalised rows (`batch_size` is the encoder protocol's; unused)."""
        from sklearn.preprocessing import normalize

        if self._svd is None:
            raise RuntimeError("LexicalFloor.encode before fit")
        z = self._svd.transform(self._tfidf.transform(list(texts)))
        return normalize(z).astype(np.float32)


def task_texts(task: AbsTask, query_instruction: str | None = None) -> list[str]:
    """The distinct texts `task` will have embedded, as the encoder receives them (BGE's instruction
    in front of retrieval and re-ranking queries: `MtebEncoder.instruction_for`), in first-seen order."""
    return list(dict.fromkeys(_all_texts(task, query_instruction)))


def _all_texts(task: AbsTask, query_instruction: str | None) -> list[str]:
    from embedkit.eval.encoder import INSTRUCTION_TASK_TYPES
    from embedkit.eval.tasks import EVAL_SPLIT

    if not hasattr(task, "task_dir"):
        raise ValueError(f"eval.lexical_floor: task {task.metadata.name!r} is not a local mini C-MTEB task "
                         "(embedkit/eval/tasks.py); the floor reads the suite's own task files, so set "
                         "eval.lexical_floor=false for the official C-MTEB")
    task.load_data()
    kind, data = task.metadata.type, task.dataset
    if kind in ("Retrieval", "Reranking"):
        split = data["default"][EVAL_SPLIT]
        prefix = (query_instruction or "") if kind in INSTRUCTION_TASK_TYPES else ""
        return [prefix + t for t in split["queries"]["text"]] + list(split["corpus"]["text"])
    if kind in ("STS", "PairClassification"):
        return list(data[EVAL_SPLIT]["sentence1"]) + list(data[EVAL_SPLIT]["sentence2"])
    if kind == "Classification":
        return list(data["train"]["text"]) + list(data[EVAL_SPLIT]["text"])
    if kind == "Clustering":
        return list(data[EVAL_SPLIT]["sentences"])
    raise ValueError(f"eval.lexical_floor: no text reader for task type {kind!r} ({task.metadata.name})")


class FloorMtebEncoder(MtebEncoder):
    """`MtebEncoder` around a `LexicalFloor` refitted on each task's own texts (`texts_by_task`)
    when mteb first asks for that task's embeddings. The text -> vector cache is the fitted
    floor's, so it is emptied with each refit: a text two tasks share (TNews, the SNLI hypotheses)
    is embedded by each task's own fit."""

    def __init__(self, texts_by_task: dict[str, list[str]], *, model_name: str, revision: str,
                 query_instruction: str | None = None):
        super().__init__(LexicalFloor(), model_name=model_name, revision=revision,
                         query_instruction=query_instruction, embed_dim=DIM)
        self.texts_by_task = texts_by_task
        self._fitted_for: str | None = None

    def encode(self, inputs, *, task_metadata, **kwargs):
        if task_metadata.name != self._fitted_for:
            self.model = LexicalFloor().fit(self.texts_by_task[task_metadata.name])
            self._cache.clear()
            self._fitted_for = task_metadata.name
        return super().encode(inputs, task_metadata=task_metadata, **kwargs)


def floor_key(tasks: Sequence[AbsTask], texts_by_task: dict[str, list[str]]) -> str:
    """The content hash the floor's scores are cached under."""
    import mteb
    import sklearn

    digest = hashlib.sha1(json.dumps({"version": VERSION, "settings": settings(),
                                      "sklearn": sklearn.__version__, "mteb": mteb.__version__},
                                     sort_keys=True).encode())
    for task in tasks:
        meta = task.metadata
        digest.update(json.dumps([meta.name, meta.type, meta.main_score, meta.dataset.get("revision")]).encode())
        for text in texts_by_task[meta.name]:
            digest.update(text.encode("utf-8"))
            digest.update(b"\0")
    return digest.hexdigest()[:20]


def lexical_floor(tasks: Sequence[AbsTask], *, cache_dir: str | Path | None, query_instruction: str | None,
                  batch_size: int = 128, show_progress: bool = False) -> dict[str, Any]:
    """The floor's results on `tasks`, as `evaluate_tasks` returns a model's (tasks, categories,
    Avg, ...), plus `lexical_floor`: {label, settings, key, seconds}. Read from the cache when
    `cache_dir` holds them; otherwise computed (and stored there, atomically). `cache_dir=None`
    computes every time."""
    from embedkit.eval.cmteb import evaluate_tasks
    from embedkit.redact import write_json

    if not tasks:
        raise ValueError("eval.lexical_floor: the suite selected no tasks")
    texts_by_task = {t.metadata.name: task_texts(t, query_instruction) for t in tasks}
    key = floor_key(tasks, texts_by_task)
    entry = Path(cache_dir) / CACHE_SUBDIR / key if cache_dir else None
    if entry is not None and (entry / CACHE_FILE).is_file():
        try:
            cached = json.loads((entry / CACHE_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:   # written atomically, so only a foreign edit gets here
            log.warning("lexical floor: unreadable cache file %s (%s); recomputing", entry / CACHE_FILE, e)
        else:
            log.info("lexical floor: cached (%s)", entry / CACHE_FILE)
            return cached

    encoder = FloorMtebEncoder(texts_by_task, model_name="embedkit/lexical-floor", revision=key,
                               query_instruction=query_instruction)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lexical-floor-") as scratch:
        # mteb's per-task files are of no use once the scores are in floor.json
        results = evaluate_tasks(encoder, list(tasks), scratch, batch_size=batch_size, show_progress=show_progress)
    results.pop("mteb_results_dir", None)
    results["lexical_floor"] = {"label": LABEL, "settings": settings(), "key": key,
                                "seconds": round(time.perf_counter() - start, 1)}
    if entry is not None:
        write_json(entry / CACHE_FILE, results)
    return results
