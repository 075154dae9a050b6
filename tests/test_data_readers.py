import json
import os
from pathlib import Path

import pytest

from embedkit.data.readers import (
    BadRowError,
    EmptyFileError,
    ReadResult,
    read_retrieval_jsonl,
    read_sts_jsonl,
)

DATA = Path(
    os.environ.get("EMBEDKIT_DATA_DIR", Path(__file__).resolve().parents[2] / "shared/data/zh-mini")
)

GOOD_RET = {"query": "北京的天气", "pos": ["北京今天晴。"], "neg": ["上海下雨。"]}
GOOD_STS = {"sentence1": "一架飞机要起飞了。", "sentence2": "一架飞机正在起飞。", "score": 5.0}


def _write(tmp_path: Path, lines: list, name: str = "x.jsonl") -> Path:
    """Each item is a dict (dumped as JSON), a str (written verbatim) or bytes."""
    p = tmp_path / name
    chunks = []
    for item in lines:
        if isinstance(item, dict):
            item = json.dumps(item, ensure_ascii=False)
        if isinstance(item, str):
            item = item.encode("utf-8")
        chunks.append(item)
    p.write_bytes(b"\n".join(chunks) + b"\n")
    return p


def _bad_retrieval(tmp_path, bad_line, lineno=3):
    """A file whose line `lineno` is `bad_line`, the rest good; returns (path, error)."""
    lines = [GOOD_RET] * (lineno - 1) + [bad_line, GOOD_RET]
    p = _write(tmp_path, lines)
    with pytest.raises(BadRowError) as ei:
        read_retrieval_jsonl(p)
    return p, ei.value


def _assert_names(err: BadRowError, path: Path, line: int, fragment: str):
    msg = str(err)
    assert msg.startswith(f"{path}:{line}: "), msg
    assert fragment in msg, msg
    assert err.line == line and err.path == str(path)


# ---------------------------------------------------------------- retrieval: bad rows


@pytest.mark.parametrize(
    "bad, fragment",
    [
        ('{"query": "q", "pos": ["p"]', "malformed JSON"),
        ("not json at all", "malformed JSON"),
        ('["q", ["p"]]', "expected a JSON object, got an array"),
        ('"just a string"', "expected a JSON object, got a string"),
        ("42", "expected a JSON object, got a number"),
        ({"pos": ["p"]}, "missing key 'query'"),
        ({"query": "q"}, "missing key 'pos'"),
        ({"query": "q", "pos": "p"}, "'pos' must be a list of strings, got a string"),
        ({"query": "q", "pos": []}, "'pos' is an empty list"),
        ({"query": "", "pos": ["p"]}, "'query' is an empty or whitespace-only string"),
        ({"query": " \t　", "pos": ["p"]}, "'query' is an empty or whitespace-only string"),
        ({"query": "q", "pos": ["p", "  "]}, "pos[1] is an empty or whitespace-only string"),
        ({"query": "q", "pos": ["p"], "neg": [""]}, "neg[0] is an empty or whitespace-only string"),
        ({"query": 7, "pos": ["p"]}, "'query' must be a string, got a number"),
        ({"query": None, "pos": ["p"]}, "'query' must be a string, got null"),
        ({"query": "q", "pos": [["p"]]}, "pos[0] must be a string, got an array"),
        ({"query": "q", "pos": ["p"], "neg": ["n", 3]}, "neg[1] must be a string, got a number"),
        ({"query": "q", "pos": ["p"], "neg": "n"}, "'neg' must be a list of strings, got a string"),
        ({"query": "q", "pos": ["a", "b"], "neg": ["c", "b"]}, "pos[1] also appears as neg[1]"),
        ({"query": "q", "pos": ["同一句。"], "neg": ["同一句。 "]}, "pos[0] also appears as neg[0]"),
        ({"query": "q", "pos": ["p"], "prompt": 1}, "'prompt' (the row's query instruction) must be a string"),
    ],
)
def test_retrieval_bad_row_names_file_and_line(tmp_path, bad, fragment):
    p, err = _bad_retrieval(tmp_path, bad, lineno=3)
    _assert_names(err, p, 3, fragment)
    assert isinstance(err, ValueError)


