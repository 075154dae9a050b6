"""Multi-source sampling (issue 17): one source per global batch (FlagEmbedding's
same_dataset_within_batch), per-source weights on an epoch's rows, on both stores; and the
vocabulary streamed over the training texts."""

import inspect
from collections import Counter
from functools import partial

import numpy as np
import pytest

from embedkit.data.batching import GroupBatchSampler
from helpers import TASK_SOURCES, store_epochs as _epochs, store_module as _module, store_task_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return store_task_tokenizer(tmp_path_factory.mktemp("tok"))


def _sampler(sources, **kw):
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 60, len(sources))
    args = dict(batch_size=4, seed=1, group_by_length=True, sources=np.asarray(sources))
    args.update(kw)
    return GroupBatchSampler(lengths, **args)


def test_without_options_the_batches_are_the_single_source_ones():
    """Giving source ids alone changes nothing: the order is the one permutation it always was."""
    sources = np.repeat([0, 1, 2], [40, 25, 15])
    plain = GroupBatchSampler(_sampler(sources).lengths, batch_size=4, seed=1)
    tagged = _sampler(sources)
    for epoch in (0, 3):
        plain.set_epoch(epoch), tagged.set_epoch(epoch)
        assert [b.tolist() for b in plain.global_batches()] == [b.tolist() for b in tagged.global_batches()]


