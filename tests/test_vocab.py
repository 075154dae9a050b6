import json
import os
import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from embedkit.models.vocab import (
    SPECIAL_TOKENS,
    _count_pieces_reference,
    base_tokens,
    build_char_vocab,
    count_pieces,
    load_tokenizer,
    read_vocab_txt,
    save_tokenizer,
)

DATA = Path(
    os.environ.get("EMBEDKIT_DATA_DIR", Path(__file__).resolve().parents[2] / "shared/data/zh-mini")
)
needs_data = pytest.mark.skipif(not (DATA / "train").is_dir(), reason=f"zh-mini data not at {DATA}")

SAMPLE = [
    "一个人正把切碎的奶酪撒在比萨饼上。",
    "让-皮埃尔·巴利冈（Jean-Pierre Balligand，1950年5月30日 - ），法国政治家。",
    "BGE 模型在 C-MTEB 上表现很好！",
    "我爱北京天安门。",
]

TRICKY = [
    "Café ÉCOLE naïve",          # accents are stripped by the lower-casing normalizer
    "ＷＴＯ组织ｔｅｓｔ",          # full-width Latin stays full-width inside a word
    "ひらがな与カタカナ",          # kana is not split per character: needs ## forms
    "a\x1fb c\u200bd",           # control / format characters are removed, joining words
    "e\u0301x 中\u0301",          # combining marks
    "😀emoji😀x 𠀀𠀁abc𠀂",        # astral plane, CJK extension B
    "x\u00a0y\u3000z\t\r\nw",      # exotic whitespace
    "hello,world!foo-bar 3.14",
]


def _texts_of(path: Path) -> list[str]:
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            for key, val in row.items():
                if key in ("id", "query_id", "doc_id"):
                    continue
                for s in val if isinstance(val, list) else [val]:
                    if isinstance(s, str):
                        out.append(s)
    return out


# ---------------------------------------------------------------- layout and determinism


def test_layout_specials_then_ascii_block():
    v = build_char_vocab(SAMPLE)
    assert v[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] == SPECIAL_TOKENS
    fixed = base_tokens()
    assert v[: len(fixed)] == fixed
    for tok in ["a", "z", "0", "9", "##a", "##z", "##0", "##9", ",", ".", "!", "~"]:
        assert tok in fixed
    assert "A" not in fixed and "##," not in fixed  # unreachable with lower-casing / punct split
    assert len(v) == len(set(v))


def test_frequency_order_ties_by_codepoint():
    # 甲 x3, 乙 x1, 丙 x1, 丁 x2 ; 丙 (U+4E19) < 乙 (U+4E59)
    v = build_char_vocab(["甲乙甲", "丙甲丁丁"])
    tail = v[len(base_tokens()):]
    assert tail == ["甲", "丁", "丙", "乙"]


def test_deterministic_and_order_independent():
    texts = SAMPLE + TRICKY
    a = build_char_vocab(texts)
    shuffled = texts[:]
    random.Random(3).shuffle(shuffled)
    b = build_char_vocab(shuffled)
    assert a == b


def test_min_freq_max_size_always_include():
    texts = ["甲甲甲乙乙丙"]
    n = len(base_tokens())
    assert build_char_vocab(texts, min_freq=2)[n:] == ["甲", "乙"]
    assert build_char_vocab(texts, max_size=n + 1)[n:] == ["甲"]
    # always_include survives min_freq and max_size, and sits after the ranked part.
    v = build_char_vocab(texts, min_freq=2, max_size=n + 3, always_include=["蓍丙"])
    assert v[n:] == ["甲", "丙", "蓍"]
    v = build_char_vocab(texts, min_freq=2, max_size=n + 2, always_include=["蓍丙"])
    assert v[n:] == ["丙", "蓍"]
    with pytest.raises(ValueError, match="max_size"):
        build_char_vocab(texts, max_size=n - 1)
    with pytest.raises(ValueError, match="min_freq"):
        build_char_vocab(texts, min_freq=0)


def test_non_cjk_words_get_continuation_pieces():
    v = set(build_char_vocab(["ひらがな", "ÉCOLE"]))
    # が loses its dakuten to accent stripping (NFD + drop marks), as in BERT.
    assert {"ひ", "##ら", "##か", "##な"} <= v
    assert "##が" not in v
    assert "É" not in v and "é" not in v  # accents stripped, letters already in the ASCII block


def test_fast_counter_matches_tokenizer_pipeline():
    texts = SAMPLE + TRICKY
    assert count_pieces(texts) == _count_pieces_reference(texts)


