"""Data-quality filters: teacher-score threshold and MinHash near-duplicate removal."""

import json

import numpy as np
import pytest

from embedkit.filters.minhash import MinHashDedup, shingles
from embedkit.filters.teacher import TeacherScoreFilter

from helpers import PASSAGES, QUERIES, tiny_encoder
from _numerics import RTOL32, assert_close_scaled


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


# ---------------------------------------------------------------- the teacher's own pooling

LONG = "一个戴着安全帽的男人在跳舞，他跳得很好，旁边还有很多人在看。"   # longer than the 16-token cut
ROWS = [{"query": q, "pos": [PASSAGES[i], PASSAGES[i + 6]] + ([LONG] if i % 2 else []), "neg": []}
        for i, q in enumerate(QUERIES)]


def _texts(rows):
    return [t for r in rows for t in (r["query"], *r["pos"])]


@pytest.fixture(scope="module")
def st_tok(tmp_path_factory):
    from embedkit.models.vocab import build_char_vocab, save_tokenizer

    return save_tokenizer(build_char_vocab(_texts(ROWS)), tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def hf_folder(st_tok, tmp_path_factory):
    """A plain HF folder (backbone + tokenizer, nothing declaring a pooling)."""
    out = tmp_path_factory.mktemp("hf")
    enc = tiny_encoder(st_tok, seed=3, max_length=64)
    enc.backbone.save_pretrained(out)
    st_tok.save_pretrained(out)
    return out


def _sentence_transformer(folder, pooling=None, max_seq_length=None):
    """sentence-transformers' own model: the folder as saved, or its Transformer + Pooling(pooling)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    if pooling is None:
        return SentenceTransformer(str(folder), device="cpu")
    t = Transformer(str(folder), max_seq_length=max_seq_length)
    return SentenceTransformer(modules=[t, Pooling(t.get_embedding_dimension(), pooling)], device="cpu")


def _reference_scores(model, rows):
    """sentence-transformers' encode, then its cosine similarity, for each (query, positive)."""
    q = model.encode([r["query"] for r in rows], convert_to_tensor=True)
    out = []
    for i, r in enumerate(rows):
        p = model.encode(r["pos"], convert_to_tensor=True)
        out.append(model.similarity(q[i:i + 1], p)[0].numpy())
    return out


def _assert_same_scores(ours, theirs):
    assert [len(s) for s in ours] == [len(s) for s in theirs]
    assert_close_scaled(np.concatenate(ours), np.concatenate(theirs).astype(np.float32), RTOL32)


@pytest.fixture(scope="module")
def st_mean_folder(hf_folder, tmp_path_factory):
    """The tiny BERT saved by sentence-transformers (the installed version's format) as a
    MEAN-pooled model without Normalize and cut at 16 tokens, like text2vec-base-chinese."""
    out = tmp_path_factory.mktemp("st_mean")
    _sentence_transformer(hf_folder, "mean", max_seq_length=16).save(str(out))
    return out


@pytest.fixture(scope="module")
def legacy_mean_folder(st_tok, tmp_path_factory):
    """The same layout as the hub's text2vec-base-chinese: sentence-transformers 2.x-5.x files
    (`sentence_transformers.models.*`, pooling_mode_mean_tokens, max_seq_length), no embedkit files."""
    from embedkit.models.encoder import ENCODER_CONFIG
    from embedkit.models.export import export_sentence_transformers

    enc = tiny_encoder(st_tok, seed=3, max_length=16, pooling="mean", normalize=False)
    out = export_sentence_transformers(enc, tmp_path_factory.mktemp("legacy_mean"))
    (out / ENCODER_CONFIG).unlink()
    return out


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("folder", ["st_mean_folder", "legacy_mean_folder"])
def test_teacher_scores_are_the_checkpoints_own_cosines(folder, request):
    path = request.getfixturevalue(folder)
    f = TeacherScoreFilter(model_path=str(path))
    teacher, lowercase = f.load_teacher()
    assert (teacher.pooling, teacher.normalize, teacher.max_length, lowercase) == ("mean", False, 16, False)
    ours = f.scores(ROWS, teacher)
    theirs = _reference_scores(_sentence_transformer(path), ROWS)
    _assert_same_scores(ours, theirs)
    # CLS pooling (what the filter used to do with any folder) scores differently
    cls = TeacherScoreFilter(model_path=str(path), pooling="cls")
    cls_scores = cls.scores(ROWS, cls.load_teacher()[0])
    assert np.abs(np.concatenate(cls_scores) - np.concatenate(theirs)).max() > 0.05
    # ... and is exactly sentence-transformers' CLS pooling of the same weights
    _assert_same_scores(cls_scores, _reference_scores(_sentence_transformer(path, "cls", 16), ROWS))
    # the filter keeps what the reference scores keep
    threshold = float(np.median(np.concatenate(theirs)))
    kept, report = TeacherScoreFilter(threshold=threshold, model_path=str(path))(ROWS)
    want = [(r["query"], [p for p, s in zip(r["pos"], sc) if s >= threshold]) for r, sc in zip(ROWS, theirs)]
    assert [(r["query"], r["pos"]) for r in kept] == [w for w in want if w[1]]
    assert report.kept == sum(len(w[1]) for w in want) and report.dropped > 0


@pytest.mark.usefixtures("one_torch_thread")
def test_a_plain_hf_folder_pools_cls_unless_overridden(hf_folder):
    f = TeacherScoreFilter(model_path=str(hf_folder))
    _assert_same_scores(f.scores(ROWS, f.load_teacher()[0]),
                        _reference_scores(_sentence_transformer(hf_folder, "cls"), ROWS))
    f = TeacherScoreFilter(model_path=str(hf_folder), pooling="mean")
    _assert_same_scores(f.scores(ROWS, f.load_teacher()[0]),
                        _reference_scores(_sentence_transformer(hf_folder, "mean"), ROWS))


@pytest.mark.usefixtures("one_torch_thread")
def test_teacher_honours_do_lower_case_cls_and_normalize(tmp_path):
    """bge-large-zh-v1.5's layout (CLS, Normalize, do_lower_case: true), on a cased tokenizer, so
    that lower-casing changes the tokens."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    from embedkit.models.vocab import SPECIAL_TOKENS

    vocab = list(SPECIAL_TOKENS) + list("abcdABCD") + sorted(set("".join(_texts(ROWS))))
    tok = BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=False)
    assert tok.tokenize("A北京") == ["A", "北", "京"] and tok.tokenize("a北京") == ["a", "北", "京"]
    torch.manual_seed(5)
    # initializer_range 0.5: with BERT's 0.02 a fresh model gives every text nearly one CLS vector
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, initializer_range=0.5),
              add_pooling_layer=False).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    (tmp_path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 32, "do_lower_case": True}))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False,
         "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}))
    (tmp_path / "2_Normalize").mkdir()
    rows = [{"query": "A" + r["query"], "pos": ["B" + p for p in r["pos"]]} for r in ROWS]
    f = TeacherScoreFilter(model_path=str(tmp_path))
    teacher, lowercase = f.load_teacher()
    assert (teacher.pooling, teacher.normalize, teacher.max_length, lowercase) == ("cls", True, 32, True)
    theirs = _reference_scores(_sentence_transformer(tmp_path), rows)
    _assert_same_scores(f.scores(rows, teacher, lowercase), theirs)
    cased = np.concatenate(f.scores(rows, teacher, lowercase=False))
    assert np.abs(cased - np.concatenate(theirs)).max() > 1e-3   # lower-casing mattered here


def test_teacher_refuses_what_it_cannot_reproduce(legacy_mean_folder, tmp_path):
    import shutil

    dense = tmp_path / "dense"
    shutil.copytree(legacy_mean_folder, dense)
    modules = json.loads((dense / "modules.json").read_text())
    modules.insert(2, {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    (dense / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ValueError, match="modules.json.*Dense"):
        TeacherScoreFilter(model_path=str(dense)).load_teacher()

    maxpool = tmp_path / "max"
    shutil.copytree(legacy_mean_folder, maxpool)
    cfg = json.loads((maxpool / "1_Pooling" / "config.json").read_text())
    cfg.update(pooling_mode_mean_tokens=False, pooling_mode_max_tokens=True)
    (maxpool / "1_Pooling" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="1_Pooling.*'max'"):
        TeacherScoreFilter(model_path=str(maxpool)).load_teacher()
    assert TeacherScoreFilter(model_path=str(maxpool), pooling="mean").load_teacher()[0].pooling == "mean"

    with pytest.raises(FileNotFoundError, match="not a local model folder"):
        TeacherScoreFilter(model_path="shibing624/text2vec-base-chinese").load_teacher()
    with pytest.raises(ValueError, match="pooling must be one of"):
        TeacherScoreFilter(model_path=str(maxpool), pooling="max")
    with pytest.raises(ValueError, match="no\nmodel_path|with no model_path"):
        TeacherScoreFilter(pooling="mean")


def test_filter_config_defaults_to_the_checkpoints_pooling():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from embedkit.config import CONFIG_DIR

    cfg = OmegaConf.load(CONFIG_DIR / "filter" / "teacher.yaml")
    assert cfg.pooling is None and cfg.threshold == 0.4
    f = instantiate(cfg, model_path="/x", pooling="mean")
    assert (f.model_path, f.pooling) == ("/x", "mean")


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
