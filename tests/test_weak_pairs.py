import re
from collections import Counter

import pytest

from embedkit.data.readers import read_retrieval_jsonl
from embedkit.data.weak_pairs import (
    KINDS,
    build_weak_pairs,
    extract_weak_pairs,
    normalize_fullwidth,
    people_daily_paragraphs,
    people_daily_path,
    split_sentences,
    strip_pos_tags,
    write_jsonl,
)

FULLWIDTH_ALNUM = re.compile(r"[\uff10-\uff19\uff21-\uff3a\uff41-\uff5a]")
TAG_RESIDUE = re.compile(r"/[A-Za-z]")


@pytest.fixture(scope="module")
def paragraphs():
    return people_daily_paragraphs()


@pytest.fixture(scope="module")
def pairs():
    return build_weak_pairs(seed=0, with_kind=True)


# ---------------------------------------------------------------- cleaning units


def test_strip_pos_tags():
    assert strip_pos_tags("迈向/v  充满/v  希望/n  的/u  新/a  世纪/n") == "迈向充满希望的新世纪"
    assert strip_pos_tags("叹/Vg 身陷囹圄/i  日/Ng") == "叹身陷囹圄日"  # single-space separator
    assert strip_pos_tags("１／２/m  左右/f") == "１／２左右"
    assert strip_pos_tags("1/2/m") == "1/2"  # the tag is after the LAST slash
    assert strip_pos_tags("   ") == ""


def test_normalize_fullwidth():
    assert normalize_fullwidth("１９９８年ＷＴＯ增长１１０．８％") == "1998年WTO增长110.8%"
    assert normalize_fullwidth("你好，世界！（是吗？）：；") == "你好，世界！（是吗？）：；"
    assert normalize_fullwidth("你好，世界！", keep_cjk_punct=False) == "你好,世界!"
    assert normalize_fullwidth("甲\u3000乙") == "甲 乙"


def test_split_sentences():
    assert split_sentences("他说：“好。”我走了。你呢？") == ["他说：“好。”", "我走了。", "你呢？"]
    assert split_sentences("没有句号的标题") == ["没有句号的标题"]
    assert split_sentences("真的!好吗?嗯") == ["真的!", "好吗?", "嗯"]


# ---------------------------------------------------------------- the corpus


def test_corpus_found_and_cleaned(paragraphs):
    assert people_daily_path().name == "199801.txt"
    assert len(paragraphs) == 19484
    assert paragraphs[0] == "迈向充满希望的新世纪——一九九八年新年讲话（附图片1张）"
    text = "\n".join(paragraphs)
    assert not TAG_RESIDUE.search(text)
    assert "  " not in text
    assert not FULLWIDTH_ALNUM.search(text)  # NFKC applied to full-width digits/letters
    assert "1998年" in text and "１９９８" not in text
    assert "，" in text  # Chinese punctuation kept
    assert people_daily_paragraphs() == paragraphs  # cached value is not mutated by callers
    plain = people_daily_paragraphs(keep_cjk_punct=False)
    assert "，" not in "\n".join(plain) and len(plain) == len(paragraphs)


# ---------------------------------------------------------------- extraction rules


