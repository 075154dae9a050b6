"""The contrastive data module: group layout, negative sampling, padding, determinism."""

from functools import partial

import numpy as np
import pytest
import torch

from embedkit.data.batching import GroupBatchSampler
from embedkit.data.contrastive import ContrastiveDataModule
from embedkit.models.vocab import build_char_vocab, save_tokenizer

ROWS = [
    {"query": f"问题{i}", "pos": [f"答案{i}甲", f"答案{i}乙"], "neg": [f"错误{i}{j}" for j in range(i % 3)]}
    for i in range(40)
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [r["query"] for r in ROWS] + [t for r in ROWS for t in r["pos"] + r["neg"]] + ["为检索："]
    return save_tokenizer(build_char_vocab(texts), tmp_path_factory.mktemp("tok"))


def _module(tokenizer, tmp_path=None, **kw):
    args = dict(batch_size=8, train_group_size=3, seed=7, cache_dir=str(tmp_path) if tmp_path else None)
    args.update(kw)
    dm = ContrastiveDataModule([lambda: ROWS], **args)
    dm.attach_tokenizer(tokenizer)
    dm.setup()
    return dm


def _decode(tokenizer, ids, mask):
    return tokenizer.decode(ids[mask.bool()], skip_special_tokens=True).replace(" ", "")


def test_group_layout_positive_first_then_own_negatives_or_fill(tokenizer):
    dm = _module(tokenizer)
    batch = next(iter(dm.train_dataloader()))
    q, p = batch["query"], batch["passages"]
    assert p["input_ids"].shape[0] == 3 * q["input_ids"].shape[0]
    by_query = {r["query"]: r for r in ROWS}
    all_pos = {t for r in ROWS for t in r["pos"]}
    for i in range(q["input_ids"].shape[0]):
        row = by_query[_decode(tokenizer, q["input_ids"][i], q["attention_mask"][i])]
        group = [_decode(tokenizer, p["input_ids"][3 * i + j], p["attention_mask"][3 * i + j]) for j in range(3)]
        assert group[0] in row["pos"]
        for text in group[1:]:
            if row["neg"]:
                assert text in row["neg"]          # tiled from the row's own negatives
            else:
                assert text not in row["pos"]      # random fill never takes the row's positives
                assert text in all_pos or text.startswith("错误")


def test_instruction_goes_to_queries_only(tokenizer):
    dm = _module(tokenizer, query_instruction="为检索：")
    batch = next(iter(dm.train_dataloader()))
    q = _decode(tokenizer, batch["query"]["input_ids"][0], batch["query"]["attention_mask"][0])
    p = _decode(tokenizer, batch["passages"]["input_ids"][0], batch["passages"]["attention_mask"][0])
    assert q.startswith("为检索：问题")
    assert not p.startswith("为检索")


def test_a_row_prompt_replaces_the_instruction_and_empty_means_none(tokenizer):
    # BGE instructs retrieval queries only: symmetric sources carry prompt "" (FlagEmbedding's
    # per-row instruction), and a row's own prompt wins over the data config's instruction.
    plain = [dict(r, prompt="") for r in ROWS[:20]]
    own = [dict(r, prompt="检索：") for r in ROWS[20:30]]
    rows = plain + own + ROWS[30:]
    dm = ContrastiveDataModule([lambda: rows], batch_size=8, train_group_size=1, seed=7,
                               query_instruction="为检索：", group_by_length=False)
    dm.attach_tokenizer(tokenizer)
    dm.setup()
    seen = {}
    for batch in dm.train_dataloader():
        q = batch["query"]
        for ids, mask in zip(q["input_ids"], q["attention_mask"]):
            text = _decode(tokenizer, ids, mask)
            seen[text.split("问题")[1]] = text.split("问题")[0]
    assert seen and all(seen[str(i)] == "" for i in range(20) if str(i) in seen)
    assert all(seen[str(i)] == "检索：" for i in range(20, 30) if str(i) in seen)
    assert all(seen[str(i)] == "为检索：" for i in range(30, 40) if str(i) in seen)
    assert {k for k in seen} & {str(i) for i in range(20)} and {k for k in seen} & {str(i) for i in range(30, 40)}


def test_zh_mini_source_stamps_its_prompt(tmp_path):
    import json

    from embedkit.data.sources import zh_mini_jsonl

    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "f.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in [
        {"query": "甲", "pos": ["乙"]}, {"query": "丙", "pos": ["丁"], "prompt": "自带："}]), encoding="utf-8")
    rows = zh_mini_jsonl(str(tmp_path), "train/f.jsonl", prompt="")
    assert [r["prompt"] for r in rows] == ["", "自带："]
    assert "prompt" not in zh_mini_jsonl(str(tmp_path), "train/f.jsonl")[0]


