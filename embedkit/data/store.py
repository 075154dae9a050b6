"""The on-disk data store (`data.store: arrow`): contrastive rows at C-MTP scale, memory-mapped.

The memory path (`data.store: memory`) reads every row into a list of dicts, keys every distinct
passage in a dict and tokenises in one process, on every rank: ~17x the file in RAM (issue 17),
which at C-Pack's general stage (~100M pairs) cannot start. The store keeps the same rows and
batches on disk instead, in two caches under `data.cache_dir`/store, each built once under a file
lock (the first rank builds, the others wait and open it) and atomically renamed into place:

1. rows/<key>: the rows as read, an Arrow file (Hugging Face `datasets`, memory-mapped, shared by
   every rank through the page cache, as FlagEmbedding reads its training data). Files are read as
   a stream and checked by the same reader as the memory path (embedkit/data/readers.py), so a bad
   row names its file:line, or is skipped and counted (`bad_rows`, kept in meta.json for a cached
   start). The key hashes the sources' settings and each file's path, size and mtime, as
   `datasets` keys local data files; a source that is not a jsonl file (People's Daily pairs) is
   called and its rows' text is hashed.
2. tokens/<key>: the rows tokenised by a batched multi-process `Dataset.map`, flattened into
   numpy arrays opened with `mmap_mode="r"`: query ids, one "slot" per positive/negative/candidate
   text, a 64-bit blake2b hash per query and slot, and the slot -> distinct passage map computed
   from the hashes (first appearance order, so passage ids equal the memory path's `passage_index`).
   Rows with teacher scores (FlagEmbedding's `pos_scores` / `neg_scores`, two nullable
   list<double> columns of the Arrow file) add a float64 score per slot (NaN on candidates and on
   rows without scores) and a per-row flag; data without scores writes neither.
   Keyed by the rows' key, the tokenizer (class and vocabulary), the max lengths and the query
   instruction.

Ranks read only the rows of their slice of each global batch (GroupBatchSampler); what a rank holds
in Python is the index arrays (order, lengths, duplicate-key hashes), not the rows. Duplicate keys
are the query's and positives' hashes (sentence-transformers' NO_DUPLICATES_HASHED), in the same id
space as the memory path's exact text ids, so the batches match it (tests/test_store.py).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import mmap
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from embedkit.data.batching import TokenTable

log = logging.getLogger(__name__)
STORES = ("memory", "arrow")
ROW_BATCH = 10_000   # rows per Arrow record batch written while reading


# ------------------------------------------------------------------ hashing

def text_hash(texts: Sequence[str]) -> np.ndarray:
    """64-bit blake2b of each text (utf-8), as int64: the key of a text for dedup and batching."""
    return np.fromiter((int.from_bytes(hashlib.blake2b(t.encode("utf-8"), digest_size=8).digest(),
                                       "little", signed=True) for t in texts),
                       dtype=np.int64, count=len(texts))


def tokenizer_key(tokenizer) -> str:
    vocab = tokenizer.get_vocab()
    h = hashlib.sha1(type(tokenizer).__name__.encode())
    h.update("\n".join(sorted(vocab, key=vocab.get)).encode())
    return h.hexdigest()


# ------------------------------------------------------------------ reading rows as a stream

def _file_source(source: Callable) -> tuple[list[Path], dict] | None:
    """(files, options) of a source that reads FlagEmbedding jsonl files, else None."""
    from embedkit.data import sources

    if not isinstance(source, functools.partial):
        return None
    kw = dict(source.keywords)
    if source.func is sources.zh_mini_jsonl:
        from embedkit.data.paths import data_file

        return [data_file(kw["data_dir"], kw["file"])], {
            "max_rows": kw.get("max_rows"), "prompt": kw.get("prompt"), "on_bad_row": kw.get("on_bad_row")}
    if source.func is sources.jsonl_files:
        import glob

        files = sorted(glob.glob(kw["pattern"]))
        if not files:
            raise FileNotFoundError(f"no training files match {kw['pattern']!r}; set data.sources or "
                                    f"the environment variable the pattern reads (e.g. CMTP_DIR)")
        return [Path(f) for f in files], {"on_bad_row": kw.get("on_bad_row")}
    return None


def rows_key(sources: Sequence[Callable], on_bad_row: str, max_examples: int | None, seed: int) -> str:
    """The rows' cache key: the sources' settings, and per file its path, size and mtime."""
    from embedkit.data.base import plain

    # "format": the rows file's schema (2: a `file` column; 3: `pos_scores` / `neg_scores`), so an
    # older store is never reopened.
    h = hashlib.sha1(json.dumps({"on_bad_row": on_bad_row, "max_examples": max_examples, "seed": seed,
                                 "format": 3},
                                sort_keys=True).encode())
    for source in sources:
        h.update(json.dumps(plain(source), sort_keys=True, ensure_ascii=False, default=repr).encode())
        found = _file_source(source)
        if found is None:   # rows made in Python: their text is the key
            from embedkit.data.sources import call_source

            for row in call_source(source, on_bad_row):
                h.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode())
            continue
        for f in found[0]:
            st = os.stat(f)
            h.update(f"{Path(f).resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def _stream_source(source: Callable, on_bad_row: str, skipped: dict,
                   files: list | None = None) -> Iterator[tuple[int, dict]]:
    """(file number within the source, row) of every good row; a source made in Python is one
    file unless it reports its files (`file_rows`). `files` gets the source's file count."""
    from embedkit.data.readers import iter_retrieval_jsonl
    from embedkit.data.sources import call_source

    found = _file_source(source)
    if found is None:
        rows = call_source(source, on_bad_row)
        for path, bad in (getattr(rows, "skipped_by_path", None) or {}).items():
            skipped.setdefault(path, []).extend(bad)
        bounds = np.cumsum(getattr(rows, "file_rows", None) or [len(rows)])
        if files is not None:
            files.append(len(bounds))
        for i, row in enumerate(rows):
            yield int(np.searchsorted(bounds, i, side="right")), row
        return
    paths, opts = found
    if files is not None:
        files.append(len(paths))
    policy = opts["on_bad_row"] or on_bad_row
    n = 0
    for k, f in enumerate(paths):
        bad = skipped.setdefault(os.fspath(f), [])
        for _, row in iter_retrieval_jsonl(f, on_bad_row=policy, skipped=bad):
            if opts.get("prompt") is not None:
                row.setdefault("prompt", opts["prompt"])
            yield k, row
            n += 1
            if opts.get("max_rows") and n >= opts["max_rows"]:
                return


