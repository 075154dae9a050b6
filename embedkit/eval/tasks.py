"""Local "mini C-MTEB" tasks, built as real mteb 2.x task objects.

Each folder under ``<data>/eval/<Task>/`` holds a ``task.json`` and jsonl files (see the zh-mini README).
We turn it into a subclass of the matching mteb ``AbsTask*`` so that mteb's own evaluators compute the
scores: the numbers are then comparable with what mteb reports for the official C-MTEB tasks.

mteb normally downloads data with ``datasets.load_dataset(metadata.dataset["path"])``, and ``TaskMetadata``
does not accept ``data_files``. So every task here overrides ``load_data`` and fills ``self.dataset`` from
the local files; ``metadata.dataset`` only carries a made-up path and a content-derived revision, which mteb
records in its result files but never fetches.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mteb.abstasks.abstask import AbsTask

TASK_TYPES = ("Retrieval", "Reranking", "STS", "PairClassification", "Classification", "Clustering")

EVAL_SPLIT = "test"

# task.json names main scores as mteb 1.x did; mteb 2.x reports reranking (a retrieval task with
# ``top_ranked``) only at cut-offs. Every candidate list here is far shorter than 1000, so MAP@1000 is
# exactly the MAP over all candidates that C-MTEB reports.
_MTEB2_SCORE_NAMES = {"Reranking": {"map": "map_at_1000", "mrr": "mrr_at_1000"}}

_FILES = {
    "Retrieval": ("corpus.jsonl", "queries.jsonl", "qrels.jsonl"),
    "Reranking": ("data.jsonl",),
    "STS": ("data.jsonl",),
    "PairClassification": ("data.jsonl",),
    "Classification": ("train.jsonl", "test.jsonl"),
    "Clustering": ("data.jsonl",),
}


class TaskDataError(ValueError):
    """A local task folder is incomplete or malformed; the message names the file (and line)."""


# --------------------------------------------------------------------------------------------------
# reading


def read_jsonl(path: Path, required: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Reads one json object per line, failing with the file and line number on the first bad line."""
    path = Path(path)
    if not path.is_file():
        raise TaskDataError(f"{path}: data file not found")
    rows = []
    # Bytes, decoded line by line: a bad byte is then reported with its line, not as a bare
    # UnicodeDecodeError at some offset of the file.
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise TaskDataError(f"{path}, line {lineno}: invalid UTF-8 (byte {e.start + 1} of the "
                                    f"line: {e.reason})") from e
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskDataError(f"{path}, line {lineno}: malformed JSON ({e.msg})") from e
            if not isinstance(row, dict):
                raise TaskDataError(f"{path}, line {lineno}: expected a JSON object, got {type(row).__name__}")
            missing = [key for key in required if key not in row]
            if missing:
                raise TaskDataError(f"{path}, line {lineno}: missing field(s) {missing}")
            rows.append(row)
    if not rows:
        raise TaskDataError(f"{path}: file has no rows")
    return rows


def read_task_config(task_dir: Path) -> dict[str, Any]:
    """Reads and checks ``task.json`` before any data file is touched."""
    path = Path(task_dir) / "task.json"
    if not path.is_file():
        raise TaskDataError(f"{path}: task.json not found (every task folder needs one)")
    data = path.read_bytes()
    try:
        config = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise TaskDataError(f"{path}: invalid UTF-8 at line {line} ({e.reason})") from e
    except json.JSONDecodeError as e:
        raise TaskDataError(f"{path}: malformed JSON at line {e.lineno} ({e.msg})") from e
    if not isinstance(config, dict):
        raise TaskDataError(f"{path}: expected a JSON object")
    missing = [key for key in ("name", "type", "main_score") if key not in config]
    if missing:
        raise TaskDataError(f"{path}: missing field(s) {missing}")
    if config["type"] not in TASK_TYPES:
        raise TaskDataError(
            f"{path}: unknown task type {config['type']!r}; valid types are {', '.join(TASK_TYPES)}"
        )
    if config["type"] == "STS":
        for key in ("min_score", "max_score"):
            if not isinstance(config.get(key), int | float):
                raise TaskDataError(f"{path}: STS tasks need a numeric {key!r}")
        if config["max_score"] <= config["min_score"]:
            raise TaskDataError(f"{path}: max_score must be larger than min_score")
    return config


def _fingerprint(task_dir: Path, config: dict[str, Any], max_rows: int | None, seed: int) -> str:
    """A revision string that changes with the data and the sampling, stored in mteb's result files."""
    digest = hashlib.sha1()
    for name in ("task.json", *_FILES[config["type"]]):
        path = task_dir / name
        if path.is_file():
            digest.update(path.read_bytes())
    sampling = "full" if max_rows is None else f"rows{max_rows}-seed{seed}"
    return f"local-{digest.hexdigest()[:12]}-{sampling}"


