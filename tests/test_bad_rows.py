"""`data.on_bad_row=error|skip` end to end: very long lines, the setting reaching every file source
from the config, and the skip report reaching the log and results.json through the recipe."""

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from embedkit.data.readers import BadRowError, read_retrieval_jsonl, read_sts_jsonl

GOOD = json.dumps({"query": "北京的天气", "pos": ["北京今天晴。"], "neg": ["上海下雨。"]}, ensure_ascii=False)
GOOD_STS = json.dumps({"sentence1": "一架飞机要起飞了。", "sentence2": "一架飞机正在起飞。", "score": 4.0},
                      ensure_ascii=False)


def _several_mb_line() -> str:
    # Valid JSON, valid UTF-8: only its size is wrong (3 MB of text on one line).
    return json.dumps({"query": "q", "pos": ["长" * 1_000_000]}, ensure_ascii=False)


def test_a_line_of_several_mb_is_a_bad_row_naming_its_line(tmp_path):
    p = tmp_path / "train.jsonl"
    p.write_text("\n".join([GOOD, GOOD, _several_mb_line(), GOOD]) + "\n", encoding="utf-8")
    with pytest.raises(BadRowError) as err:
        read_retrieval_jsonl(p)
    assert str(err.value).startswith(f"{p}:3: line of 3,000,0")
    assert "exceeds max_line_bytes=1,048,576" in str(err.value)
    res = read_retrieval_jsonl(p, on_bad_row="skip")
    assert len(res) == 3 and [n for n, _ in res.skipped] == [3]
    assert len(read_retrieval_jsonl(p, max_line_bytes=None)) == 4   # the limit is a setting


def test_the_line_limit_applies_to_sts_files_too(tmp_path):
    p = tmp_path / "sts.jsonl"
    long = json.dumps({"sentence1": "a" * 2_000_000, "sentence2": "b", "score": 1.0})
    p.write_text("\n".join([GOOD_STS, long]) + "\n", encoding="utf-8")
    with pytest.raises(BadRowError, match=r":2: line of 2,000,0\d\d bytes"):
        read_sts_jsonl(p)


def _bundle(tmp_path: Path) -> Path:
    """A zh-mini-like bundle: one retrieval file with 2 bad rows of 5, one STS file with 1 of 3."""
    train = tmp_path / "bundle" / "train"
    train.mkdir(parents=True)
    rows = [GOOD, '{"query": "q", "pos": []}', GOOD,
            json.dumps({"query": "q", "pos": ["同"], "neg": ["同"]}, ensure_ascii=False), GOOD]
    (train / "pairs.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    sts = [GOOD_STS, json.dumps({"sentence1": "a", "sentence2": "b", "score": 7}), GOOD_STS]
    (train / "sts.jsonl").write_text("\n".join(sts) + "\n", encoding="utf-8")
    return tmp_path / "bundle"


def _data_cfg(bundle: Path, policy: str, target="embedkit.data.contrastive.ContrastiveDataModule"):
    source = ({"_target_": "embedkit.data.sources.zh_mini_jsonl", "_partial_": True,
               "data_dir": str(bundle), "file": "train/pairs.jsonl"}
              if "Contrastive" in target else
              {"_target_": "embedkit.data.sts.sts_jsonl", "_partial_": True, "data_dir": str(bundle),
               "file": "train/sts.jsonl", "score_range": [0, 5]})
    return OmegaConf.create({"_target_": target, "sources": [source], "batch_size": 2, "on_bad_row": policy})


def test_data_on_bad_row_reaches_the_file_sources(tmp_path, caplog):
    bundle = _bundle(tmp_path)
    with pytest.raises(BadRowError, match=r"pairs.jsonl:2: 'pos' is an empty list"):
        instantiate(_data_cfg(bundle, "error")).examples
    data = instantiate(_data_cfg(bundle, "skip"))
    with caplog.at_level(logging.WARNING, logger="embedkit.data.base"):
        assert len(data.examples) == 3
    path = str(bundle / "train" / "pairs.jsonl")
    assert [n for n, _ in data.bad_rows[path]] == [2, 4]
    assert f"skipped 2 bad row(s) of {path}" in caplog.text and "line 2: 'pos' is an empty list" in caplog.text
    sts = instantiate(_data_cfg(bundle, "skip", "embedkit.data.sts.StsDataModule"))
    assert len(sts.examples) == 2 and list(sts.bad_rows) == [str(bundle / "train" / "sts.jsonl")]
    with pytest.raises(Exception, match="data.on_bad_row must be one of"):   # wrapped by Hydra
        instantiate(_data_cfg(bundle, "ignore"))


def test_a_source_that_sets_its_own_policy_keeps_it(tmp_path):
    cfg = _data_cfg(_bundle(tmp_path), "skip")
    cfg.sources[0].on_bad_row = "error"
    with pytest.raises(BadRowError):
        instantiate(cfg).examples


def test_the_policy_reaches_every_vocabulary_corpus_that_reads_files(tmp_path, caplog):
    """The vocabulary re-reads training files (`model.tokenizer.corpora`): the run's on_bad_row
    reaches each of them, unless a corpus's own config sets one."""
    from functools import partial

    from embedkit.data.sources import jsonl_texts
    from embedkit.models.build import char_level_tokenizer

    bundle = _bundle(tmp_path)
    corpora = [lambda: ["无需读文件"], partial(jsonl_texts, data_dir=str(bundle), file="train/pairs.jsonl"),
               partial(jsonl_texts, data_dir=str(bundle), file="train/sts.jsonl", format="sts")]
    with pytest.raises(BadRowError, match=r"pairs.jsonl:2"):
        char_level_tokenizer([], tmp_path / "strict", corpora=corpora, on_bad_row="error")
    with caplog.at_level(logging.WARNING, logger="embedkit.data.sources"):
        tok = char_level_tokenizer([], tmp_path / "tok", corpora=corpora, on_bad_row="skip")
    assert "skipped 2 bad row(s)" in caplog.text and "需" in tok.get_vocab() and "飞" in tok.get_vocab()
    corpora[1] = partial(jsonl_texts, data_dir=str(bundle), file="train/pairs.jsonl", on_bad_row="error")
    with pytest.raises(BadRowError):
        char_level_tokenizer([], tmp_path / "own", corpora=corpora, on_bad_row="skip")


def test_the_configured_vocabulary_corpora_leave_the_policy_to_the_run():
    from hydra import compose, initialize_config_dir

    from embedkit.config import CONFIG_DIR

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["model=tiny_zh"])
    files = [c for c in cfg.model.tokenizer.corpora if "file" in c]
    assert len(files) == 5 and not [c for c in cfg.model.tokenizer.corpora if "on_bad_row" in c]


