"""The lexical floor (embedkit/eval/lexical.py): its embeddings are the plain sklearn pipeline's, its
scores come from the suite's own mteb evaluation, its cache is reused and goes stale with the texts,
and a run's table ends with its row."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

DATA = Path(os.environ.get("EMBEDKIT_DATA_DIR", Path(__file__).resolve().parents[2] / "shared/data/zh-mini"))
needs_data = pytest.mark.skipif(not (DATA / "eval").is_dir(), reason=f"zh-mini data not found at {DATA}")
INSTRUCTION = "为这个句子生成表示以用于检索相关文章："


def _jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _sts_task(folder: Path, n: int) -> Path:
    """An STS task folder of the first `n` STSB pairs (bundle layout); returns it."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = (DATA / "eval" / "STSB" / "data.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines[:n]]
    (folder / "task.json").write_text(json.dumps({"name": folder.name, "type": "STS", "main_score": "cosine_spearman",
                                                  "min_score": 0, "max_score": 5}))
    _jsonl(folder / "data.jsonl", rows)
    return folder


def _retrieval_task(folder: Path, n: int) -> Path:
    """A retrieval task of `n` CMRC questions and their paragraphs."""
    src = DATA / "eval" / "CMRCRetrieval"
    queries = [json.loads(x) for x in (src / "queries.jsonl").read_text(encoding="utf-8").splitlines()[:n]]
    qrels = [q for q in map(json.loads, (src / "qrels.jsonl").read_text(encoding="utf-8").splitlines())
             if q["query_id"] in {x["id"] for x in queries}]
    docs = [d for d in map(json.loads, (src / "corpus.jsonl").read_text(encoding="utf-8").splitlines())
            if d["id"] in {q["doc_id"] for q in qrels}]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "task.json").write_text(json.dumps({"name": folder.name, "type": "Retrieval",
                                                  "main_score": "ndcg_at_10"}))
    _jsonl(folder / "queries.jsonl", queries)
    _jsonl(folder / "corpus.jsonl", docs)
    _jsonl(folder / "qrels.jsonl", qrels)
    return folder


def _independent(fit_texts: list[str], texts: list[str]) -> np.ndarray:
    """The floor as the issue states it, written out: sklearn's pieces, numpy's norm."""
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer

    tfidf = TfidfVectorizer(analyzer="char", ngram_range=(1, 2), sublinear_tf=True)
    svd = TruncatedSVD(256, random_state=0).fit(tfidf.fit_transform(fit_texts))
    z = svd.transform(tfidf.transform(texts))
    return z / np.linalg.norm(z, axis=1, keepdims=True)


@needs_data
def test_embeddings_and_score_equal_an_independent_sklearn_pipeline(tmp_path):
    from scipy.stats import spearmanr

    from embedkit.eval.lexical import LexicalFloor, lexical_floor, task_texts
    from embedkit.eval.tasks import build_task

    folder = _sts_task(tmp_path / "MiniSTS", 400)
    rows = [json.loads(line) for line in (folder / "data.jsonl").read_text(encoding="utf-8").splitlines()]
    s1, s2 = [r["sentence1"] for r in rows], [r["sentence2"] for r in rows]
    distinct = list(dict.fromkeys(s1 + s2))   # each text once: some sentences recur across pairs
    assert len(distinct) < len(s1 + s2)
    task = build_task(folder)
    assert task_texts(task) == distinct

    floor = LexicalFloor().fit(task_texts(task))
    got = floor.encode(s1)
    assert got.dtype == np.float32 and got.shape == (len(s1), 256)
    np.testing.assert_allclose(got, _independent(distinct, s1), atol=1e-5)

    # Scored through the suite's mteb path: STS's main score is the Spearman correlation of the
    # cosine similarities with the gold scores.
    a, b = _independent(distinct, s1), _independent(distinct, s2)
    expected = 100 * spearmanr((a * b).sum(1), [r["score"] for r in rows]).statistic
    results = lexical_floor([task], cache_dir=None, query_instruction=None)
    assert results["tasks"]["MiniSTS"] == pytest.approx(expected, abs=1e-3)
    assert results["Avg"] == results["tasks"]["MiniSTS"] and results["categories"] == {"STS": results["Avg"]}
    assert results["lexical_floor"]["label"] == "lexical floor: char 1-2-gram TF-IDF -> SVD 256"


