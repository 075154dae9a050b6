"""Data-quality filters: teacher-score threshold and MinHash near-duplicate removal."""

import numpy as np
import pytest

from embedkit.filters.minhash import MinHashDedup, shingles
from embedkit.filters.teacher import TeacherScoreFilter


class TableEncoder:
    """A teacher whose embeddings are given per text (unit vectors), so scores are known exactly."""

    def __init__(self, table):
        self.table = table

    def encode(self, texts, batch_size=None, max_length=None):
        return np.stack([self.table[t] for t in texts]).astype(np.float32)


def _unit(deg):
    return np.array([np.cos(np.radians(deg)), np.sin(np.radians(deg))])


def test_teacher_filter_drops_pairs_below_the_threshold():
    # cos 0° = 1, cos 60° = 0.5, cos 66° = 0.407, cos 70° = 0.342
    table = {"q1": _unit(0), "a": _unit(60), "b": _unit(70), "q2": _unit(0), "c": _unit(66),
             "q3": _unit(0), "d": _unit(90)}
    rows = [{"query": "q1", "pos": ["a", "b"], "neg": []},
            {"query": "q2", "pos": ["c"], "neg": []},
            {"query": "q3", "pos": ["d"], "neg": []}]
    kept, report = TeacherScoreFilter(threshold=0.4)(rows, encoder=TableEncoder(table))
    assert [(r["query"], r["pos"]) for r in kept] == [("q1", ["a"]), ("q2", ["c"])]
    assert (report.kept, report.dropped, report.extra["rows_dropped"]) == (2, 2, 1)
    # C-Pack's 0.43 also drops c (0.407)
    kept, report = TeacherScoreFilter(threshold=0.43)(rows, encoder=TableEncoder(table))
    assert [r["query"] for r in kept] == ["q1"] and report.dropped == 3


def test_teacher_filter_needs_a_teacher():
    with pytest.raises(ValueError, match="teacher"):
        TeacherScoreFilter()([{"query": "q", "pos": ["p"]}])


def _jaccard(a, b):
    return len(a & b) / len(a | b)


def test_minhash_drops_near_duplicates_and_keeps_the_first_copy():
    base = ("人民日报社论指出今年的经济工作要坚持稳中求进的总基调继续推动高质量发展和改革开放"
            "各地区各部门要认真贯彻落实中央经济工作会议精神切实做好民生保障和就业工作")
    near = base[:40] + "新" + base[41:]                 # one character changed
    other = "北京今天天气晴朗气温适宜市民纷纷走出家门到公园里散步锻炼身体享受春天的阳光"
    rows = [{"query": base, "pos": ["正文一"]}, {"query": other, "pos": ["正文二"]},
            {"query": near, "pos": ["正文一"]}, {"query": base, "pos": ["正文一"]}]
    dedup = MinHashDedup(threshold=0.8, fields=("query", "pos"))
    # the exact Jaccard of the row texts, computed independently of datasketch
    sets = [shingles(dedup.text_of(r), 3) for r in rows]
    assert _jaccard(sets[0], sets[2]) > 0.9 and _jaccard(sets[0], sets[1]) < 0.05
    kept, report = dedup(rows)
    assert [r["query"] for r in kept] == [base, other]
    assert (report.kept, report.dropped) == (2, 2)


def test_shingles_are_character_ngrams_without_whitespace():
    assert shingles("中 文本", 2) == {"中文", "文本"} and shingles("中", 3) == {"中"}
