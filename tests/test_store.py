"""The on-disk store (data.store=arrow) against the memory path: same batches on zh-mini, built
once and reused, bad rows by file:line, resume, hashed duplicates, ranks' slices."""

import json
import os
from functools import partial

import numpy as np
import pytest

from helpers import DATA, TASK_SOURCES, store_epochs as _epochs, store_module as _module, store_task_tokenizer
from embedkit.data.contrastive import ContrastiveDataModule
from embedkit.data.sources import zh_mini_jsonl
from embedkit.data.store import text_hash
from embedkit.models.vocab import build_char_vocab, save_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return store_task_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize("kw", [{}, {"group_by_length": False, "no_duplicates": False},
                                {"train_group_size": 1, "max_examples": 2000}])
def test_the_store_gives_the_memory_paths_batches_on_zh_mini(tok, tmp_path, kw):
    memory = _module(tok, tmp_path / "m", store="memory", **kw)
    arrow = _module(tok, tmp_path / "a", store="arrow", **kw)
    assert len(arrow.dataset) == len(memory.dataset)
    assert len(arrow.dataset.passages) == len(memory.dataset.passages)
    a, m = _epochs(arrow), _epochs(memory)
    assert len(a) == len(m) > 0
    assert a == m


def test_a_second_start_reuses_the_store_without_reading_the_files(tok, tmp_path, monkeypatch):
    _module(tok, tmp_path, store="arrow")
    import embedkit.data.readers as readers

    def boom(*a, **k):
        raise AssertionError("the files were read again")

    monkeypatch.setattr(readers, "iter_retrieval_jsonl", boom)
    dm = _module(tok, tmp_path, store="arrow")
    assert len(dm.dataset) == 3955 + 1914 + 501
    built = [p.name for p in (tmp_path / "store" / "tokens").iterdir() if p.suffix != ".lock"]
    assert len(built) == 1 and not built[0].endswith(".tmp")   # one tokenised store, no leftovers


def test_a_changed_file_is_a_new_store(tok, tmp_path):
    f = tmp_path / "train" / "a.jsonl"
    f.parent.mkdir()
    rows = [{"query": f"问{i}", "pos": [f"答{i}"]} for i in range(40)]
    f.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    src = [partial(zh_mini_jsonl, data_dir=str(tmp_path), file="train/a.jsonl")]
    first = _module(tok, tmp_path / "c", sources=src, store="arrow", train_group_size=1)
    f.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows[:32]), encoding="utf-8")
    os.utime(f, ns=(1, 1))
    second = _module(tok, tmp_path / "c", sources=src, store="arrow", train_group_size=1)
    assert (len(first.dataset), len(second.dataset)) == (40, 32)


def test_bad_rows_name_file_and_line_or_are_counted(tok, tmp_path):
    from embedkit.data.readers import BadRowError

    f = tmp_path / "train" / "bad.jsonl"
    f.parent.mkdir()
    good = [json.dumps({"query": f"问{i}", "pos": [f"答{i}"]}, ensure_ascii=False) for i in range(40)]
    f.write_text("\n".join(good[:5] + ['{"query": "问", "pos": []}'] + good[5:]), encoding="utf-8")
    src = [partial(zh_mini_jsonl, data_dir=str(tmp_path), file="train/bad.jsonl")]
    with pytest.raises(BadRowError, match=r"bad\.jsonl:6: 'pos' is an empty list"):
        _module(tok, tmp_path / "c", sources=src, store="arrow", train_group_size=1)
    dm = _module(tok, tmp_path / "c", sources=src, store="arrow", train_group_size=1, on_bad_row="skip")
    assert len(dm.dataset) == 40
    assert dm.bad_rows == {str(f): [(6, "'pos' is an empty list")]}
    again = _module(tok, tmp_path / "c", sources=src, store="arrow", train_group_size=1, on_bad_row="skip")
    assert again.bad_rows == dm.bad_rows   # a cached start still reports them (results.json)


def test_duplicate_keys_are_the_hashes_of_query_and_positives(tok, tmp_path):
    rows = [{"query": "甲", "pos": ["乙", "丙"]}, {"query": "丁", "pos": ["甲"]}]
    dm = _module(tok, tmp_path, sources=[lambda: rows * 20], store="arrow", train_group_size=1,
                 batch_size=2)
    keys = dm.duplicate_keys()
    assert keys[0] == text_hash(["甲", "乙", "丙"]).tolist()
    assert keys[1] == text_hash(["丁", "甲"]).tolist()
    assert len(keys) == 40
    # every row repeats 20 times: no batch of 2 may pair a row with its copy, nor row 0 with row 1
    # (row 1's positive is row 0's query)
    assert dm.batch_sampler().global_batches() == []