def test_dynamic_padding_pads_to_longest_in_batch(tokenizer):
    dm = _module(tokenizer)
    for batch in dm.train_dataloader():
        mask = batch["passages"]["attention_mask"]
        assert mask.sum(1).max() == mask.shape[1]
        assert (batch["passages"]["input_ids"][mask == 0] == tokenizer.pad_token_id).all()


def test_same_seed_same_batches_and_epochs_differ(tokenizer, tmp_path):
    a, b = _module(tokenizer, tmp_path), _module(tokenizer, tmp_path)   # b reads the token cache
    assert list(tmp_path.glob("tokens/*.npz"))
    la, lb = a.train_dataloader(), b.train_dataloader()
    first = [x["passages"]["input_ids"] for x in la]
    assert all(torch.equal(x, y["passages"]["input_ids"]) for x, y in zip(first, lb))
    la.batch_sampler.set_epoch(1)
    second = [x["passages"]["input_ids"] for x in la]
    assert any(x.shape != y.shape or not torch.equal(x, y) for x, y in zip(first, second))


def test_sampler_drops_last_partial_batch_and_covers_each_example_once():
    sampler = GroupBatchSampler(np.arange(43), batch_size=8, seed=0, group_by_length=True)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 5
    seen = [i for b in batches for i, _ in b]
    assert len(seen) == len(set(seen)) == 40


def test_length_grouping_reduces_padding():
    lengths = np.random.default_rng(0).integers(5, 100, size=4000)
    def padding(group):
        s = GroupBatchSampler(lengths, 32, seed=0, group_by_length=group)
        return sum(len(b) * lengths[[i for i, _ in b]].max() - lengths[[i for i, _ in b]].sum() for b in s)
    assert padding(True) < 0.5 * padding(False)


def test_ranks_take_disjoint_slices_of_one_global_batch():
    lengths = np.arange(64)
    r0 = list(GroupBatchSampler(lengths, 8, seed=3, num_replicas=2, rank=0))
    r1 = list(GroupBatchSampler(lengths, 8, seed=3, num_replicas=2, rank=1))
    assert len(r0) == len(r1) == 4
    for a, b in zip(r0, r1):
        assert not {i for i, _ in a} & {i for i, _ in b}


def test_clear_errors_for_impossible_settings(tokenizer):
    with pytest.raises(ValueError, match="larger than the 40 training examples"):
        _module(tokenizer, batch_size=64).train_dataloader()
    with pytest.raises(ValueError, match="train_group_size"):
        ContrastiveDataModule([lambda: ROWS], train_group_size=0)


def test_lightning_finds_set_epoch_on_the_batch_sampler(tokenizer):
    from lightning_fabric.utilities.data import _set_sampler_epoch

    loader = _module(tokenizer).train_dataloader()
    _set_sampler_epoch(loader, 3)
    assert loader.batch_sampler.epoch == 3


def _tokenize_into(tokenizer_dir, cache_dir, texts, barrier, results):
    from embedkit.data.batching import tokenize_table
    from embedkit.models.vocab import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    barrier.wait()   # every writer at the cache at once, as the jobs of a joblib sweep are
    try:
        results.put(tokenize_table(texts, tok, 16, cache_dir).ids.tolist())
    except Exception as err:   # noqa: BLE001 - reported to the test
        results.put(f"{type(err).__name__}: {err}")


def test_parallel_writers_share_the_token_cache_safely(tokenizer, tmp_path):
    # Two sweep jobs tokenising the same data wrote the same temp file, and one's rename failed.
    import multiprocessing as mp

    texts = [r["query"] for r in ROWS] * 200
    ctx = mp.get_context("fork")
    for attempt in range(3):
        cache = tmp_path / str(attempt)
        barrier, results = ctx.Barrier(4), ctx.Queue()
        procs = [ctx.Process(target=_tokenize_into, args=(tokenizer.name_or_path, str(cache), texts,
                                                          barrier, results)) for _ in range(4)]
        for proc in procs:
            proc.start()
        out = [results.get(timeout=60) for _ in procs]
        for proc in procs:
            proc.join(timeout=60)
        assert all(isinstance(o, list) for o in out), [o for o in out if not isinstance(o, list)]
        assert all(o == out[0] for o in out)
        left = sorted(p.name for p in (cache / "tokens").iterdir())
        assert len(left) == 1 and ".tmp" not in left[0], left