def _schema():
    import pyarrow as pa

    texts = pa.list_(pa.string())
    scores = pa.list_(pa.float64())   # null on a row without teacher scores
    return pa.schema([("query", pa.string()), ("prompt", pa.string()), ("pos", texts),
                      ("neg", texts), ("candidates", texts), ("source", pa.int32()),
                      ("file", pa.int32()), ("pos_scores", scores), ("neg_scores", scores)])


def _write_rows(sources: Sequence[Callable], on_bad_row: str, path: Path) -> tuple[int, dict]:
    """Stream every source's rows into one Arrow stream file; returns (rows, skipped by file)."""
    import pyarrow as pa

    from embedkit.data.readers import teacher_scores_of

    schema, skipped, n = _schema(), {}, 0
    cols = {name: [] for name in schema.names}

    def flush(writer):
        if cols["query"]:
            writer.write_batch(pa.record_batch([pa.array(cols[k], type=schema.field(k).type)
                                                for k in schema.names], schema=schema))
            for v in cols.values():
                v.clear()

    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        files = 0   # numbered across sources, as the memory path numbers them
        for s, source in enumerate(sources):
            counted: list[int] = []
            for k, row in _stream_source(source, on_bad_row, skipped, counted):
                cols["query"].append(row["query"])
                cols["prompt"].append(row.get("prompt"))
                cols["pos"].append(list(row["pos"]))
                cols["neg"].append(list(row.get("neg", ())))
                cols["candidates"].append(list(row.get("candidates", ())))
                cols["source"].append(s)
                cols["file"].append(files + k)
                scores = teacher_scores_of(row, f"data.sources[{s}], row {n} (query {row['query'][:40]!r})")
                cols["pos_scores"].append(None if scores is None else scores[0])
                cols["neg_scores"].append(None if scores is None else scores[1])
                n += 1
                if len(cols["query"]) >= ROW_BATCH:
                    flush(writer)
            files += counted[0]
        flush(writer)
    return n, {p: b for p, b in skipped.items() if b}


