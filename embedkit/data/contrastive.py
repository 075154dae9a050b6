"""Contrastive training data: (query, 1 positive, n negatives) groups, pre-tokenised, length-grouped.

Sampling follows FlagEmbedding's `AbsDataset`: per example and epoch, one positive is drawn from
`pos` and `train_group_size - 1` negatives from `neg` without replacement (the list is tiled when it
is too short). Weak pairs carry no negatives; then the group is filled with random passages of the
training set, the same back-fill FlagEmbedding's miner uses. Passages are flattened so that row
`i * train_group_size` is query i's positive, which is what the InfoNCE target assumes.

Every text is tokenised once and cached on disk, keyed by the tokenizer and the texts, so a sweep
tokenises once. `store` says where rows live: `memory` reads them into Python lists (the zh-mini
default), `arrow` keeps them in a memory-mapped on-disk store built once and shared by every rank
(embedkit/data/store.py), for C-MTP's ~100M pairs; both give the same batches. Batches are padded to their own longest row, and `group_by_length` sorts rows by
length inside shuffled mega-batches to cut padding further (embedkit/data/batching.py, shared with
the STS and RetroMAE data). Everything is a pure function of the seed and the epoch: two runs with
the same seed see the same batches.

Teacher scores: rows may carry FlagEmbedding's `pos_scores` / `neg_scores` (one number per `pos` /
`neg` text, e.g. a reranker's logits). When every row of a batch has them, the batch gets
`teacher_scores` (B, G), each row's scores in its group's order (positive first), which the
objectives' `kd_loss_type` distils from (embedkit/objectives/infonce.py). A row without them, or a
group member without one (a back-filled random passage, a negative that dynamic mining put in),
leaves the key out of its batch; an objective configured for distillation then raises.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from embedkit.data.base import TextDataModule
from embedkit.data.batching import GroupBatchSampler, TokenTable, pad_rows, tokenize_table
from embedkit.data.instructions import instructed_query
from embedkit.data.readers import teacher_scores_of

log = logging.getLogger(__name__)


class GroupDataset(Dataset):
    """Items are (example index, epoch); the epoch seeds which positive and negatives are drawn."""

    def __init__(self, examples: list[dict], queries: TokenTable, passages: TokenTable,
                 passage_index: dict[str, int], train_group_size: int, seed: int):
        self.queries = queries
        self.passages = passages
        self.group_size = train_group_size
        self.seed = seed
        self.pos = [[passage_index[p] for p in ex["pos"]] for ex in examples]
        self.neg = [[passage_index[n] for n in ex.get("neg", ())] for ex in examples]
        # A mined ranking per example (`candidates`, embedkit/mining/ann.py), from which dynamic
        # hard-negative mining (embedkit/mining/dynamic.py) replaces `neg` during training.
        self.candidates = [[passage_index[c] for c in ex.get("candidates", ())] for ex in examples]
        # Teacher scores by passage id: {pid: score} of the row's own pos and neg (so a negative
        # that dynamic mining puts in later has none), or None for a row without scores.
        self.scored = []
        for i, (ex, pos, neg) in enumerate(zip(examples, self.pos, self.neg)):
            found = teacher_scores_of(ex, f"training row {i} (query {ex['query'][:40]!r})")
            self.scored.append(None if found is None else (dict(zip(pos, found[0])), dict(zip(neg, found[1]))))

    @classmethod
    def from_store(cls, store, train_group_size: int, seed: int) -> "GroupDataset":
        """The same dataset over a TokenStore (embedkit/data/store.py): passage ids per row are
        read from its memory-mapped arrays when a row is drawn."""
        self = cls.__new__(cls)
        self.queries, self.passages = store.queries, store.passages
        self.group_size, self.seed = train_group_size, seed
        self.pos, self.neg, self.candidates = store.pos(), store.neg(), store.candidates()
        self.scored = store.scored()
        return self

    def __len__(self) -> int:
        return len(self.pos)

    def group(self, index: int, epoch: int) -> list[int]:
        pos = self.pos[index]
        need = self.group_size - 1
        if not need and len(pos) == 1:
            return [pos[0]]   # nothing to draw (weak pairs): seeding a generator per row costs ~0.1 ms
        rng = np.random.default_rng((self.seed, epoch, index))
        group = [pos[rng.integers(len(pos))]]
        if need:
            neg = self.neg[index]
            if neg:
                pool = np.tile(neg, -(-need // len(neg)))
                group.extend(int(i) for i in rng.choice(pool, size=need, replace=False))
            else:
                forbidden = set(pos)
                while len(group) < self.group_size:
                    cand = int(rng.integers(len(self.passages)))
                    if cand not in forbidden:
                        group.append(cand)
                        forbidden.add(cand)
        return group

    def teacher_scores(self, index: int, group: list[int]) -> list[float] | None:
        """The teacher score of each passage id of `group` (positive first), or None if the row
        has none or a member has none (back-filled, or mined in after the scores were given)."""
        scored = self.scored[index]
        if scored is None:
            return None
        pos, neg = scored
        out = [pos.get(group[0])] + [neg.get(p) for p in group[1:]]
        return None if any(x is None for x in out) else out

    def __getitem__(self, item: tuple[int, int]) -> tuple[np.ndarray, list[np.ndarray], int, list | None]:
        index, epoch = item
        group = self.group(index, epoch)
        return (self.queries.row(index), [self.passages.row(p) for p in group], index,
                self.teacher_scores(index, group))


class GroupCollator:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items):
        queries = [item[0] for item in items]
        passages = [p for item in items for p in item[1]]
        # `index`: which examples the batch holds, for callbacks that track them (dynamic mining).
        batch = {"query": pad_rows(queries, self.pad_id), "passages": pad_rows(passages, self.pad_id),
                 "index": torch.tensor([item[2] for item in items], dtype=torch.long)}
        scores = [item[3] if len(item) > 3 else None for item in items]
        if all(s is not None for s in scores):
            # float64: the scores as written; the loss casts them to its own dtype
            batch["teacher_scores"] = torch.tensor(scores, dtype=torch.float64)
        return batch


class ContrastiveDataModule(TextDataModule):
    """Reads the configured sources, tokenises once, and serves (query, group) batches.

    `sources` are callables that return FlagEmbedding rows ({"query", "pos", "neg"}); Hydra builds
    them from `conf/data/*.yaml` so a recipe can mix People's Daily weak pairs and zh-mini files.
    """

    # How rows are grouped, cut and instructed, not which are read (`examples_key`).
    serving_args = TextDataModule.serving_args | {
        "train_group_size", "query_max_len", "passage_max_len", "query_instruction",
        "group_by_length", "no_duplicates", "store_num_proc", "same_source_within_batch",
        "source_weights"}

    def __init__(self, sources: Sequence[Callable[[], list[dict]]], batch_size: int = 32,
                 train_group_size: int = 1, query_max_len: int = 32, passage_max_len: int = 128,
                 query_instruction: str | None = None, group_by_length: bool = True,
                 seed: int = 0, cache_dir: str | None = None, num_workers: int = 0,
                 max_examples: int | None = None, on_bad_row: str = "error",
                 no_duplicates: bool = False, store: str = "memory",
                 store_num_proc: int | None = None, same_source_within_batch: bool = False,
                 source_weights: Sequence[float] | None = None):
        super().__init__(sources, batch_size=batch_size, seed=seed, cache_dir=cache_dir,
                         num_workers=num_workers, max_examples=max_examples, on_bad_row=on_bad_row)
        if train_group_size < 1:
            raise ValueError(f"train_group_size counts the positive too and must be >= 1, got {train_group_size}")
        self.train_group_size = train_group_size
        self.query_max_len = query_max_len
        self.passage_max_len = passage_max_len
        self.query_instruction = query_instruction or ""
        self.group_by_length = group_by_length
        self.no_duplicates = no_duplicates
        from embedkit.data.store import STORES

        if store not in STORES:
            raise ValueError(f"data.store must be one of {STORES}, got {store!r}")
        # `store` is part of examples_key: a store's rows are a StoreRows, not a list to share.
        self.store = store
        self.store_num_proc = store_num_proc
        # Multi-source sampling (GroupBatchSampler): one source per global batch, per-source
        # weights on how many of its rows an epoch draws; by source = entry of `sources`.
        self.same_source_within_batch = bool(same_source_within_batch)
        self.source_weights = None if source_weights is None else [float(w) for w in source_weights]
        if self.source_weights is not None and len(self.source_weights) != len(self.sources):
            raise ValueError(f"data.source_weights has {len(self.source_weights)} weight(s) for "
                             f"{len(self.sources)} data.sources; give one per source")
        self.token_store = None
        self.dataset: GroupDataset | None = None

    @property
    def examples(self):
        if self.store == "memory" or self._examples is not None:
            return super().examples
        from embedkit.data.store import open_rows

        rows = open_rows(self.sources, self.cache_dir, self.on_bad_row, self.max_examples, self.seed)
        for path, bad in rows.bad_rows.items():
            self.bad_rows.setdefault(path, []).extend(bad)
        self._examples = rows
        return rows

    def texts_of(self, example: dict) -> list[str]:
        return [example["query"], *example["pos"], *example.get("neg", ())]

    def vocab_texts(self):
        yield from super().vocab_texts()
        if self.query_instruction:
            yield self.query_instruction

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        if self.tokenizer is None:
            raise RuntimeError("call attach_tokenizer(tokenizer) before setup()")
        if self.store == "arrow":
            return self._setup_store()
        passage_index: dict[str, int] = {}
        for ex in self.examples:
            for text in (*ex["pos"], *ex.get("neg", ()), *ex.get("candidates", ())):
                passage_index.setdefault(text, len(passage_index))
        self.passage_texts = list(passage_index)   # row i of the passage table, for re-mining
        queries = tokenize_table([instructed_query(ex, self.query_instruction) for ex in self.examples],
                                 self.tokenizer, self.query_max_len, self.cache_dir)
        passages = tokenize_table(list(passage_index), self.tokenizer, self.passage_max_len,
                                  self.cache_dir)
        if self.train_group_size > len(passages):
            raise ValueError(f"train_group_size {self.train_group_size} exceeds the "
                             f"{len(passages)} distinct training passages")
        self.dataset = GroupDataset(self.examples, queries, passages, passage_index,
                                    self.train_group_size, self.seed)
        log.info("contrastive data: %d examples, %d unique passages, group size %d",
                 len(self.dataset), len(passages), self.train_group_size)

    def _setup_store(self) -> None:
        from embedkit.data.store import StoreRows, open_tokens

        rows = self.examples
        if not isinstance(rows, StoreRows):
            raise TypeError("data.store=arrow serves the rows of its own store; use_examples() was "
                            "given a list (share rows only between modules of the same store)")
        self.token_store = open_tokens(rows, self.tokenizer, self.query_max_len, self.passage_max_len,
                                       self.query_instruction, self.store_num_proc)
        passages = self.token_store.passages
        if self.train_group_size > len(passages):
            raise ValueError(f"train_group_size {self.train_group_size} exceeds the "
                             f"{len(passages)} distinct training passages")
        self.passage_texts = StorePassageTexts(rows, self.token_store)
        self.dataset = GroupDataset.from_store(self.token_store, self.train_group_size, self.seed)
        log.info("contrastive data (store %s): %d examples, %d unique passages, group size %d",
                 self.token_store.folder, len(self.dataset), len(passages), self.train_group_size)

    def batch_sampler(self) -> GroupBatchSampler:
        ds = self.dataset
        if self.token_store is not None:
            first_pos = self.token_store.first_pos()
        else:
            first_pos = np.array([p[0] for p in ds.pos])
        sampler = self.group_batch_sampler(ds.queries.lengths() + ds.passages.lengths()[first_pos],
                                           self.group_by_length)
        if self.no_duplicates:
            sampler.keys = self.duplicate_keys()
        if self.same_source_within_batch or self.source_weights is not None:
            self._sample_by_source(sampler)
        return sampler

    def _sample_by_source(self, sampler: GroupBatchSampler) -> None:
        """Batches from one file at a time (FlagEmbedding's same_dataset_within_batch: one global
        batch from one training file or dataset; a source made in Python is one file), each
        file's rows weighted by its source's `source_weights` entry."""
        files, sources = self.source_ids("file"), self.source_ids("source")
        n_files = int(files.max()) + 1
        source_of = np.zeros(n_files, dtype=np.int64)
        source_of[files] = sources
        weights = self.source_weights or [1.0] * len(self.sources)
        sampler.sources = files
        sampler.source_weights = [weights[s] for s in source_of]
        sampler.same_source = self.same_source_within_batch
        if not self.same_source_within_batch:
            return
        # A file with fewer rows per epoch than one global batch would never be trained on.
        size = sampler.batch_size * sampler.num_replicas
        counts = np.bincount(files, minlength=n_files)
        for f, (n, w) in enumerate(zip(counts, sampler.source_weights)):
            if n and w > 0 and round(n * w) < size:
                s = int(source_of[f])
                which = f"file {f - int(np.flatnonzero(source_of == s)[0])} of " if (source_of == s).sum() > 1 else ""
                raise ValueError(
                    f"{which}data.sources[{s}] gives {round(n * w)} rows per epoch, fewer than one "
                    f"global batch of {size}: with same_source_within_batch it is never trained on; "
                    f"lower data.batch_size, raise its weight, or set data.same_source_within_batch=false")

    def duplicate_keys(self):
        """Per example, the ids of the texts that must not repeat within a batch: its query and
        its positives (a shared positive is an in-batch false negative). Hard negatives are left
        out: the same mined negative in two groups is a true negative for both rows. From the
        store, the ids are the texts' 64-bit hashes (sentence-transformers' NO_DUPLICATES_HASHED)."""
        if self.token_store is not None:
            return self.token_store.duplicate_keys()
        ids: dict[str, int] = {}
        return [frozenset(ids.setdefault(t, len(ids)) for t in (ex["query"], *ex["pos"]))
                for ex in self.examples]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_sampler=self.batch_sampler(),
                          collate_fn=GroupCollator(self.tokenizer.pad_token_id),
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)


class StorePassageTexts:
    """Distinct passage p's text, read from the store's rows on access (for re-mining)."""

    def __init__(self, rows, store):
        self.rows, self.store = rows, store

    def __len__(self) -> int:
        return len(self.store.pid_slot)

    def __getitem__(self, p: int) -> str:
        slot = int(self.store.pid_slot[p])
        row = int(np.searchsorted(self.store.slot_ptr, slot, side="right") - 1)
        r = self.rows.table[row]
        return (r["pos"] + r["neg"] + r["candidates"])[slot - int(self.store.slot_ptr[row])]