# --------------------------------------------------------------------------------------------------
# deterministic subsampling


def _sample(n: int, k: int | None, rng: random.Random) -> list[int]:
    if k is None or k >= n:
        return list(range(n))
    return sorted(rng.sample(range(n), k))


def _sample_keeping_labels(labels: Sequence[Any], k: int | None, rng: random.Random) -> list[int]:
    """Samples about ``k`` rows but at least one per label, so no class disappears from a small run."""
    if k is None or k >= len(labels):
        return list(range(len(labels)))
    by_label: dict[Any, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        by_label[label].append(i)
    chosen = {rng.choice(by_label[label]) for label in sorted(by_label, key=str)}
    rest = [i for i in range(len(labels)) if i not in chosen]
    chosen.update(rng.sample(rest, max(0, k - len(chosen))))
    return sorted(chosen)


# --------------------------------------------------------------------------------------------------
# loaders: folder -> what mteb expects in ``task.dataset``


def _load_retrieval(task_dir: Path, max_rows: int | None, rng: random.Random) -> dict:
    from datasets import Dataset

    corpus_path, queries_path, qrels_path = (task_dir / name for name in _FILES["Retrieval"])
    corpus = read_jsonl(corpus_path, ("id", "text"))
    queries = read_jsonl(queries_path, ("id", "text"))
    qrels_rows = read_jsonl(qrels_path, ("query_id", "doc_id", "score"))

    qrels: dict[str, dict[str, int]] = defaultdict(dict)
    for row in qrels_rows:
        qrels[str(row["query_id"])][str(row["doc_id"])] = int(row["score"])
    doc_ids = {str(doc["id"]) for doc in corpus}
    unknown = sorted({d for rel in qrels.values() for d in rel} - doc_ids)
    if unknown:
        raise TaskDataError(f"{qrels_path}: qrels name doc ids missing from {corpus_path.name}: {unknown[:5]}")

    # mteb drops queries without a positive anyway; dropping them first keeps max_rows meaningful
    queries = [q for q in queries if any(s > 0 for s in qrels.get(str(q["id"]), {}).values())]
    if not queries:
        raise TaskDataError(f"{queries_path}: no query has a relevant document in {qrels_path.name}")
    queries = [queries[i] for i in _sample(len(queries), max_rows, rng)]

    kept_query_ids = {str(q["id"]) for q in queries}
    qrels = {qid: rel for qid, rel in qrels.items() if qid in kept_query_ids}
    if max_rows is not None:
        # keep every relevant document, then add as many random distractors as there are queries
        relevant = {d for rel in qrels.values() for d in rel}
        others = [i for i, doc in enumerate(corpus) if str(doc["id"]) not in relevant]
        extra = set(rng.sample(others, min(max_rows, len(others))))
        corpus = [doc for i, doc in enumerate(corpus) if str(doc["id"]) in relevant or i in extra]

    split = {
        "corpus": Dataset.from_list([{"id": str(d["id"]), "text": d["text"]} for d in corpus]),
        "queries": Dataset.from_list([{"id": str(q["id"]), "text": q["text"]} for q in queries]),
        "relevant_docs": qrels,
        "top_ranked": None,
    }
    return {"default": {EVAL_SPLIT: split}}


def _load_reranking(task_dir: Path, max_rows: int | None, rng: random.Random) -> dict:
    """Reranking in mteb 2.x is retrieval restricted to per-query candidates (``top_ranked``)."""
    from datasets import Dataset

    path = task_dir / "data.jsonl"
    rows = read_jsonl(path, ("query", "positive", "negative"))
    rows = [row for row in rows if row["positive"]]
    if not rows:
        raise TaskDataError(f"{path}: no row has a positive")
    rows = [rows[i] for i in _sample(len(rows), max_rows, rng)]

    doc_id_of: dict[str, str] = {}  # the same passage can be a candidate of several queries

    def doc_id(text: str) -> str:
        return doc_id_of.setdefault(text, f"d{len(doc_id_of)}")

    queries, qrels, top_ranked = [], {}, {}
    for i, row in enumerate(rows):
        qid = f"q{i}"
        queries.append({"id": qid, "text": row["query"]})
        positives = [doc_id(text) for text in row["positive"]]
        negatives = [doc_id(text) for text in row["negative"]]
        qrels[qid] = dict.fromkeys(positives, 1)
        top_ranked[qid] = list(dict.fromkeys(positives + negatives))

    split = {
        "corpus": Dataset.from_list([{"id": d, "text": text} for text, d in doc_id_of.items()]),
        "queries": Dataset.from_list(queries),
        "relevant_docs": qrels,
        "top_ranked": top_ranked,
    }
    return {"default": {EVAL_SPLIT: split}}


def _load_sts(task_dir: Path, max_rows: int | None, rng: random.Random):
    from datasets import Dataset, DatasetDict

    rows = read_jsonl(task_dir / "data.jsonl", ("sentence1", "sentence2", "score"))
    rows = [rows[i] for i in _sample(len(rows), max_rows, rng)]
    records = [{"sentence1": r["sentence1"], "sentence2": r["sentence2"], "score": float(r["score"])} for r in rows]
    return DatasetDict({EVAL_SPLIT: Dataset.from_list(records)})


def _load_pair_classification(task_dir: Path, max_rows: int | None, rng: random.Random):
    from datasets import Dataset, DatasetDict

    path = task_dir / "data.jsonl"
    rows = read_jsonl(path, ("sentence1", "sentence2", "label"))
    bad = sorted({r["label"] for r in rows} - {0, 1}, key=str)
    if bad:
        raise TaskDataError(f"{path}: PairClassification labels must be 0 or 1, found {bad[:5]}")
    rows = [rows[i] for i in _sample_keeping_labels([r["label"] for r in rows], max_rows, rng)]
    records = [{"sentence1": r["sentence1"], "sentence2": r["sentence2"], "labels": int(r["label"])} for r in rows]
    return DatasetDict({EVAL_SPLIT: Dataset.from_list(records)})


def _load_classification(task_dir: Path, max_rows: int | None, rng: random.Random):
    from datasets import Dataset, DatasetDict

    splits = {}
    for split, name in (("train", "train.jsonl"), (EVAL_SPLIT, "test.jsonl")):
        rows = read_jsonl(task_dir / name, ("text", "label"))
        rows = [rows[i] for i in _sample_keeping_labels([r["label"] for r in rows], max_rows, rng)]
        splits[split] = Dataset.from_list([{"text": r["text"], "label": r["label"]} for r in rows])
    unseen = set(splits[EVAL_SPLIT]["label"]) - set(splits["train"]["label"])
    if unseen:
        raise TaskDataError(
            f"{task_dir / 'test.jsonl'}: labels never seen in train.jsonl: {sorted(unseen, key=str)[:5]}"
        )
    return DatasetDict(splits)


def _load_clustering(task_dir: Path, max_rows: int | None, rng: random.Random):
    from datasets import Dataset, DatasetDict

    rows = read_jsonl(task_dir / "data.jsonl", ("text", "label"))
    rows = [rows[i] for i in _sample_keeping_labels([r["label"] for r in rows], max_rows, rng)]
    records = [{"sentences": r["text"], "labels": r["label"]} for r in rows]
    return DatasetDict({EVAL_SPLIT: Dataset.from_list(records)})


_LOADERS = {
    "Retrieval": _load_retrieval,
    "Reranking": _load_reranking,
    "STS": _load_sts,
    "PairClassification": _load_pair_classification,
    "Classification": _load_classification,
    "Clustering": _load_clustering,
}


# --------------------------------------------------------------------------------------------------
# task classes


class _LocalDataMixin:
    """Replaces mteb's hub download with reading the task folder."""

    task_dir: Path
    task_type: str
    max_rows: int | None = None
    sample_seed: int = 0

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        if self.data_loaded:
            return
        rng = random.Random(f"{self.metadata.name}:{self.sample_seed}")
        self.dataset = _LOADERS[self.task_type](self.task_dir, self.max_rows, rng)
        self.data_loaded = True


@functools.cache
def _task_bases() -> dict[str, type]:
    import numpy as np
    from mteb.abstasks import (
        AbsTaskClassification,
        AbsTaskClustering,
        AbsTaskPairClassification,
        AbsTaskRetrieval,
        AbsTaskSTS,
    )

    class LocalClustering(_LocalDataMixin, AbsTaskClustering):
        # mteb's default embeds only 4% of the documents. Embed all of them instead, and cluster bootstrap
        # samples of min(n, 2048) documents: the default 16,384 per sample would mostly repeat documents here.
        max_fraction_of_documents_to_embed = None
        max_document_to_embed = None

        def _evaluate_subset(self, model, data_split, **kwargs):
            # the bootstrap draws from self.rng_state; reset it so re-evaluating the same task object
            # (e.g. a second checkpoint) sees the same samples
            self.rng_state = random.Random(self.seed)
            self.max_documents_per_cluster = min(2048, len(data_split))
            return super()._evaluate_subset(model, data_split, **kwargs)

    class LocalClassification(_LocalDataMixin, AbsTaskClassification):
        samples_per_label = 32  # the setting of every official C-MTEB classification task

        def _calculate_scores(self, y_test, y_pred):
            # mteb hands sklearn the lazy datasets column, which sklearn reads row by row many times over:
            # ~25 s of the 35 s TNews evaluation. One list conversion makes it ~0.1 s; the metrics are unchanged.
            return super()._calculate_scores(np.asarray(list(y_test)), y_pred)

    return {
        "Retrieval": type("LocalRetrieval", (_LocalDataMixin, AbsTaskRetrieval), {}),
        "Reranking": type("LocalReranking", (_LocalDataMixin, AbsTaskRetrieval), {}),
        "STS": type("LocalSTS", (_LocalDataMixin, AbsTaskSTS), {}),
        "PairClassification": type("LocalPairClassification", (_LocalDataMixin, AbsTaskPairClassification), {}),
        "Classification": LocalClassification,
        "Clustering": LocalClustering,
    }


def build_task(task_dir: str | Path, max_rows: int | None = None, seed: int = 0, preload: bool = True) -> AbsTask:
    """One local task folder -> an mteb task instance.

    ``metadata`` has to live on the class, not the instance: mteb's ``unload_data()`` deletes an instance
    attribute called ``metadata``. So each folder gets its own small subclass, just as mteb defines one
    class per official task.
    """
    from mteb.abstasks.task_metadata import TaskMetadata

    task_dir = Path(task_dir)
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be a positive integer or None, got {max_rows}")
    config = read_task_config(task_dir)
    task_type = config["type"]
    main_score = _MTEB2_SCORE_NAMES.get(task_type, {}).get(config["main_score"], config["main_score"])
    revision = _fingerprint(task_dir, config, max_rows, seed)
    metadata = TaskMetadata(
        name=config["name"],
        description=f"zh-mini local task ({task_dir}). Source: {config.get('source', 'not given')}",
        dataset={"path": f"embedkit-local/{config['name']}", "revision": revision},
        type=task_type,
        category="t2c" if task_type in ("Classification", "Clustering") else "t2t",
        modalities=["text"],
        eval_splits=[EVAL_SPLIT],
        eval_langs=["cmn-Hans"],
        main_score=main_score,
        license="not specified",
        annotations_creators="derived",
        dialect=[],
        sample_creation="found",
        bibtex_citation="",
    )
    attrs: dict[str, Any] = {
        "metadata": metadata,
        "task_dir": task_dir,
        "task_type": task_type,
        "max_rows": max_rows,
        "sample_seed": seed,
    }
    if task_type == "STS":
        attrs["min_score"] = config["min_score"]
        attrs["max_score"] = config["max_score"]
    base = _task_bases()[task_type]
    task = type(config["name"], (base,), attrs)()
    if preload:
        task.load_data()
    return task


def load_local_tasks(
    eval_dir: str | Path,
    names: Iterable[str] | None = None,
    max_rows: int | None = None,
    seed: int = 0,
) -> list[AbsTask]:
    """All (or the named) task folders under ``eval_dir``, as mteb tasks with their data already read.

    Reading eagerly means a broken file fails here, before any model time is spent. ``max_rows`` caps the
    rows per task (queries for retrieval, rows for reranking/STS/pairs/clustering, each classification split)
    with a sample that depends only on ``seed`` and the task name.
    """
    eval_dir = Path(eval_dir)
    if not eval_dir.is_dir():
        raise TaskDataError(f"{eval_dir}: evaluation folder not found")
    folders = sorted((p for p in eval_dir.iterdir() if p.is_dir()), key=lambda p: p.name)
    return load_task_dirs(folders, names=names, max_rows=max_rows, seed=seed, where=str(eval_dir))


def load_task_dirs(
    task_dirs: Sequence[str | Path],
    names: Iterable[str] | None = None,
    max_rows: int | None = None,
    seed: int = 0,
    where: str = "eval",
) -> list[AbsTask]:
    """The tasks of exactly these folders, in this order (or the named ones among them, by folder
    name), as mteb tasks with their data already read (see `load_local_tasks`). Only the selected
    folders are read; one that is missing is an error. `where` prefixes the error messages."""
    by_name: dict[str, Path] = {}
    for folder in map(Path, task_dirs):
        if folder.name in by_name:
            raise TaskDataError(f"{where}: two task folders are named {folder.name!r} ({by_name[folder.name]} "
                                f"and {folder}); task names must be unique")
        by_name[folder.name] = folder
    available = list(by_name)
    if names is None:
        selected = available
    else:
        selected = list(names)
        if not selected:
            # An empty list is a selection of nothing, not "all" (that is None): say so.
            raise TaskDataError(f"{where}: no tasks selected (an empty list); name some of "
                                f"{available}, or give null for every task")
        unknown = [name for name in selected if name not in by_name]
        if unknown:
            raise TaskDataError(f"{where}: no task folder(s) {unknown}; found {available}")
    missing = [str(by_name[name]) for name in selected if not by_name[name].is_dir()]
    if missing:
        raise TaskDataError(f"{where}: task folder(s) not found: {missing}")
    return [build_task(by_name[name], max_rows=max_rows, seed=seed) for name in selected]