def test_every_data_config_has_the_switch():
    from hydra import compose, initialize_config_dir

    from embedkit.config import CONFIG_DIR

    for data in ("weak_pairs", "zh_mini_task", "sts_pairs", "pd_corpus", "cmtp"):
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            cfg = compose("train", overrides=[f"data={data}", "data.on_bad_row=skip"])
        assert cfg.data.on_bad_row == "skip", data


class _FakeSuite:
    name = "fake"

    def evaluate(self, encoder=None, *, model_name, revision, output_dir, **kwargs):
        return {"tasks": {"STSB": 50.0}, "categories": {"STS": 50.0}, "Avg": 50.0}


def test_the_skip_count_reaches_results_json_through_the_recipe(tmp_path, monkeypatch):
    """The recipe's own Examples reads the data (for real); training and eval are stubbed."""
    import embedkit.recipes.train_eval as recipe

    bundle = _bundle(tmp_path)
    module = SimpleNamespace(eval_targets=lambda: {"": {"encoder": None}})
    monkeypatch.setattr(recipe, "train_stage", lambda *a, **k: {
        "module": module, "logger": False, "seconds": 0.1,
        "record": {"steps": 3, "final_train_loss": None, "training": None}})
    cfg = OmegaConf.create({"experiment_name": "bad", "scale": {"name": "mini"}, "seed": 0,
                            "model": {"init_from": None}, "data": _data_cfg(bundle, "skip"),
                            "objective": {}, "trainer": {}, "logger": None, "eval": {}})
    row = {"label": "run", "paper_row": None, "overrides": {}, "stages": None}
    examples = recipe.Examples()
    examples.get(cfg.data)
    (tmp_path / "out").mkdir()
    recipe.run_row(cfg, row, None, examples, _FakeSuite(), tmp_path / "out", tmp_path / "out")
    results = json.loads((tmp_path / "out" / "results.json").read_text(encoding="utf-8"))
    report = results["bad_rows"][str(bundle / "train" / "pairs.jsonl")]
    assert report["count"] == 2
    assert report["first"][0] == "line 2: 'pos' is an empty list"
    assert report["first"][1].startswith("line 4: pos[0] also appears as neg[0]")

    clean = recipe.Examples()
    cfg.data.on_bad_row = "error"
    (bundle / "train" / "good.jsonl").write_text(GOOD + "\n" + GOOD + "\n", encoding="utf-8")
    cfg.data.sources[0].file = "train/good.jsonl"
    clean.get(cfg.data)
    recipe.run_row(cfg, row, None, clean, _FakeSuite(), tmp_path / "out", tmp_path / "out")
    assert json.loads((tmp_path / "out" / "results.json").read_text())["bad_rows"] == {}
