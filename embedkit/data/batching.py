"""Batching shared by every training data module: token tables, the batch sampler, padding.

- `TokenTable` / `tokenize_table`: every text tokenised once (with special tokens, truncated) and
  cached on disk, keyed by the tokenizer and the texts, so a sweep tokenises once.
- `GroupBatchSampler`: fixed-size batches of (example index, epoch), shuffled per epoch, optionally
  grouped by length inside shuffled mega-batches to cut padding; under DDP each rank takes its slice
  of one global batch. A pure function of the seed and the epoch: two runs with the same seed see
  the same batches, and a resumed run skips the batches its checkpoint had consumed.
- `pad_rows`: a batch padded to its own longest row.

The contrastive (embedkit/data/contrastive.py), STS (sts.py) and RetroMAE (mlm.py) data modules
build on these, and dynamic hard-negative mining (embedkit/mining/dynamic.py) pads with them.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

__all__ = ["TokenTable", "tokenize_table", "GroupBatchSampler", "pad_rows"]


@dataclass
class TokenTable:
    """Token ids of many texts, stored flat: row i is ids[offsets[i]:offsets[i+1]]."""

    ids: np.ndarray
    offsets: np.ndarray

    def _cache_key(self) -> tuple:
        """What this epoch's packed batches depend on besides the data."""
        return (self.epoch, self.seed, self.batch_size, self.num_replicas, id(self.keys), id(self.sources),
                self.same_source, tuple(self.source_weights or ()), self.group_by_length, self.drop_last)

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


class GroupBatchSampler(Sampler):
    """Fixed-size batches of (index, epoch), shuffled per epoch, optionally grouped by length.

    Under DDP each rank takes its contiguous slice of one global batch, so the cross-device pool of
    negatives comes from one shuffled batch, as in FlagEmbedding's same-dataset batching.
    """

    def __init__(self, lengths: np.ndarray, batch_size: int, seed: int, group_by_length: bool = True,
                 drop_last: bool = True, num_replicas: int = 1, rank: int = 0, megabatch: int = 50,
                 keys: Sequence[frozenset] | None = None, sources: np.ndarray | None = None,
                 source_weights: Sequence[float] | None = None, same_source: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        # Multi-source sampling (C-Pack / BGE-M3 mix several corpora): `sources` is each row's
        # source id; `source_weights[s]` scales how many of source s's rows an epoch draws (1: each
        # row once; 0.5: a fresh half; 2.5: two passes and a half); `same_source` makes every global
        # batch draw from one source (FlagEmbedding's same_dataset_within_batch), the batches of all
        # sources then shuffled together (sentence-transformers' PROPORTIONAL). Without either, the
        # order is the single permutation it always was.
        self.sources = None if sources is None else np.asarray(sources, dtype=np.int64)
        self.source_weights = None if source_weights is None else [float(w) for w in source_weights]
        self.same_source = bool(same_source)
        if (self.source_weights is not None or self.same_source) and self.sources is None:
            raise ValueError("source weights or same-source batches need each row's source id")
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
        self._cached: tuple[tuple, list[np.ndarray]] | None = None

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
        if self.sources is None or (self.source_weights is None and not self.same_source):
            return self._batches(rng.permutation(len(self.lengths)), rng, shuffle=self.group_by_length)
        picks = [self._epoch_rows(np.flatnonzero(self.sources == s), w, rng)
                 for s, w in enumerate(self._weights())]
        if not self.same_source:
            order = np.concatenate(picks)
            return self._batches(order[rng.permutation(len(order))], rng, shuffle=self.group_by_length)
        batches = [b for pick in picks for b in self._batches(pick, rng, shuffle=False)]
        return [batches[i] for i in rng.permutation(len(batches))]

    def _weights(self) -> list[float]:
        n_sources = int(self.sources.max()) + 1 if len(self.sources) else 0
        weights = self.source_weights if self.source_weights is not None else [1.0] * n_sources
        if len(weights) < n_sources:
            raise ValueError(f"data.source_weights has {len(weights)} weight(s) for {n_sources} sources")
        if any(w < 0 for w in weights):
            raise ValueError(f"data.source_weights must be >= 0, got {weights}")
        return list(weights)

    @staticmethod
    def _epoch_rows(ids: np.ndarray, weight: float, rng) -> np.ndarray:
        """round(weight * len(ids)) of a source's rows, shuffled: whole passes, then a draw
        without replacement for the fraction."""
        whole, frac = divmod(weight, 1.0)
        parts = [ids[rng.permutation(len(ids))] for _ in range(int(whole))]
        extra = int(round(frac * len(ids)))
        if extra:
            parts.append(ids[rng.choice(len(ids), extra, replace=False)])
        return np.concatenate(parts) if parts else ids[:0]

    def _batches(self, order: np.ndarray, rng, shuffle: bool) -> list[np.ndarray]:
        """`order` cut into global batches: length-grouped within mega-batches, packed without
        duplicates, incomplete ones dropped, and (`shuffle`) the batches shuffled."""
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
        if shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        # len() (Lightning asks first) may have packed this epoch already: the same batches.
        if self._cached is not None and self._cached[0] == self._cache_key():
            batches = self._cached[1]
        else:
            batches = self.global_batches()
        if self._skip is not None and self._skip[0] == self.epoch:
            batches = batches[self._skip[1]:]
            self._skip = None
        for batch in batches:
            part = batch[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
            yield [(int(i), self.epoch) for i in part]

    def _cache_key(self) -> tuple:
        """What this epoch's packed batches depend on besides the data."""
        return (self.epoch, self.seed, self.batch_size, self.num_replicas, id(self.keys), id(self.sources),
                self.same_source, tuple(self.source_weights or ()), self.group_by_length, self.drop_last)

    def __len__(self) -> int:
        if self.keys is not None or self.sources is not None:   # count this epoch's batches
            if self._cached is None or self._cached[0] != self._cache_key():
                self._cached = (self._cache_key(), self.global_batches())
            return len(self._cached[1])
        size = self.batch_size * self.num_replicas
        n = len(self.lengths)
        return n // size if (self.drop_last or self.num_replicas > 1) else -(-n // size)


def pad_rows(rows: Sequence[np.ndarray], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    # Filled in numpy and handed to torch once: a torch copy per row costs ~5x more per batch.
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
        mask[i, :len(r)] = 1
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