@needs_data
def test_each_task_is_fitted_on_its_own_texts_with_the_instruction_on_queries(tmp_path, monkeypatch):
    from embedkit.eval import lexical
    from embedkit.eval.tasks import build_task

    sts, ret = build_task(_sts_task(tmp_path / "MiniSTS", 60)), build_task(_retrieval_task(tmp_path / "MiniRet", 20))
    fitted = []
    fit = lexical.LexicalFloor.fit
    monkeypatch.setattr(lexical.LexicalFloor, "fit", lambda self, texts: fitted.append(list(texts)) or fit(self, texts))
    lexical.lexical_floor([ret, sts], cache_dir=None, query_instruction=INSTRUCTION)
    queries = [INSTRUCTION + q["text"] for q in map(json.loads, (tmp_path / "MiniRet" / "queries.jsonl").read_text(
        encoding="utf-8").splitlines())]
    docs = [d["text"] for d in map(json.loads, (tmp_path / "MiniRet" / "corpus.jsonl").read_text(
        encoding="utf-8").splitlines())]
    # once per task, in mteb's order, and the STS texts carry no instruction
    assert len(fitted) == 2
    assert set(fitted[0]) == set(queries) | set(docs)
    assert not any(t.startswith(INSTRUCTION) for t in fitted[1])

    # A task sharing every text with the one before is still embedded by its own fit, not served
    # the earlier fit's vectors: it scores as it does alone.
    small = build_task(_sts_task(tmp_path / "SmallSTS", 30))
    alone = lexical.lexical_floor([small], cache_dir=None, query_instruction=None)["tasks"]["SmallSTS"]
    after = lexical.lexical_floor([sts, small], cache_dir=None, query_instruction=None)["tasks"]
    assert after["SmallSTS"] == pytest.approx(alone, abs=1e-9)
    assert after["SmallSTS"] != pytest.approx(after["MiniSTS"], abs=1e-3)


@needs_data
def test_the_cache_is_reused_and_goes_stale_with_the_texts(tmp_path, monkeypatch):
    from embedkit.eval import lexical
    from embedkit.eval.tasks import build_task

    fits = []
    fit = lexical.LexicalFloor.fit
    monkeypatch.setattr(lexical.LexicalFloor, "fit", lambda self, texts: fits.append(1) or fit(self, texts))
    cache = tmp_path / "cache"
    folder = _sts_task(tmp_path / "MiniSTS", 60)
    first = lexical.lexical_floor([build_task(folder)], cache_dir=cache, query_instruction=None)
    assert len(fits) == 1
    (entry,) = (cache / "lexical_floor").iterdir()
    assert entry.name == first["lexical_floor"]["key"] and (entry / "floor.json").is_file()

    again = lexical.lexical_floor([build_task(folder)], cache_dir=cache, query_instruction=None)
    assert len(fits) == 1 and again == first            # read back, not refitted
    # an instruction touches retrieval and re-ranking queries only: the STS texts, and key, stay
    lexical.lexical_floor([build_task(folder)], cache_dir=cache, query_instruction=INSTRUCTION)
    assert len(fits) == 1

    rows = (folder / "data.jsonl").read_text(encoding="utf-8").splitlines()
    row = json.loads(rows[0])
    row["sentence1"] = "一个完全不同的句子"
    (folder / "data.jsonl").write_text("\n".join([json.dumps(row, ensure_ascii=False), *rows[1:]]) + "\n",
                                       encoding="utf-8")
    changed = lexical.lexical_floor([build_task(folder)], cache_dir=cache, query_instruction=None)
    assert len(fits) == 2 and changed["lexical_floor"]["key"] != first["lexical_floor"]["key"]
    assert len(list((cache / "lexical_floor").iterdir())) == 2

    # a row cap changes the texts too
    lexical.lexical_floor([build_task(folder, max_rows=30)], cache_dir=cache, query_instruction=None)
    assert len(fits) == 3
    # the instruction does change a retrieval task's key
    ret = _retrieval_task(tmp_path / "MiniRet", 20)
    keys = {lexical.lexical_floor([build_task(ret)], cache_dir=cache, query_instruction=i)["lexical_floor"]["key"]
            for i in (None, INSTRUCTION)}
    assert len(keys) == 2 and len(fits) == 5