# ------------------------------------------------------------------ building under a lock

def _build_once(final: Path, build: Callable[[Path], None]) -> None:
    """Build `final` (a folder) once: under a lock, into a temporary folder renamed into place."""
    from filelock import FileLock

    if (final / "meta.json").exists():
        return
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if (final / "meta.json").exists():   # another rank built it while we waited
            return
        tmp = final.with_name(f"{final.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
        tmp.mkdir()
        try:
            build(tmp)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


class StoreRows(Sequence):
    """The rows of a store as a read-only sequence of dicts, read from the memory-mapped Arrow
    file on access (the recipe's `examples`, DHNM's texts), never all held at once."""

    def __init__(self, folder: Path):
        import datasets

        self.folder = Path(folder)
        self.meta = json.loads((self.folder / "meta.json").read_text(encoding="utf-8"))
        self.table = datasets.Dataset.from_file(str(self.folder / "rows.arrow"), in_memory=False)
        self.bad_rows = {p: [tuple(b) for b in bad] for p, bad in self.meta["skipped"].items()}

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        row = self.table[int(i)]
        out = {"query": row["query"], "pos": row["pos"], "neg": row["neg"]}
        if row["prompt"] is not None:
            out["prompt"] = row["prompt"]
        if row["candidates"]:
            out["candidates"] = row["candidates"]
        if row["pos_scores"] is not None:
            out["pos_scores"], out["neg_scores"] = row["pos_scores"], row["neg_scores"]
        return out

    def __iter__(self):
        for batch in self.table.iter(batch_size=ROW_BATCH):
            for j in range(len(batch["query"])):
                out = {"query": batch["query"][j], "pos": batch["pos"][j], "neg": batch["neg"][j]}
                if batch["prompt"][j] is not None:
                    out["prompt"] = batch["prompt"][j]
                if batch["candidates"][j]:
                    out["candidates"] = batch["candidates"][j]
                if batch["pos_scores"][j] is not None:
                    out["pos_scores"], out["neg_scores"] = batch["pos_scores"][j], batch["neg_scores"][j]
                yield out

    def source_ids(self) -> np.ndarray:
        """Each row's source (its index in the data's `sources`), from the store's column."""
        return self.table.data.column("source").to_numpy()

    def file_ids(self) -> np.ndarray:
        """Each row's file, numbered across sources in reading order (as the memory path's)."""
        return self.table.data.column("file").to_numpy()

    def texts(self) -> Iterator[str]:
        """Every query, positive and negative, streamed in batches (for a vocabulary)."""
        for batch in self.table.select_columns(["query", "pos", "neg"]).iter(batch_size=ROW_BATCH):
            for q, pos, neg in zip(batch["query"], batch["pos"], batch["neg"]):
                yield q
                yield from pos
                yield from neg


def open_rows(sources: Sequence[Callable], cache_dir: str | Path | None, on_bad_row: str,
              max_examples: int | None, seed: int) -> StoreRows:
    """The rows of `sources` in the store, read and written on the first call only."""
    if not cache_dir:
        raise ValueError("data.store=arrow keeps its store under data.cache_dir, which is unset")
    final = Path(cache_dir) / "store" / "rows" / rows_key(sources, on_bad_row, max_examples, seed)

    def build(tmp: Path) -> None:
        import datasets

        n, skipped = _write_rows(sources, on_bad_row, tmp / "all.arrow")
        if not n:
            raise ValueError("the configured training sources produced no examples")
        for path, bad in skipped.items():
            line, reason = bad[0]
            log.warning("skipped %d bad row(s) of %s (data.on_bad_row=skip); first: line %d: %s",
                        len(bad), path, line, reason)
        if max_examples and n > max_examples:   # the memory path's draw (TextDataModule.examples)
            keep = np.sort(np.random.default_rng(seed).choice(n, max_examples, replace=False))
            table = datasets.Dataset.from_file(str(tmp / "all.arrow"), in_memory=False)
            table.select(keep).flatten_indices(cache_file_name=str(tmp / "rows.arrow"))
            del table
            (tmp / "all.arrow").unlink()
        else:
            (tmp / "all.arrow").rename(tmp / "rows.arrow")
        (tmp / "meta.json").write_text(json.dumps({"rows": int(min(n, max_examples or n)),
                                                   "skipped": skipped}), encoding="utf-8")

    _build_once(final, build)
    return StoreRows(final)


# ------------------------------------------------------------------ tokens

class IndexedTokenTable:
    """Rows of a TokenTable picked by an index: row i is table.row(index[i])."""

    def __init__(self, table: TokenTable, index: np.ndarray):
        self.table, self.index = table, index

    def __len__(self) -> int:
        return len(self.index)

    def row(self, i: int) -> np.ndarray:
        return self.table.row(int(self.index[i]))

    def lengths(self) -> np.ndarray:
        return self.table.lengths()[self.index]


class Slices(Sequence):
    """Row i's ids: values[ptr[i] + start[i] : ptr[i] + start[i] + count[i]], as a list; rows set
    later (dynamic hard-negative mining replaces `neg`) are kept aside."""

    def __init__(self, values: np.ndarray, begin: np.ndarray, count: np.ndarray):
        self.values, self.begin, self.count = values, begin, count
        self.replaced: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return len(self.begin)

    def __getitem__(self, i: int) -> list[int]:
        i = int(i)
        if i in self.replaced:
            return self.replaced[i]
        b = int(self.begin[i])
        return self.values[b:b + int(self.count[i])].tolist()

    def __setitem__(self, i: int, ids) -> None:
        self.replaced[int(i)] = list(ids)


class HashedKeys(Sequence):
    """Per row, the hashes of its query and positives (CSR): `pack_without_duplicates`' keys."""

    def __init__(self, values: np.ndarray, ptr: np.ndarray):
        self.values, self.ptr = values, ptr

    def __len__(self) -> int:
        return len(self.ptr) - 1

    def __getitem__(self, i: int) -> list[int]:
        return self.values[self.ptr[i]:self.ptr[i + 1]].tolist()


def _flat(ds, column: str, folder: Path, name: str) -> None:
    """A mapped `list<int32>` column as flat ids + offsets .npy files."""
    col = ds.data.column(column)
    n_rows = len(col)
    offsets = np.lib.format.open_memmap(folder / f"{name}.offsets.npy", "w+", np.int64, (n_rows + 1,))
    total = 0
    sizes = []
    for chunk in col.chunks:
        o = chunk.offsets.to_numpy()
        sizes.append(int(o[-1] - o[0]))
    ids = np.lib.format.open_memmap(folder / f"{name}.ids.npy", "w+", np.int32, (sum(sizes),))
    row = 0
    offsets[0] = 0
    for chunk in col.chunks:
        o = chunk.offsets.to_numpy()
        k = len(chunk)
        ids[total:total + int(o[-1] - o[0])] = chunk.flatten().to_numpy()
        offsets[row + 1:row + k + 1] = total + (o[1:] - o[0])
        total += int(o[-1] - o[0])
        row += k
    ids.flush()
    offsets.flush()
    del ids, offsets


class TokenStore:
    """The tokenised store of a StoreRows: memory-mapped arrays (see the module docstring)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        def load(path):
            mapped = np.load(path, mmap_mode="r", allow_pickle=False)
            # Rows are read at random: the kernel's readahead would map ~128 KiB around each
            # row's few hundred bytes (measured at 10M rows: +1.2 GiB of RSS per 50 batches, and
            # 4 batches/s instead of 20+).
            if hasattr(mapped, "_mmap") and hasattr(mmap, "MADV_RANDOM"):
                mapped._mmap.madvise(mmap.MADV_RANDOM)
            # A plain ndarray view of the mapped file: np.memmap's own slicing costs ~10x per row.
            return mapped.view(np.ndarray)

        f = self.folder
        self.queries = TokenTable(load(f / "query.ids.npy"), load(f / "query.offsets.npy"))
        self.slots = TokenTable(load(f / "slot.ids.npy"), load(f / "slot.offsets.npy"))
        self.query_hash = load(f / "query.hash.npy")
        self.slot_hash = load(f / "slot.hash.npy")
        self.slot_ptr = load(f / "row.slot_ptr.npy")     # row i's slots start here
        self.n_pos, self.n_neg, self.n_cand = (load(f / f"row.{k}.npy") for k in ("n_pos", "n_neg", "n_cand"))
        self.slot_pid = load(f / "slot.pid.npy")         # slot -> distinct passage id
        self.pid_slot = load(f / "pid.slot.npy")         # distinct passage -> its first slot
        self.passages = IndexedTokenTable(self.slots, self.pid_slot)
        scored = f / "row.scored.npy"   # absent: no row has teacher scores
        self.row_scored = load(scored) if scored.exists() else None
        self.slot_score = load(f / "slot.score.npy") if scored.exists() else None

    def __len__(self) -> int:
        return len(self.queries)

    def scored(self) -> "SlotScores":
        """Per row, its teacher scores by passage id (GroupDataset.scored), read on access."""
        return SlotScores(self)

    def pos(self) -> Slices:
        return Slices(self.slot_pid, self.slot_ptr[:-1], self.n_pos)

    def neg(self) -> Slices:
        return Slices(self.slot_pid, self.slot_ptr[:-1] + self.n_pos, self.n_neg)

    def candidates(self) -> Slices:
        return Slices(self.slot_pid, self.slot_ptr[:-1] + self.n_pos + self.n_neg, self.n_cand)

    def first_pos(self) -> np.ndarray:
        return np.asarray(self.slot_pid[self.slot_ptr[:-1]])

    def duplicate_keys(self) -> HashedKeys:
        """Query and positive hashes per row, one CSR array (no Python object per row)."""
        n = len(self)
        ptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(1 + np.asarray(self.n_pos, dtype=np.int64), out=ptr[1:])
        values = np.empty(int(ptr[-1]), dtype=np.int64)
        values[ptr[:-1]] = self.query_hash
        # positive j of row i sits at ptr[i] + 1 + j; its slot is slot_ptr[i] + j
        row_of = np.repeat(np.arange(n), np.asarray(self.n_pos))
        j = np.arange(len(row_of)) - np.repeat(np.cumsum(self.n_pos) - self.n_pos, self.n_pos)
        values[ptr[row_of] + 1 + j] = self.slot_hash[self.slot_ptr[row_of] + j]
        return HashedKeys(values, ptr)


class SlotScores(Sequence):
    """Row i's ({pid: score} of its pos, {pid: score} of its neg) from the slot scores, or None
    for a row without them. Read from the row's own slots, never from replaced negatives."""

    def __init__(self, store: TokenStore):
        self.store = store

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i: int):
        st, i = self.store, int(i)
        if st.row_scored is None or not st.row_scored[i]:
            return None
        b, n_pos, n_neg = int(st.slot_ptr[i]), int(st.n_pos[i]), int(st.n_neg[i])
        pids, scores = st.slot_pid[b:b + n_pos + n_neg].tolist(), st.slot_score[b:b + n_pos + n_neg].tolist()
        return dict(zip(pids[:n_pos], scores[:n_pos])), dict(zip(pids[n_pos:], scores[n_pos:]))