def test_resume_and_rank_slices_from_the_store(tok, tmp_path):
    dm = _module(tok, tmp_path, store="arrow")
    full = [b for b in dm.batch_sampler()]
    dm.load_state_dict({"epoch": 0, "batches": 5})
    assert [b for b in dm.batch_sampler()] == full[5:]
    s = dm.batch_sampler()
    s.num_replicas, s.batch_size = 2, 8
    s0 = list(s)
    s.rank = 1
    s1 = list(s)
    assert [a + b for a, b in zip(s0, s1)] == full


def test_a_bad_store_setting_is_named(tok):
    with pytest.raises(ValueError, match="data.store must be one of"):
        ContrastiveDataModule([], store="parquet")
    dm = ContrastiveDataModule(TASK_SOURCES, store="arrow", cache_dir=None)
    with pytest.raises(ValueError, match="data.cache_dir"):
        dm.examples


def _scored_file(tmp_path, n=60):
    """A jsonl file of n rows, the even ones with teacher scores (pos_scores / neg_scores), and
    its source: rows share negatives so that passage ids are shared and deduplicated."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        row = {"query": f"问题{i}", "pos": [f"答案{i}", f"回答{i}"],
               "neg": [f"错误{(i + k) % 17}" for k in range(3)]}
        if i % 2 == 0:
            row["pos_scores"] = [round(float(x), 3) for x in rng.normal(3, 1, 2)]
            row["neg_scores"] = [round(float(x), 3) for x in rng.normal(0, 1, 3)]
        rows.append(row)
    f = tmp_path / "train" / "scored.jsonl"
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    return rows, [partial(zh_mini_jsonl, data_dir=str(tmp_path), file="train/scored.jsonl")]


def _collated_scores(dm, epochs=(0, 1)):
    out = []
    for epoch in epochs:
        ds = dm.dataset
        for i in range(len(ds)):
            item = ds[(i, epoch)]
            out.append(item[3])
        loader = dm.train_dataloader()
        loader.batch_sampler.set_epoch(epoch)
        for batch in loader:
            ts = batch.get("teacher_scores")
            out.append(None if ts is None else ts.tolist())
    return out


def test_both_stores_serve_the_same_teacher_scores(tok, tmp_path):
    rows, src = _scored_file(tmp_path)
    kw = dict(sources=src, train_group_size=3, batch_size=4, no_duplicates=False, query_instruction="")
    memory = _module(tok, tmp_path / "m", store="memory", **kw)
    arrow = _module(tok, tmp_path / "a", store="arrow", **kw)
    m, a = _collated_scores(memory), _collated_scores(arrow)
    assert m == a
    # each drawn member's score is the one the file gives that text, positive first
    ds = arrow.dataset
    for i in range(0, len(rows), 2):
        group = ds.group(i, 0)
        texts = [arrow.passage_texts[p] for p in group]
        by_text = {**dict(zip(rows[i]["pos"], rows[i]["pos_scores"]))}
        want = [by_text[texts[0]]] + [dict(zip(rows[i]["neg"], rows[i]["neg_scores"]))[t] for t in texts[1:]]
        assert ds[(i, 0)][3] == want
        assert ds[(i + 1, 0)][3] is None   # odd rows have none
    assert arrow.examples[0]["pos_scores"] == rows[0]["pos_scores"]
    assert "pos_scores" not in arrow.examples[1]
    # a batch holding an unscored row carries no teacher_scores; one of scored rows only does
    batches = _collated_scores(arrow, epochs=(0,))[len(rows):]
    assert any(b is None for b in batches)
    collate = arrow.train_dataloader().collate_fn
    batch = collate([ds[(i, 0)] for i in (0, 2, 4)])
    assert batch["teacher_scores"].shape == (3, 3) and str(batch["teacher_scores"].dtype) == "torch.float64"
    assert batch["teacher_scores"].tolist() == [ds[(i, 0)][3] for i in (0, 2, 4)]
    assert "teacher_scores" not in collate([ds[(i, 0)] for i in (0, 1)])


@pytest.mark.parametrize("store", ["memory", "arrow"])
def test_misaligned_teacher_scores_are_named(tok, tmp_path, store):
    f = tmp_path / "train" / "bad_scores.jsonl"
    f.parent.mkdir()
    f.write_text(json.dumps({"query": "问", "pos": ["答"], "neg": ["错", "误"], "pos_scores": [1.0],
                             "neg_scores": [0.5]}, ensure_ascii=False), encoding="utf-8")
    src = [partial(zh_mini_jsonl, data_dir=str(tmp_path), file="train/bad_scores.jsonl")]
    with pytest.raises(ValueError, match=r"`neg_scores` must be a list of 2 numbers, one per `neg` text"):
        _module(tok, tmp_path / "c", sources=src, store=store, train_group_size=2, no_duplicates=False)
