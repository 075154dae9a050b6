"""ANN hard-negative mining on a corpus whose neighbour order is known by construction."""

import json

import numpy as np
import pytest

from embedkit.mining.ann import HardNegativeMiner, mine_from_embeddings, parse_range

# Ten pool texts on the unit circle at 0°, 10°, ..., 90°: a query at 0° ranks them p0, p1, ..., p9.
POOL = [f"p{i}" for i in range(10)]
POOL_VECS = np.stack([[np.cos(np.radians(10 * i)), np.sin(np.radians(10 * i))] for i in range(10)]).astype(np.float32)
QUERY_VEC = np.array([[1.0, 0.0]], dtype=np.float32)


def _mine(row, **kw):
    out, report = mine_from_embeddings([row], QUERY_VEC, POOL, POOL_VECS, use_gpu=False, **kw)
    return out[0], report


@pytest.mark.parametrize("index", ["flat", "ivf"])
def test_negatives_come_from_the_rank_range_and_never_a_positive(index):
    row = {"query": "q", "pos": ["p3"], "neg": ["old"]}
    for seed in range(20):
        new, report = _mine(row, range_for_sampling="2-6", negative_number=2, seed=seed, index=index,
                            nlist=1)
        # slice [2:6] = p2..p5, minus the positive p3
        assert set(new["neg"]) <= {"p2", "p4", "p5"} and len(set(new["neg"])) == 2
        assert (report.mined, report.dropped, report.filled) == (2, 1, 0)
    assert new["pos"] == ["p3"] and "old" not in new["neg"]   # the input's neg is replaced


def test_the_query_text_is_excluded_and_a_shortfall_is_filled_from_the_pool():
    row = {"query": "p2", "pos": ["p3"], "neg": []}
    new, report = _mine(row, range_for_sampling="2-6", negative_number=5, seed=0)
    mined = {"p4", "p5"}                                       # p2 is the query, p3 the positive
    assert mined <= set(new["neg"]) and len(new["neg"]) == 5 == len(set(new["neg"]))
    assert not {"p2", "p3"} & set(new["neg"])
    assert (report.mined, report.dropped, report.filled, report.short_rows) == (2, 2, 3, 1)


def test_near_duplicates_are_dropped_and_the_clean_ranking_is_kept():
    row = {"query": "q", "pos": ["p1"], "neg": []}
    # cos(10°) = 0.985, cos(20°) = 0.940: a 0.95 threshold drops p0 (1.0) too, which rank 0 holds
    new, report = _mine(row, range_for_sampling="0-4", negative_number=4, near_dup_threshold=0.95,
                        keep_candidates=4)
    assert report.dropped_near_dup == 1 and report.dropped == 2   # p0 (near-dup) and p1 (positive)
    assert {"p2", "p3"} <= set(new["neg"]) and "p0" not in new["neg"] and "p1" not in new["neg"]
    assert new["candidates"] == ["p0", "p2", "p3", "p4"]          # rank order, positive removed


def test_parse_range_accepts_flagembedding_strings_and_rejects_bad_ones():
    assert parse_range("10-210") == (10, 210) and parse_range([2, 200]) == (2, 200)
    for bad in ("10", "a-b", "20-10", "5-5"):
        with pytest.raises(ValueError, match="range_for_sampling"):
            parse_range(bad)


def test_miner_embeds_queries_with_the_instruction_and_the_pool_without():
    table = {t: v for t, v in zip(POOL, POOL_VECS)} | {"I:q": QUERY_VEC[0]}
    seen = []

    def encode(texts, batch_size, max_length):
        seen.append(list(texts))
        return np.stack([table[t] for t in texts])

    miner = HardNegativeMiner(range_for_sampling="1-3", negative_number=2, query_instruction="I:",
                              use_gpu=False)
    rows = [{"query": "q", "pos": ["p0"], "neg": POOL[1:]}]
    out, report = miner(rows, encoder=None, encode=encode)
    assert seen[0] == ["I:q"] and seen[1] == POOL
    assert sorted(out[0]["neg"]) == ["p1", "p2"] and report.pool == 10


def test_pipeline_candidate_pool_errors_name_file_and_line(tmp_path):
    from embedkit.mining.pipeline import read_pool

    path = tmp_path / "pool.jsonl"
    path.write_text(json.dumps({"text": "a"}) + "\n" + json.dumps({"txt": "b"}) + "\n")
    with pytest.raises(ValueError, match=r"pool.jsonl:2"):
        read_pool(str(path))


def test_mined_data_module_mines_at_setup_and_caches(tmp_path):
    from embedkit.mining.data import MinedContrastiveDataModule

    rows = [{"query": f"第{i}个问题关于{c}", "pos": [f"{c}的答案段落{i}"], "neg": []}
            for i, c in enumerate("天地人山水火木金土日月星")]
    dm = MinedContrastiveDataModule([lambda: rows], mining={"range_for_sampling": "0-8",
                                    "negative_number": 3, "keep_candidates": 5},
                                    batch_size=4, train_group_size=2, cache_dir=str(tmp_path))
    # Reading (for a vocabulary, embedkit/recipes/train_eval.py Examples) does not mine.
    assert dm.examples == rows and not (tmp_path / "mined").exists()
    mined = dm.mine()
    assert dm.examples is mined
    assert all(len(r["neg"]) == 3 and not set(r["neg"]) & set(r["pos"]) for r in mined)
    assert all(len(r["candidates"]) == 5 for r in mined)
    assert len(list((tmp_path / "mined").glob("*.jsonl"))) == 1
    again = MinedContrastiveDataModule([lambda: rows], mining={"range_for_sampling": "0-8",
                                       "negative_number": 3, "keep_candidates": 5},
                                       batch_size=4, train_group_size=2, cache_dir=str(tmp_path))
    assert again.mine() == mined