def _write_slot_scores(table, ptr: np.ndarray, counts: dict, folder: Path) -> None:
    """slot.score.npy (float64 per slot, NaN on candidates and unscored rows) and row.scored.npy,
    if any row has teacher scores; nothing otherwise."""
    import pyarrow.compute as pc

    scored = pc.is_valid(table.data.column("pos_scores")).to_numpy(zero_copy_only=False)
    if not scored.any():
        return
    score = np.full(int(ptr[-1]), np.nan)
    rows = np.flatnonzero(scored)
    for column, start, count in (("pos_scores", ptr[:-1], counts["n_pos"]),
                                 ("neg_scores", ptr[:-1] + counts["n_pos"], counts["n_neg"])):
        values = pc.list_flatten(table.data.column(column)).to_numpy()   # null rows give none
        c = count[rows]
        within = np.arange(int(c.sum())) - np.repeat(np.cumsum(c) - c, c)
        score[np.repeat(start[rows], c) + within] = values
    np.save(folder / "slot.score.npy", score)
    np.save(folder / "row.scored.npy", scored)


def open_tokens(rows: StoreRows, tokenizer, query_max_len: int, passage_max_len: int,
                query_instruction: str, num_proc: int | None = None) -> TokenStore:
    """`rows` tokenised (the query with its instruction or the row's prompt, every passage slot),
    built on the first call for this tokenizer and these settings."""
    import pyarrow.compute as pc

    h = hashlib.sha1(rows.folder.name.encode())
    h.update(json.dumps([tokenizer_key(tokenizer), query_max_len, passage_max_len, query_instruction]).encode())
    final = rows.folder.parent.parent / "tokens" / h.hexdigest()[:20]
    num_proc = num_proc or os.cpu_count() or 1

    def build(tmp: Path) -> None:
        table = rows.table
        procs = max(1, min(num_proc, len(table) // 1000))

        def queries(batch):
            texts = [(instruction if p is None else p) + q for q, p in zip(batch["query"], batch["prompt"])]
            enc = tokenizer(texts, truncation=True, max_length=query_max_len, add_special_tokens=True)
            return {"input_ids": enc["input_ids"], "hash": text_hash(batch["query"])}

        def slots(batch):
            texts = [t for pos, neg, cand in zip(batch["pos"], batch["neg"], batch["candidates"])
                     for t in (*pos, *neg, *cand)]
            enc = tokenizer(texts, truncation=True, max_length=passage_max_len, add_special_tokens=True)
            return {"input_ids": enc["input_ids"], "hash": text_hash(texts)}

        instruction = query_instruction or ""
        cols = table.column_names
        for name, fn, max_len in (("query", queries, query_max_len), ("slot", slots, passage_max_len)):
            import datasets

            out = table.map(fn, batched=True, batch_size=1000, num_proc=procs, remove_columns=cols,
                            cache_file_name=str(tmp / f"{name}.arrow"),
                            new_fingerprint=f"{final.name}-{name}",
                            features=datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32")),
                                                        "hash": datasets.Value("int64")}),
                            desc=f"tokenising {name} texts")
            _flat(out, "input_ids", tmp, name)
            np.save(tmp / f"{name}.hash.npy", out.data.column("hash").to_numpy())
            del out
        counts = {k: pc.list_value_length(table.data.column(c)).to_numpy().astype(np.int64)
                  for k, c in (("n_pos", "pos"), ("n_neg", "neg"), ("n_cand", "candidates"))}
        for k, v in counts.items():
            np.save(tmp / f"row.{k}.npy", v)
        ptr = np.zeros(len(table) + 1, dtype=np.int64)
        np.cumsum(counts["n_pos"] + counts["n_neg"] + counts["n_cand"], out=ptr[1:])
        np.save(tmp / "row.slot_ptr.npy", ptr)
        _write_slot_scores(table, ptr, counts, tmp)
        # Distinct passages by hash, numbered in order of first appearance (the memory path's
        # passage_index walks the rows' pos, neg, candidates in the same order).
        slot_hash = np.load(tmp / "slot.hash.npy")
        _, first, inverse = np.unique(slot_hash, return_index=True, return_inverse=True)
        del slot_hash
        by_first = np.argsort(first, kind="stable")
        rank = np.empty_like(by_first)
        rank[by_first] = np.arange(len(by_first))
        np.save(tmp / "slot.pid.npy", rank[inverse.reshape(-1)])
        np.save(tmp / "pid.slot.npy", first[by_first])
        for name in ("query", "slot"):
            for arrow in tmp.glob(f"{name}*.arrow"):   # the flat arrays replace them
                arrow.unlink()
        (tmp / "meta.json").write_text(json.dumps({"rows": len(table), "passages": int(len(first)),
                                                   "tokenizer": tokenizer_key(tokenizer)}),
                                       encoding="utf-8")

    _build_once(final, build)
    return TokenStore(final)