def test_invalid_utf8_reports_its_line(tmp_path):
    good = json.dumps(GOOD_RET, ensure_ascii=False).encode()
    bad = b'{"query": "\xe5\x8c", "pos": ["p"]}'  # truncated 3-byte sequence
    p = _write(tmp_path, [good, good, good, good, bad])
    with pytest.raises(BadRowError) as ei:
        read_retrieval_jsonl(p)
    _assert_names(ei.value, p, 5, "invalid UTF-8")


def test_line_numbers_count_blank_lines(tmp_path):
    # Blank lines are skipped but still numbered, so the editor line matches.
    p = _write(tmp_path, [GOOD_RET, "", "   ", GOOD_RET, {"query": "q", "pos": []}])
    with pytest.raises(BadRowError) as ei:
        read_retrieval_jsonl(p)
    assert ei.value.line == 5


def test_first_bad_row_wins_under_error(tmp_path):
    p = _write(tmp_path, [GOOD_RET, {"query": "q", "pos": []}, "oops"])
    with pytest.raises(BadRowError) as ei:
        read_retrieval_jsonl(p)
    assert ei.value.line == 2


# ---------------------------------------------------------------- retrieval: good rows


def test_retrieval_good_rows_and_passthrough(tmp_path):
    rich = {
        "query": "q",
        "pos": ["p1", "p2"],
        "neg": ["n1"],
        "pos_scores": [1.0, 0.5],
        "neg_scores": [0.1],
        "prompt": "为这个句子生成表示以用于检索相关文章：",
        "type": "normal",
    }
    no_neg = {"query": "q2", "pos": ["p"]}
    empty_neg = {"query": "q3", "pos": ["p"], "neg": []}
    p = _write(tmp_path, [rich, no_neg, empty_neg])
    rows = read_retrieval_jsonl(p)
    assert isinstance(rows, ReadResult) and isinstance(rows, list)
    assert rows.rows is rows
    assert rows.skipped == []
    assert rows[0] == rich
    assert rows[1] == {"query": "q2", "pos": ["p"], "neg": []}
    assert rows[2] == empty_neg
    assert len(rows) == 3


def test_crlf_bom_and_unicode_line_separator(tmp_path):
    # U+2028 inside a JSON string is legal; it must not be taken as a line break.
    row = {"query": "第一行\u2028第二行", "pos": ["p"]}
    text = json.dumps(row, ensure_ascii=False) + "\r\n" + json.dumps(GOOD_RET, ensure_ascii=False) + "\r\n"
    p = tmp_path / "crlf.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    rows = read_retrieval_jsonl(p)
    assert len(rows) == 2
    assert rows[0]["query"] == "第一行\u2028第二行"


# ---------------------------------------------------------------- skip policy


def test_skip_policy_counts_and_reports(tmp_path):
    lines = [
        GOOD_RET,                                      # 1 ok
        "{broken",                                     # 2 malformed
        {"query": "q", "pos": []},                     # 3 empty pos
        GOOD_RET,                                      # 4 ok
        b'{"query": "\xff", "pos": ["p"]}',            # 5 bad utf-8
        {"query": "q", "pos": ["x"], "neg": ["x"]},    # 6 false negative
        "",                                            # 7 blank: ignored, not skipped
        GOOD_RET,                                      # 8 ok
    ]
    p = _write(tmp_path, lines)
    res = read_retrieval_jsonl(p, on_bad_row="skip")
    assert len(res) == 3
    assert [ln for ln, _ in res.skipped] == [2, 3, 5, 6]
    reasons = dict(res.skipped)
    assert "malformed JSON" in reasons[2]
    assert "'pos' is an empty list" in reasons[3]
    assert "invalid UTF-8" in reasons[5]
    assert "also appears as neg" in reasons[6]
    assert "skipped=4" in repr(res)


