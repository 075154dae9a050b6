"""No text twice in a contrastive batch (in-batch false negatives), on a worked case and on
zh-mini's CMRC pairs, whose rows share passages."""

import json

import numpy as np
import pytest

from helpers import DATA
from embedkit.data.contrastive import ContrastiveDataModule
from embedkit.data.no_duplicates import pack_without_duplicates


def test_worked_case_defers_conflicting_rows():
    keys = [frozenset(k) for k in ({1, 2}, {3, 2}, {4, 5}, {6, 7}, {8, 9}, {3, 10})]
    batches = pack_without_duplicates(np.arange(6), keys, size=2)
    # row 1 shares text 2 with row 0 -> deferred; row 5 shares 3 with row 1 -> next batch.
    assert [b.tolist() for b in batches] == [[0, 2], [1, 3], [4, 5]]


def test_without_conflicts_batches_are_the_plain_slices():
    order = np.random.default_rng(0).permutation(10)
    keys = [frozenset({i}) for i in range(10)]
    assert [b.tolist() for b in pack_without_duplicates(order, keys, 4)] == [
        order[:4].tolist(), order[4:8].tolist(), order[8:].tolist()]


def test_every_row_appears_once_and_batches_are_disjoint():
    rng = np.random.default_rng(1)
    keys = [frozenset(rng.integers(0, 30, size=2).tolist()) for _ in range(200)]
    batches = pack_without_duplicates(rng.permutation(200), keys, 8)
    assert sorted(i for b in batches for i in b.tolist()) == list(range(200))
    for b in batches:
        texts = [t for i in b for t in keys[i]]
        assert len(texts) == len(set(texts))


@pytest.mark.parametrize("vocab", [60, 5_000, 10**9])
def test_the_hashed_fast_path_packs_exactly_as_the_loop(vocab):
    """HashedKeys (the store's CSR keys) take a numpy check per batch instead of the loop when
    nothing is deferred; with few (vocab 60: many conflicts), some or no shared texts (and rows
    whose query equals their positive), the batches equal the loop's on the same keys as sets."""
    from embedkit.data.store import HashedKeys

    rng = np.random.default_rng(vocab % 97)
    n = 3_000
    per_row = rng.integers(1, 4, n)
    ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(per_row, out=ptr[1:])
    values = rng.integers(0, vocab, int(ptr[-1])).astype(np.int64)
    values[ptr[:-1][::50] + 0] = values[np.minimum(ptr[:-1][::50] + 1, len(values) - 1)]   # self-duplicates
    hashed = HashedKeys(values, ptr)
    as_sets = [frozenset(hashed[i]) for i in range(n)]
    order = rng.permutation(n)
    for size in (7, 64):
        fast = pack_without_duplicates(order, hashed, size)
        slow = pack_without_duplicates(order, as_sets, size)
        assert [b.tolist() for b in fast] == [b.tolist() for b in slow]


def _shared_positive_batches(module):
    module.setup()
    ex = module.examples
    count = 0
    for batch in module.batch_sampler():
        pos = [ex[i]["pos"][0] for i, _ in batch]
        count += len(pos) != len(set(pos))
    return count


@pytest.mark.parametrize("no_duplicates", [False, True])
def test_cmrc_batches_hold_no_shared_passage(no_duplicates):
    from embedkit.models.vocab import build_char_vocab, save_tokenizer
    import tempfile

    rows = [json.loads(l) for l in (DATA / "train" / "cmrc_pairs.jsonl").open(encoding="utf-8")]
    rows = [{"query": r["query"], "pos": r["pos"][:1]} for r in rows]
    tok = save_tokenizer(build_char_vocab([t for r in rows for t in (r["query"], *r["pos"])]),
                         tempfile.mkdtemp())
    module = ContrastiveDataModule(sources=[], batch_size=32, no_duplicates=no_duplicates, seed=0)
    module.use_examples(rows)
    module.attach_tokenizer(tok)
    shared = _shared_positive_batches(module)
    sampler = module.batch_sampler()
    assert len(list(sampler)) == len(sampler)
    if no_duplicates:
        assert shared == 0
        assert len(sampler) >= len(rows) // 32 - 2   # packing loses at most a few partial batches
    else:
        assert shared > 0   # CMRC rows share passages: the plain sampler does put them together


def _rescan_reference(order, keys, size):
    """The packing as first written: rescan every remaining row from the start for each batch."""
    remaining = dict.fromkeys(int(i) for i in order)
    batches = []
    while remaining:
        batch, seen = [], set()
        for idx in remaining:
            if seen.isdisjoint(keys[idx]):
                batch.append(idx)
                seen.update(keys[idx])
                if len(batch) == size:
                    break
        for idx in batch:
            del remaining[idx]
        batches.append(batch)
    return batches


@pytest.mark.parametrize("texts", [12, 40, 400])
def test_deferred_rows_packing_equals_the_rescan(texts):
    rng = np.random.default_rng(texts)
    keys = [frozenset(rng.integers(0, texts, size=rng.integers(1, 4)).tolist()) for _ in range(300)]
    order = rng.permutation(300)
    got = [b.tolist() for b in pack_without_duplicates(order, keys, 6)]
    assert got == _rescan_reference(order, keys, 6)