@pytest.mark.parametrize("replicas", [1, 2])
def test_same_source_batches_hold_one_source_and_every_full_batch_of_each(replicas):
    sources = np.repeat([0, 1, 2], [40, 26, 17])
    s = _sampler(sources, same_source=True, num_replicas=replicas)
    size = 4 * replicas
    seen = Counter()
    for epoch in (0, 1):
        s.set_epoch(epoch)
        batches = s.global_batches()
        for b in batches:
            assert len(b) == size and len(set(sources[b])) == 1
        seen.update(int(sources[b[0]]) for b in batches)
        # each source gives its whole batches, its remainder dropped (drop_last)
        assert Counter(int(sources[b[0]]) for b in batches) == {0: 40 // size, 1: 26 // size, 2: 17 // size}
        rows = np.concatenate(batches)
        assert len(set(rows.tolist())) == len(rows)
    # the sources interleave (batches shuffled together), not one block per source
    order = [int(sources[b[0]]) for b in s.global_batches()]
    assert order != sorted(order)
    # each rank's slice of a global batch is from that batch's source
    if replicas == 2:
        s.rank = 1
        for part, b in zip(s, s.global_batches()):
            assert [i for i, _ in part] == b[4:].tolist()


def test_source_weights_scale_an_epochs_rows():
    sources = np.repeat([0, 1, 2], [40, 30, 20])
    s = _sampler(sources, source_weights=[0.5, 2.0, 0.0], batch_size=5)
    s.set_epoch(0)
    rows = np.concatenate(s.global_batches())
    per_source = Counter(int(sources[i]) for i in rows)
    assert per_source == {0: 20, 1: 60}   # 0.5 x 40, 2 x 30, none of source 2 (80 rows = 16 batches)
    counts = Counter(rows.tolist())
    assert all(counts[i] == 2 for i in range(40, 70))          # weight 2: two whole passes
    assert all(counts[i] <= 1 for i in range(40))              # weight 0.5: a draw without replacement
    s.set_epoch(1)
    other = {int(i) for i in np.concatenate(s.global_batches()) if sources[i] == 0}
    assert other != {int(i) for i in rows if sources[i] == 0}  # a fresh half each epoch


def test_bad_source_settings_are_named(tok, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="source_weights has 2 weight"):
        _module(tok, tmp_path, source_weights=[1.0, 1.0])
    with pytest.raises(ValueError, match=r"data.sources\[2\] gives .* fewer than one global batch"):
        dm = _module(tok, tmp_path, batch_size=16, same_source_within_batch=True,
                     source_weights=[1.0, 1.0, 0.01])
        dm.train_dataloader()
    with pytest.raises(ValueError, match="source weights or same-source"):
        GroupBatchSampler(np.ones(10), 2, 0, same_source=True)


@pytest.mark.parametrize("weights", [None, [1.0, 0.5, 1.5]])
def test_both_stores_give_the_same_same_source_batches_on_zh_mini(tok, tmp_path, weights):  # noqa: F811
    kw = dict(same_source_within_batch=True, source_weights=weights)
    memory = _module(tok, tmp_path / "m", **kw)
    arrow = _module(tok, tmp_path / "a", store="arrow", **kw)
    ids = memory.source_ids()
    assert np.array_equal(ids, arrow.source_ids())
    assert np.bincount(ids).tolist() == [len(memory.sources[s]()) for s in range(3)]
    got_m, got_a = _epochs(memory, limit=30), _epochs(arrow, limit=30)
    assert got_m == got_a
    for idx, _, _ in got_m:
        assert len(set(ids[idx].tolist())) == 1


def test_rows_shared_between_modules_keep_their_source_ids(tok, tmp_path):  # noqa: F811
    first = _module(tok, tmp_path)
    second = _module(tok, tmp_path, batch_size=8)
    second.use_examples(first.examples)
    assert np.array_equal(second.source_ids(), first.source_ids())


def test_the_vocabulary_streams_the_store_rows(tok, tmp_path):  # noqa: F811
    """vocab_texts is a stream (the store's rows are read as they are iterated), and a
    vocabulary built from the stream equals one built from the same texts as a list."""
    from embedkit.models.build import char_level_tokenizer
    from embedkit.models.vocab import TextStream

    arrow = _module(tok, tmp_path / "a", store="arrow")
    memory = _module(tok, tmp_path / "m")
    assert inspect.isgenerator(arrow.vocab_texts())
    texts = list(memory.vocab_texts())
    assert list(arrow.vocab_texts()) == texts
    calls = []

    def part():
        calls.append(1)
        return arrow.vocab_texts()

    streamed = char_level_tokenizer(TextStream([part]), tmp_path / "t1", min_freq=2)
    listed = char_level_tokenizer(texts, tmp_path / "t2", min_freq=2)
    assert streamed.get_vocab() == listed.get_vocab()
    assert len(calls) == 2   # one pass to hash, one to count
    cached = char_level_tokenizer(TextStream([part]), tmp_path / "t3", min_freq=2,
                                  cache_dir=tmp_path / "c")
    calls.clear()
    again = char_level_tokenizer(TextStream([part]), tmp_path / "t4", min_freq=2, cache_dir=tmp_path / "c")
    assert len(calls) == 1 and again.get_vocab() == cached.get_vocab()   # a cache hit only hashes


def test_a_pretrained_tokenizer_reads_no_text(tmp_path):
    from embedkit.models.build import pretrained_tokenizer
    from embedkit.models.vocab import TextStream, build_char_vocab, save_tokenizer

    def part():
        raise AssertionError("a checkpoint's tokenizer must not stream the training texts")

    save_tokenizer(build_char_vocab(["你好世界"]), tmp_path / "ckpt")
    tk = pretrained_tokenizer(str(tmp_path / "ckpt"), texts=TextStream([part]))
    assert tk("你好")["input_ids"]


def test_a_glob_source_batches_by_file_on_both_stores(tok, tmp_path):  # noqa: F811
    """C-MTP comes as one glob of many files: same-source batches are per file, as FlagEmbedding
    takes one global batch from one training file; weights are per configured source."""
    import json

    from embedkit.data.sources import jsonl_files

    path = f"{TASK_SOURCES[0].keywords['data_dir']}/train/nli_triplets.jsonl"
    rows = [json.loads(line) for line in open(path, encoding="utf-8")][:300]
    folder = tmp_path / "cmtp"
    folder.mkdir()
    for k, part in enumerate((rows[:180], rows[180:])):
        with open(folder / f"part{k}.jsonl", "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in part)
    sources = [partial(jsonl_files, pattern=str(folder / "*.jsonl")), TASK_SOURCES[2]]
    kw = dict(sources=sources, same_source_within_batch=True, batch_size=8, train_group_size=2)
    memory = _module(tok, tmp_path / "m", **kw)
    arrow = _module(tok, tmp_path / "a", store="arrow", **kw)
    files = memory.source_ids("file")
    assert np.array_equal(files, arrow.source_ids("file"))
    assert np.bincount(files).tolist()[:2] == [180, 120]
    assert np.array_equal(memory.source_ids(), (files >= 2).astype(files.dtype))
    got = _epochs(memory, limit=40)
    assert got == _epochs(arrow, limit=40)
    assert {len(set(files[idx].tolist())) for idx, _, _ in got} == {1}
    assert len({int(files[idx[0]]) for idx, _, _ in got}) == 3
