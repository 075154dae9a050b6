"""Contrastive training data: (query, 1 positive, n negatives) groups, pre-tokenised, length-grouped.

Sampling follows FlagEmbedding's `AbsDataset`: per example and epoch, one positive is drawn from
`pos` and `train_group_size - 1` negatives from `neg` without replacement (the list is tiled when it
is too short). Weak pairs carry no negatives; then the group is filled with random passages of the
training set, the same back-fill FlagEmbedding's miner uses. Passages are flattened so that row
`i * train_group_size` is query i's positive, which is what the InfoNCE target assumes.

Every text is tokenised once and cached on disk, keyed by the tokenizer and the texts, so a sweep
tokenises once. Batches are padded to their own longest row, and `group_by_length` sorts rows by
length inside shuffled mega-batches to cut padding further. Everything is a pure function of the
seed and the epoch: two runs with the same seed see the same batches.
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from embedkit.data.base import TextDataModule
from embedkit.data.instructions import instructed_query

log = logging.getLogger(__name__)


@dataclass
class TokenTable:
    """Token ids of many texts, stored flat: row i is ids[offsets[i]:offsets[i+1]]."""

    ids: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def row(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i]:self.offsets[i + 1]]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def tokenize_table(texts: Sequence[str], tokenizer, max_length: int,
                   cache_dir: str | Path | None = None, chunk: int = 4096) -> TokenTable:
    """Tokenise `texts` once (with special tokens, truncated), reusing an on-disk cache if present."""
    key = hashlib.sha1()
    key.update(f"{type(tokenizer).__name__}/{max_length}/".encode())
    key.update("\n".join(sorted(tokenizer.get_vocab(), key=tokenizer.get_vocab().get)).encode())
    for t in texts:
        key.update(t.encode("utf-8"))
        key.update(b"\0")
    path = Path(cache_dir) / "tokens" / f"{key.hexdigest()[:20]}.npz" if cache_dir else None
    if path is not None and path.exists():
        with np.load(path, allow_pickle=False) as z:
            return TokenTable(z["ids"], z["offsets"])
    rows: list[list[int]] = []
    for start in range(0, len(texts), chunk):
        enc = tokenizer(list(texts[start:start + chunk]), truncation=True, max_length=max_length,
                        add_special_tokens=True)
        rows.extend(enc["input_ids"])
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in rows], out=offsets[1:])
    ids = np.fromiter((t for r in rows for t in r), dtype=np.int32, count=int(offsets[-1]))
    table = TokenTable(ids, offsets)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # A name of its own per writer: parallel jobs of a sweep (joblib) tokenise the same data
        # into the same cache, and a shared temp name made one's rename fail on the other's.
        tmp = path.with_name(f"{path.stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp.npz")
        np.savez(tmp, ids=table.ids, offsets=table.offsets)
        tmp.replace(path)  # atomic: a killed run never leaves half a cache file behind
    return table


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

    def __len__(self) -> int:
        return len(self.pos)

    def group(self, index: int, epoch: int) -> list[int]:
        rng = np.random.default_rng((self.seed, epoch, index))
        pos = self.pos[index]
        group = [pos[rng.integers(len(pos))]]
        need = self.group_size - 1
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

    def __getitem__(self, item: tuple[int, int]) -> tuple[np.ndarray, list[np.ndarray], int]:
        index, epoch = item
        return (self.queries.row(index), [self.passages.row(p) for p in self.group(index, epoch)],
                index)


class GroupBatchSampler(Sampler):
    """Fixed-size batches of (index, epoch), shuffled per epoch, optionally grouped by length.

    Under DDP each rank takes its contiguous slice of one global batch, so the cross-device pool of
    negatives comes from one shuffled batch, as in FlagEmbedding's same-dataset batching.
    """

    def __init__(self, lengths: np.ndarray, batch_size: int, seed: int, group_by_length: bool = True,
                 drop_last: bool = True, num_replicas: int = 1, rank: int = 0, megabatch: int = 50,
                 keys: Sequence[frozenset] | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.lengths = lengths
        self.batch_size = batch_size
        self.seed = seed
        self.group_by_length = group_by_length
        self.drop_last = drop_last
        self.num_replicas = num_replicas
        self.rank = rank
        self.megabatch = megabatch
        self.keys = keys   # text ids per row: no two rows of a (global) batch share one
        self.epoch = 0
        self._skip: tuple[int, int] | None = None
        self._cached: tuple[int, list[np.ndarray]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip_batches(self, epoch: int, batches: int) -> None:
        """Resume mid-epoch: the next pass over `epoch` leaves out its first `batches` batches.

        Only that pass: later epochs, or a pass over another epoch, are whole. `len()` keeps the
        full epoch's count, as Lightning expects (its loop counts the resumed batches itself).
        """
        self._skip = (int(epoch), int(batches)) if batches > 0 else None

    @property
    def sampler(self):
        # Lightning calls set_epoch on `dataloader.sampler` and `dataloader.batch_sampler.sampler`,
        # never on the batch sampler itself; exposing ourselves here puts us on that path, so each
        # epoch gets a new order (and new negatives, and new masks).
        return self

    def global_batches(self) -> list[np.ndarray]:
        rng = np.random.default_rng((self.seed, self.epoch))
        order = rng.permutation(len(self.lengths))
        size = self.batch_size * self.num_replicas
        if self.group_by_length:
            span = size * self.megabatch
            order = np.concatenate([
                chunk[np.argsort(-self.lengths[chunk], kind="stable")]
                for chunk in np.array_split(order, range(span, len(order), span))
            ]) if len(order) else order
        if self.keys is not None:
            from embedkit.data.no_duplicates import pack_without_duplicates

            batches = pack_without_duplicates(order, self.keys, size)
            if self.drop_last or self.num_replicas > 1:
                batches = [b for b in batches if len(b) == size]
        else:
            batches = [order[i:i + size] for i in range(0, len(order), size)]
        if batches and len(batches[-1]) < size and (self.drop_last or self.num_replicas > 1):
            batches.pop()
        if self.group_by_length:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        batches = self.global_batches()
        if self._skip is not None and self._skip[0] == self.epoch:
            batches = batches[self._skip[1]:]
            self._skip = None
        for batch in batches:
            part = batch[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
            yield [(int(i), self.epoch) for i in part]

    def __len__(self) -> int:
        if self.keys is not None:   # packing may defer rows: count this epoch's batches
            if self._cached is None or self._cached[0] != self.epoch:
                self._cached = (self.epoch, self.global_batches())
            return len(self._cached[1])
        size = self.batch_size * self.num_replicas
        n = len(self.lengths)
        return n // size if (self.drop_last or self.num_replicas > 1) else -(-n // size)


def pad_rows(rows: Sequence[np.ndarray], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.from_numpy(r.astype(np.int64))
        mask[i, :len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask}


class GroupCollator:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items):
        queries = [q for q, _, _ in items]
        passages = [p for _, group, _ in items for p in group]
        # `index`: which examples the batch holds, for callbacks that track them (dynamic mining).
        return {"query": pad_rows(queries, self.pad_id), "passages": pad_rows(passages, self.pad_id),
                "index": torch.tensor([i for _, _, i in items], dtype=torch.long)}


class ContrastiveDataModule(TextDataModule):
    """Reads the configured sources, tokenises once, and serves (query, group) batches.

    `sources` are callables that return FlagEmbedding rows ({"query", "pos", "neg"}); Hydra builds
    them from `conf/data/*.yaml` so a recipe can mix People's Daily weak pairs and zh-mini files.
    """

    def __init__(self, sources: Sequence[Callable[[], list[dict]]], batch_size: int = 32,
                 train_group_size: int = 1, query_max_len: int = 32, passage_max_len: int = 128,
                 query_instruction: str | None = None, group_by_length: bool = True,
                 seed: int = 0, cache_dir: str | None = None, num_workers: int = 0,
                 max_examples: int | None = None, on_bad_row: str = "error",
                 no_duplicates: bool = False):
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
        self.dataset: GroupDataset | None = None

    def texts_of(self, example: dict) -> list[str]:
        return [example["query"], *example["pos"], *example.get("neg", ())]

    def vocab_texts(self) -> list[str]:
        texts = super().vocab_texts()
        return texts + [self.query_instruction] if self.query_instruction else texts

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        if self.tokenizer is None:
            raise RuntimeError("call attach_tokenizer(tokenizer) before setup()")
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

    def batch_sampler(self) -> GroupBatchSampler:
        ds = self.dataset
        first_pos = np.array([p[0] for p in ds.pos])
        sampler = self.group_batch_sampler(ds.queries.lengths() + ds.passages.lengths()[first_pos],
                                           self.group_by_length)
        if self.no_duplicates:
            sampler.keys = self.duplicate_keys()
        return sampler

    def duplicate_keys(self) -> list[frozenset]:
        """Per example, the ids of the texts that must not repeat within a batch: its query and
        its positives (a shared positive is an in-batch false negative). Hard negatives are left
        out: the same mined negative in two groups is a true negative for both rows."""
        ids: dict[str, int] = {}
        return [frozenset(ids.setdefault(t, len(ids)) for t in (ex["query"], *ex["pos"]))
                for ex in self.examples]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_sampler=self.batch_sampler(),
                          collate_fn=GroupCollator(self.tokenizer.pad_token_id),
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)