def test_small_and_degenerate_fits():
    from embedkit.eval.lexical import LexicalFloor

    texts = ["北京是首都", "上海在长江口", "长江很长", "熊猫吃竹子", "今天天气好"]
    vectors = LexicalFloor().fit(texts).encode(texts)
    # fewer texts than the SVD width: it keeps the directions there are
    assert vectors.shape == (5, 5)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="distinct character n-gram"):
        LexicalFloor().fit(["啊", "啊"])
    with pytest.raises(RuntimeError, match="before fit"):
        LexicalFloor().encode(texts)


def test_an_official_task_is_refused_naming_the_setting():
    from types import SimpleNamespace

    from embedkit.eval.lexical import task_texts

    with pytest.raises(ValueError, match="eval.lexical_floor=false"):
        task_texts(SimpleNamespace(metadata=SimpleNamespace(name="T2Retrieval", type="Retrieval")))


def test_the_switch_is_on_for_the_mini_suite_and_off_for_the_official_one(compose_run, tmp_path):
    from hydra.utils import instantiate

    from embedkit.eval.suite import MiniCMTEB

    mini = instantiate(compose_run().eval)
    assert mini.lexical_floor is True and mini.cache_dir == f"{tmp_path}/cache"
    assert instantiate(compose_run(["eval=cmteb"]).eval).lexical_floor is False
    assert MiniCMTEB(data_dir=str(DATA)).floor() is None      # off unless asked for
    with pytest.raises(ValueError, match="eval.lexical_floor must be true or false"):
        MiniCMTEB(data_dir=str(DATA), lexical_floor="yes")


def test_a_run_table_ends_with_the_floor_row(tmp_path, monkeypatch, capsys):
    """The recipe adds the suite's floor as the last row of table.md / table.json and the printed
    table, under `lexical_floor` in table.json, and keeps it out of table.csv."""
    from omegaconf import OmegaConf

    import embedkit.recipes.train_eval as recipe
    from embedkit.reporting.tables import FLOOR_KEY

    floor = {"tasks": {"STSB": 40.0, "CMRCRetrieval": 90.0}, "categories": {"STS": 40.0, "Retrieval": 90.0},
             "Avg": 65.0, "lexical_floor": {"label": "lexical floor: char 1-2-gram TF-IDF -> SVD 256",
                                            "settings": {"svd_dim": 256}, "key": "abc"}}
    calls = []

    class Suite:
        name = "fake"

        def floor(self):
            calls.append(1)
            return floor

    rows = [{"label": "32", "paper_row": None, "overrides": {}, "stages": None}]
    monkeypatch.setattr(recipe, "run_row", lambda cfg, row, *a: {"": {"label": row["label"],
                                                                       "categories": {"STS": 2.0}, "Avg": 2.0}})
    monkeypatch.setattr(recipe, "ablation_rows", lambda cfg: rows)
    monkeypatch.setattr(recipe.Examples, "get", lambda self, data_cfg: ([], ["字"]))
    monkeypatch.setattr(recipe.Examples, "key", lambda self, data_cfg: "rows")
    monkeypatch.setattr(recipe, "instantiate", lambda node, **kw: Suite())
    out = tmp_path / "run"
    cfg = OmegaConf.create({"paths": {"output_dir": str(out)}, "model": {"tokenizer": {}}, "data": {},
                            "eval": {}, "experiment_name": "x", "scale": {"name": "mini"}, "ablation": None})
    assert recipe.run(cfg) == 2.0
    assert calls == [1]
    table = json.loads((out / "table.json").read_text())
    assert [r["label"] for r in table] == ["32", "lexical floor: char 1-2-gram TF-IDF -> SVD 256"]
    assert FLOOR_KEY not in table[0]
    assert table[1][FLOOR_KEY]["tasks"] == floor["tasks"] and table[1]["Avg"] == 65.0
    assert table[1]["Retrieval"] == 90.0 and table[1]["CLF"] is None
    line = "| lexical floor: char 1-2-gram TF-IDF -> SVD 256 | 90.00 | 40.00 | – | – | – | – | 65.00 |"
    assert line in (out / "table.md").read_text() and line in capsys.readouterr().out
    assert "lexical floor" not in (out / "table.csv").read_text()