def test_skip_policy_all_bad_is_an_error(tmp_path):
    p = _write(tmp_path, ["{", {"query": "q", "pos": []}])
    with pytest.raises(EmptyFileError, match=r"all 2 rows were skipped"):
        read_retrieval_jsonl(p, on_bad_row="skip")


def test_unknown_policy_rejected(tmp_path):
    p = _write(tmp_path, [GOOD_RET])
    with pytest.raises(ValueError, match="on_bad_row"):
        read_retrieval_jsonl(p, on_bad_row="ignore")


# ---------------------------------------------------------------- file-level errors


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"])
def test_empty_file_names_the_file(tmp_path, content):
    p = tmp_path / "empty.jsonl"
    p.write_bytes(content)
    for reader in (read_retrieval_jsonl, read_sts_jsonl):
        with pytest.raises(EmptyFileError) as ei:
            reader(p)
        assert str(p) in str(ei.value)
        assert "empty" in str(ei.value)


def test_missing_file_names_the_path(tmp_path):
    p = tmp_path / "nope" / "missing.jsonl"
    for reader in (read_retrieval_jsonl, read_sts_jsonl):
        with pytest.raises(FileNotFoundError) as ei:
            reader(p)
        assert str(p) in str(ei.value)


# ---------------------------------------------------------------- STS


@pytest.mark.parametrize(
    "bad, fragment",
    [
        ({"sentence2": "b", "score": 1}, "missing key 'sentence1'"),
        ({"sentence1": "a", "score": 1}, "missing key 'sentence2'"),
        ({"sentence1": "a", "sentence2": "b"}, "missing key 'score'"),
        ({"sentence1": "", "sentence2": "b", "score": 1}, "'sentence1' is an empty"),
        ({"sentence1": "a", "sentence2": "\n ", "score": 1}, "'sentence2' is an empty"),
        ({"sentence1": 1, "sentence2": "b", "score": 1}, "'sentence1' must be a string, got a number"),
        ({"sentence1": "a", "sentence2": ["b"], "score": 1}, "'sentence2' must be a string, got an array"),
        ({"sentence1": "a", "sentence2": "b", "score": "3.0"}, "'score' must be a number, got a string"),
        ({"sentence1": "a", "sentence2": "b", "score": None}, "'score' must be a number, got null"),
        ({"sentence1": "a", "sentence2": "b", "score": True}, "'score' must be a number, got a boolean"),
        ('{"sentence1": "a", "sentence2": "b", "score": NaN}', "'score' must be finite"),
        ('{"sentence1": "a", "sentence2": "b", "score": Infinity}', "'score' must be finite"),
        ({"sentence1": "a", "sentence2": "b", "score": 5.5}, "outside score_range [0, 5]"),
        ({"sentence1": "a", "sentence2": "b", "score": -0.1}, "outside score_range [0, 5]"),
        ("[1, 2, 3]", "expected a JSON object"),
    ],
)
def test_sts_bad_row(tmp_path, bad, fragment):
    p = _write(tmp_path, [GOOD_STS, GOOD_STS, GOOD_STS, bad])
    with pytest.raises(BadRowError) as ei:
        read_sts_jsonl(p, score_range=(0, 5))
    _assert_names(ei.value, p, 4, fragment)


def test_sts_range_is_inclusive_and_optional(tmp_path):
    rows = [dict(GOOD_STS, score=s) for s in (0, 5, 2.5)]
    p = _write(tmp_path, rows)
    got = read_sts_jsonl(p, score_range=(0, 5))
    assert [r["score"] for r in got] == [0.0, 5.0, 2.5]
    assert all(type(r["score"]) is float for r in got)
    # Without a range any finite number is accepted.
    p2 = _write(tmp_path, [dict(GOOD_STS, score=17)], name="y.jsonl")
    assert read_sts_jsonl(p2)[0]["score"] == 17.0
    with pytest.raises(ValueError, match="score_range"):
        read_sts_jsonl(p, score_range=(5, 0))


