"""Batches in which no text appears twice: in-batch false negatives removed at the source.

With in-batch negatives, a text that is the positive of two rows of one batch (zh-mini's CMRC rows
share their passage; several NLI rows share a premise) is scored as a negative of the other row:
a false negative that the loss pushes away. `pack_without_duplicates` fills each batch from the
(shuffled) order with the first rows none of whose texts the batch holds yet, deferring the others
to later batches, as sentence-transformers' `NoDuplicatesBatchSampler` does. Rows are only
reordered, never dropped, except that an incomplete last batch is returned as such (the caller
drops it under drop_last). When no two rows share a text the batches are exactly the order's
consecutive slices.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def pack_without_duplicates(order: np.ndarray, keys: Sequence, size: int) -> list[np.ndarray]:
    """Split `order` into batches of `size` rows whose `keys` (text ids per row) are disjoint.

    `keys[i]` is any iterable of hashable ids: a frozenset of text ids (the memory path) or the
    texts' 64-bit hashes (the store, `embedkit.data.store.HashedKeys`). Each batch takes, in
    order, the deferred rows and then the order's next rows; a conflicting row is deferred.
    Holding only the deferred rows (not a copy of the whole order) keeps this O(rows) in time
    and memory at C-MTP scale."""
    order = np.asarray(order, dtype=np.int64)
    pending: list[int] = []
    batches, pos, n = [], 0, len(order)
    flat = hasattr(keys, "values") and hasattr(keys, "ptr")   # HashedKeys: one CSR array
    while pending or pos < n:
        if flat and not pending:
            # The common case at C-MTP scale: nothing deferred and the next batches' rows share no
            # key, so the loop below would take exactly the order's next slices; checked in numpy
            # for a window of batches at once (the Python loop costs ~60 s per epoch at 10M rows).
            # The first batch with any shared key (even within one row) goes to the loop.
            clean = _conflict_free_batches(order, keys, pos, size)
            batches.extend(order[pos + i * size:pos + (i + 1) * size].copy() for i in range(clean))
            pos += clean * size
            if clean:
                continue
        batch, seen, deferred = [], set(), []
        for j, idx in enumerate(pending):
            k = keys[idx]
            if seen.isdisjoint(k):
                batch.append(idx)
                seen.update(k)
                if len(batch) == size:
                    deferred.extend(pending[j + 1:])
                    break
            else:
                deferred.append(idx)
        while len(batch) < size and pos < n:
            idx = int(order[pos])
            pos += 1
            k = keys[idx]
            if seen.isdisjoint(k):
                batch.append(idx)
                seen.update(k)
            else:
                deferred.append(idx)
        pending = deferred
        # A short batch means the rest conflict with it or are too few; they start the next one.
        batches.append(np.asarray(batch, dtype=np.int64))
    return batches


def _conflict_free_batches(order: np.ndarray, keys, pos: int, size: int, window: int = 64) -> int:
    """How many of the (up to `window`) full batches order[pos:pos+size], ... have no key twice."""
    m = min(window, (len(order) - pos) // size)
    if m == 0:
        return 0
    rows = order[pos:pos + m * size]
    begin = keys.ptr[rows]
    counts = keys.ptr[rows + 1] - begin
    total = int(counts.sum())
    vals = keys.values[np.repeat(begin - np.cumsum(counts) + counts, counts) + np.arange(total)]
    batch = np.repeat(np.arange(len(rows)) // size, counts)
    # One sort of the keys salted by their batch: a key twice in one batch is equal twice; equal
    # salted keys from different batches (a 2^-64 coincidence) only send a batch to the exact loop.
    salted = np.sort(vals ^ (batch * np.int64(-7046029254386353131)))
    if not (salted[1:] == salted[:-1]).any():
        return m
    by = np.lexsort((vals, batch))   # rare: which batch holds the first shared key
    v, b = vals[by], batch[by]
    twice = (v[1:] == v[:-1]) & (b[1:] == b[:-1])
    return int(b[1:][twice].min()) if twice.any() else m