# ---------------------------------------------------------------- save / load


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    vocab = build_char_vocab(SAMPLE + TRICKY)
    tok = save_tokenizer(vocab, out)
    return vocab, out, tok


def test_round_trip_with_autotokenizer(saved):
    vocab, out, tok = saved
    assert read_vocab_txt(out / "vocab.txt") == vocab
    auto = AutoTokenizer.from_pretrained(str(out))
    assert auto.is_fast
    assert len(auto) == len(vocab)
    assert auto.get_vocab() == {t: i for i, t in enumerate(vocab)}
    assert auto.pad_token_id == 0 and auto.unk_token_id == 1
    assert auto.cls_token_id == 2 and auto.sep_token_id == 3 and auto.mask_token_id == 4
    assert auto.model_max_length == 512
    assert tok.get_vocab() == auto.get_vocab()


def test_chinese_is_one_token_per_char_and_never_unk(saved):
    _, out, _ = saved
    tok = AutoTokenizer.from_pretrained(str(out))
    text = "我爱北京天安门。"
    assert tok.tokenize(text) == list(text)
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert tok.unk_token_id not in ids
    for s in SAMPLE + TRICKY:
        assert tok.unk_token_id not in tok(s)["input_ids"], s
    # A character absent from the vocabulary does become [UNK]: the check above is real.
    assert tok.tokenize("蓍") == ["[UNK]"]


def test_ascii_word_splits_into_characters(saved):
    _, out, _ = saved
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.tokenize("Hello") == ["h", "##e", "##l", "##l", "##o"]
    assert tok.tokenize("BGE2023模型") == ["b", "##g", "##e", "##2", "##0", "##2", "##3", "模", "型"]
    assert tok.tokenize("C-MTEB") == ["c", "-", "m", "##t", "##e", "##b"]
    pair = tok("北京", "上海")
    assert pair["token_type_ids"] == [0, 0, 0, 0, 1, 1, 1]


def test_save_is_deterministic(tmp_path):
    vocab = build_char_vocab(SAMPLE)
    save_tokenizer(vocab, tmp_path / "a")
    save_tokenizer(vocab, tmp_path / "b")
    for name in ("vocab.txt", "tokenizer.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_load_detects_vocab_mismatch(saved, tmp_path):
    vocab, out, _ = saved
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in out.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    swapped = vocab[:]
    swapped[-1], swapped[-2] = swapped[-2], swapped[-1]
    (bad / "vocab.txt").write_text("\n".join(swapped) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="does not match its vocab.txt"):
        load_tokenizer(bad)
    assert load_tokenizer(out).get_vocab() == {t: i for i, t in enumerate(vocab)}


def test_save_rejects_malformed_vocab(tmp_path):
    with pytest.raises(ValueError, match="must start with"):
        save_tokenizer(["[UNK]", "[PAD]", "[CLS]", "[SEP]", "[MASK]", "我"], tmp_path / "x")
    with pytest.raises(ValueError, match="duplicate"):
        save_tokenizer(SPECIAL_TOKENS + ["我", "我"], tmp_path / "y")
    with pytest.raises(ValueError, match="whitespace"):
        save_tokenizer(SPECIAL_TOKENS + ["a b"], tmp_path / "z")


# ---------------------------------------------------------------- real data


@needs_data
def test_real_eval_text_has_no_unk(tmp_path):
    train = []
    for name in ("nli_triplets.jsonl", "stsb_hardneg.jsonl", "cmrc_pairs.jsonl", "stsb_pairs.jsonl"):
        train += _texts_of(DATA / "train" / name)
    rng = random.Random(0)
    evals = []
    for task_file in ("STSB/data.jsonl", "CMRCRetrieval/corpus.jsonl", "CMRCRetrieval/queries.jsonl",
                      "LCQMC/data.jsonl", "TNewsClassification/test.jsonl", "PAWSX/data.jsonl"):
        texts = _texts_of(DATA / "eval" / task_file)
        evals += rng.sample(texts, min(300, len(texts)))
    vocab = build_char_vocab(train, always_include=evals)
    tok = save_tokenizer(vocab, tmp_path / "tok")
    enc = tok(evals, add_special_tokens=False)["input_ids"]
    unk = [s for s, ids in zip(evals, enc) if tok.unk_token_id in ids]
    assert not unk, unk[:3]
    # Without the eval text some rare characters would be [UNK]: always_include matters.
    plain = save_tokenizer(build_char_vocab(train), tmp_path / "plain")
    enc = plain(evals, add_special_tokens=False)["input_ids"]
    assert any(plain.unk_token_id in ids for ids in enc)