def test_sts_skip_policy(tmp_path):
    p = _write(tmp_path, [GOOD_STS, dict(GOOD_STS, score=9), GOOD_STS, dict(GOOD_STS, sentence1=" ")])
    res = read_sts_jsonl(p, on_bad_row="skip", score_range=(0, 5))
    assert len(res) == 2
    assert [ln for ln, _ in res.skipped] == [2, 4]


# ---------------------------------------------------------------- real zh-mini data

needs_data = pytest.mark.skipif(not (DATA / "train").is_dir(), reason=f"zh-mini data not at {DATA}")


@needs_data
@pytest.mark.parametrize(
    "name, n",
    [("nli_triplets.jsonl", 3955), ("stsb_hardneg.jsonl", 1914), ("cmrc_pairs.jsonl", 501)],
)
def test_real_retrieval_files_load_cleanly(name, n):
    rows = read_retrieval_jsonl(DATA / "train" / name)
    assert len(rows) == n
    assert rows.skipped == []
    assert all(isinstance(r["neg"], list) for r in rows)


@needs_data
def test_real_sts_file_loads_cleanly():
    rows = read_sts_jsonl(DATA / "train" / "stsb_pairs.jsonl", score_range=(0, 5))
    assert len(rows) == 5231
    assert rows.skipped == []
    assert min(r["score"] for r in rows) == 0.0
    assert max(r["score"] for r in rows) == 5.0


def test_pretraining_text_files_read_a_field_and_name_a_bad_line(tmp_path):
    # The paper-scale RetroMAE corpus (WuDaoCorpora documents keep their text in `content`).
    from embedkit.data.corpus import text_files

    (tmp_path / "a.jsonl").write_text(
        json.dumps({"title": "t", "content": "人民日报社论：新年献词，一九九八年的第一天"}, ensure_ascii=False) + "\n"
        + json.dumps({"content": "短"}, ensure_ascii=False) + "\n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"content": "人民日报社论：新年献词，一九九八年的第一天"}, ensure_ascii=False) + "\n"
        + json.dumps({"content": "第二篇文档的正文，足够长以便保留下来用于预训练"}, ensure_ascii=False) + "\n",
        encoding="utf-8")
    rows = text_files(str(tmp_path / "*.jsonl"), field="content", min_chars=5)
    # the short text and the repeated one are dropped, as for People's Daily
    assert [r["text"] for r in rows] == ["人民日报社论：新年献词，一九九八年的第一天", "第二篇文档的正文，足够长以便保留下来用于预训练"]
    (tmp_path / "c.jsonl").write_text('{"content": "好的一行文字内容"}\n{"text": "no content key"}\n', encoding="utf-8")
    with pytest.raises(BadRowError, match=r"c\.jsonl:2: missing key 'content'"):
        text_files(str(tmp_path / "*.jsonl"), field="content")
    assert len(text_files(str(tmp_path / "*.jsonl"), field="content", min_chars=5, on_bad_row="skip")) == 3
    with pytest.raises(FileNotFoundError, match="EMBEDKIT_PAPER_DATA_DIR"):
        text_files(str(tmp_path / "none" / "*.jsonl"))


def test_sts_files_read_every_match_and_name_a_bad_line(tmp_path):
    from embedkit.data.sts import sts_files

    (tmp_path / "a.jsonl").write_text(json.dumps({"sentence1": "一", "sentence2": "二", "score": 3}) + "\n",
                                      encoding="utf-8")
    (tmp_path / "b.jsonl").write_text(json.dumps({"sentence1": "三", "sentence2": "四", "score": 1.5}) + "\n"
                                      + json.dumps({"sentence1": "五", "sentence2": "六"}) + "\n", encoding="utf-8")
    with pytest.raises(BadRowError, match=r"b\.jsonl:2: missing key 'score'"):
        sts_files(str(tmp_path / "*.jsonl"))
    rows = sts_files(str(tmp_path / "*.jsonl"), on_bad_row="skip")
    assert [r["score"] for r in rows] == [3.0, 1.5]