def test_extraction_rules_on_synthetic_article():
    paras = [
        "李鹏在北京考察企业",                                   # headline
        "向广大职工祝贺新年，对节日坚守岗位的同志们表示慰问",   # subtitle: skipped
        "（附图片1张）",                                         # annotation: skipped
        "新华社北京12月31日电（记者张三）今天是一九九七年的最后一天。李鹏上午来到北京石景山发电总厂考察。",
        "上午九时二十分，李鹏总理来到发电总厂。他向职工表示节日的祝贺，并询问了供电情况。",
        "同胞们、朋友们：",                                      # salutation: not a headline
        "这是另一段正文，第一句话长度足够。后面还有一句话，也够长了，这样剩下的部分超过二十个字。",
        "这一段的第一句够长。但后文太短。",                      # rest < 20 chars: dropped
    ]
    got = extract_weak_pairs(paras)
    kinds = Counter(p.kind for p in got)
    assert kinds == {"title_body": 1, "first_rest": 2}
    tb = [p for p in got if p.kind == "title_body"][0]
    assert tb.query == "李鹏在北京考察企业"
    # Dateline stripped; the body is not reused as a first_rest pair.
    assert tb.passage == "今天是一九九七年的最后一天。李鹏上午来到北京石景山发电总厂考察。"
    assert all(p.passage != "李鹏上午来到北京石景山发电总厂考察。" for p in got if p.kind == "first_rest")
    fr = [p for p in got if p.kind == "first_rest"]
    assert fr[0].query == "上午九时二十分，李鹏总理来到发电总厂。"
    assert fr[0].passage == "他向职工表示节日的祝贺，并询问了供电情况。"
    assert fr[1].query == "这是另一段正文，第一句话长度足够。"
    assert not any(p.query == "同胞们、朋友们：" for p in got)
    assert extract_weak_pairs(paras, kinds=["first_rest"]) == fr
    with pytest.raises(ValueError, match="unknown pair kinds"):
        extract_weak_pairs(paras, kinds=["title_abstract"])


def test_long_passage_is_clipped_to_whole_sentences():
    body = "这是一句相当长的话，用来凑足长度。" * 30  # 17 chars x 30
    got = extract_weak_pairs(["很短的一个新闻标题", body], max_passage_chars=100)
    assert len(got) == 1
    assert len(got[0].passage) <= 100 and got[0].passage.endswith("。")
    assert len(got[0].passage) == 17 * (100 // 17)


# ---------------------------------------------------------------- built pairs


def test_both_kinds_and_format(pairs):
    kinds = Counter(r["kind"] for r in pairs)
    assert set(kinds) == set(KINDS)
    assert kinds["title_body"] > 2000 and kinds["first_rest"] > 5000
    plain = build_weak_pairs(seed=0)
    assert len(plain) == len(pairs)
    assert all(set(r) == {"query", "pos", "neg"} for r in plain)
    assert all(len(r["pos"]) == 1 and r["neg"] == [] for r in plain)


def test_lengths_within_bounds_and_no_duplicates(pairs):
    assert all(6 <= len(r["query"]) <= 64 for r in pairs)
    assert all(20 <= len(r["pos"][0]) <= 400 for r in pairs)
    assert len({r["query"] for r in pairs}) == len(pairs)
    assert len({r["pos"][0] for r in pairs}) == len(pairs)
    blob = "\n".join(r["query"] + r["pos"][0] for r in pairs)
    assert not TAG_RESIDUE.search(blob) and not FULLWIDTH_ALNUM.search(blob)
    # photo credits and "(附图片1张)" were removed from pairs
    assert "附图片" not in blob and "记者兰红光摄" not in blob


def test_custom_bounds_respected():
    rows = build_weak_pairs(min_query_chars=10, max_query_chars=20, min_passage_chars=50,
                            max_passage_chars=120)
    assert rows
    assert all(10 <= len(r["query"]) <= 20 for r in rows)
    assert all(50 <= len(r["pos"][0]) <= 120 for r in rows)


def test_deterministic_shuffle_and_max_pairs(pairs):
    again = build_weak_pairs(seed=0, with_kind=True)
    assert again == pairs
    other = build_weak_pairs(seed=1, with_kind=True)
    assert other != pairs
    assert sorted(r["query"] for r in other) == sorted(r["query"] for r in pairs)
    assert build_weak_pairs(max_pairs=100, seed=0, with_kind=True) == pairs[:100]
    assert build_weak_pairs(max_pairs=0) == []
    with pytest.raises(ValueError):
        build_weak_pairs(max_pairs=-1)


def test_write_jsonl_round_trips_through_reader(pairs, tmp_path):
    rows = [{k: v for k, v in r.items() if k != "kind"} for r in pairs[:500]]
    path = tmp_path / "sub" / "weak.jsonl"
    assert write_jsonl(rows, path) == 500
    back = read_retrieval_jsonl(path)
    assert list(back) == rows
    assert "，" in path.read_text(encoding="utf-8")  # ensure_ascii=False: readable Chinese
