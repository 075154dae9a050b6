"""embedkit.eval against the real mteb 2.x evaluator, on the local zh-mini tasks (no network, no GPU)."""

from __future__ import annotations

import json
import math
import os
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest

from embedkit.eval.cmteb import CATEGORIES, HubUnavailableError, evaluate_tasks, official_cmteb_tasks, summarize
from embedkit.eval.encoder import MtebEncoder
from embedkit.eval.tasks import TASK_TYPES, TaskDataError, build_task, load_local_tasks

DATA = Path(os.environ.get("EMBEDKIT_DATA_DIR", Path(__file__).resolve().parents[2] / "shared/data/zh-mini"))
EVAL_DIR = DATA / "eval"
BGE_INSTRUCTION = "为这个句子生成表示以用于检索相关文章："

needs_data = pytest.mark.skipif(not EVAL_DIR.is_dir(), reason=f"zh-mini data not found at {DATA}")


class CharBigramEncoder:
    """Hashed bag of character unigrams and bigrams (log tf, L2-normalised): a lexical baseline."""

    def __init__(self, dim: int = 2048) -> None:
        self.dim = dim

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            chars = [c for c in text if not c.isspace()]
            for gram in chars + [a + b for a, b in zip(chars, chars[1:])]:
                out[row, zlib.crc32(gram.encode("utf-8")) % self.dim] += 1.0
        out = np.log1p(out)
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


class RandomEncoder:
    """A fixed random vector per text: no information, so scores sit at chance level."""

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        vecs = np.stack([np.random.default_rng(zlib.crc32(t.encode("utf-8"))).standard_normal(64) for t in texts])
        return (vecs / np.linalg.norm(vecs, axis=1, keepdims=True)).astype(np.float32)


class RecordingEncoder(CharBigramEncoder):
    def __init__(self) -> None:
        super().__init__(dim=256)
        self.seen: list[str] = []

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        self.seen.extend(texts)
        return super().encode(texts, batch_size)


def _quiet_evaluate(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn's ill-defined-precision warnings on tiny samples
        return evaluate_tasks(*args, show_progress=False, **kwargs)


# --------------------------------------------------------------------------------------------------
# aggregation


def test_summarize_follows_cmteb_rules():
    scores = {
        "R1": ("Retrieval", 10.0),
        "R2": ("Retrieval", 20.0),
        "R3": ("Retrieval", 60.0),
        "S1": ("STS", 90.0),
    }
    summary = summarize(scores)
    assert summary["categories"] == {"Retrieval": 30.0, "STS": 90.0}
    # Avg is the mean over the 4 tasks, not the mean of the 2 categories (which would be 60)
    assert summary["Avg"] == pytest.approx(45.0)
    assert summary["tasks"] == {"R1": 10.0, "R2": 20.0, "R3": 60.0, "S1": 90.0}


def test_summarize_uses_short_category_names_and_rejects_unknown_types():
    summary = summarize({name: (task_type, 50.0) for name, task_type in zip("abcdef", CATEGORIES)})
    assert list(summary["categories"]) == ["Retrieval", "STS", "PairCLF", "CLF", "Rerank", "Cluster"]
    with pytest.raises(ValueError, match="Regression"):
        summarize({"x": ("Regression", 1.0)})


# --------------------------------------------------------------------------------------------------
# loading the zh-mini tasks

EXPECTED = {
    "CMRCRetrieval": ("AbsTaskRetrieval", "Retrieval", "ndcg_at_10"),
    "SnliRetrieval": ("AbsTaskRetrieval", "Retrieval", "ndcg_at_10"),
    "CMRCReranking": ("AbsTaskRetrieval", "Reranking", "map_at_1000"),  # task.json "map", mteb 2 name
    "SnliReranking": ("AbsTaskRetrieval", "Reranking", "map_at_1000"),
    "STSB": ("AbsTaskSTS", "STS", "cosine_spearman"),
    "LCQMC": ("AbsTaskSTS", "STS", "cosine_spearman"),
    "PAWSX": ("AbsTaskSTS", "STS", "cosine_spearman"),
    "AFQMC": ("AbsTaskSTS", "STS", "cosine_spearman"),
    "Ocnli": ("AbsTaskPairClassification", "PairClassification", "max_ap"),
    "Csnli": ("AbsTaskPairClassification", "PairClassification", "max_ap"),
    "TNewsClassification": ("AbsTaskClassification", "Classification", "accuracy"),
    "TNewsClustering": ("AbsTaskClustering", "Clustering", "v_measure"),
}


@pytest.fixture(scope="module")
def full_tasks():
    return {task.metadata.name: task for task in load_local_tasks(EVAL_DIR)}


@needs_data
def test_all_twelve_tasks_load_with_mteb_type_and_main_score(full_tasks):
    import mteb.abstasks as abstasks

    assert sorted(full_tasks) == sorted(EXPECTED)
    for name, (base_name, task_type, main_score) in EXPECTED.items():
        task = full_tasks[name]
        assert isinstance(task, getattr(abstasks, base_name)), name
        assert task.metadata.type == task_type
        assert task.metadata.main_score == main_score
        assert task.metadata.eval_langs == ["cmn-Hans"]
        assert task.data_loaded


@needs_data
def test_loaded_data_matches_the_files(full_tasks):
    cmrc = full_tasks["CMRCRetrieval"].dataset["default"]["test"]
    assert (len(cmrc["queries"]), len(cmrc["corpus"])) == (501, 128)
    rerank = full_tasks["CMRCReranking"].dataset["default"]["test"]
    assert len(rerank["top_ranked"]) == 501 and all(len(c) == 10 for c in rerank["top_ranked"].values())
    assert len(full_tasks["LCQMC"].dataset["test"]) == 8802
    stsb = full_tasks["STSB"]
    assert (stsb.min_score, stsb.max_score) == (0, 5)
    assert (full_tasks["AFQMC"].min_score, full_tasks["AFQMC"].max_score) == (0, 1)
    tnews = full_tasks["TNewsClassification"].dataset
    assert (len(tnews["train"]), len(tnews["test"])) == (2464, 2464)


@needs_data
def test_subsampling_is_seeded_and_keeps_what_each_task_needs():
    def load(seed):
        return {t.metadata.name: t for t in load_local_tasks(EVAL_DIR, max_rows=40, seed=seed)}

    a, b, c = load(0), load(0), load(1)
    queries = lambda tasks: list(tasks["SnliRetrieval"].dataset["default"]["test"]["queries"]["id"])  # noqa: E731
    assert queries(a) == queries(b) and queries(a) != queries(c)
    assert len(queries(a)) == 40

    snli = a["SnliRetrieval"].dataset["default"]["test"]
    corpus_ids = set(snli["corpus"]["id"])
    assert all(set(rel) <= corpus_ids for rel in snli["relevant_docs"].values())
    assert len(corpus_ids) > sum(len(rel) for rel in snli["relevant_docs"].values())  # distractors too

    tnews = a["TNewsClassification"].dataset
    assert len(set(tnews["train"]["label"])) == 15 and len(set(tnews["test"]["label"])) == 15
    assert len(a["LCQMC"].dataset["test"]) == 40
    full_lcqmc = load_local_tasks(EVAL_DIR, ["LCQMC"])[0]
    assert a["LCQMC"].metadata.dataset["revision"] != full_lcqmc.metadata.dataset["revision"]


# --------------------------------------------------------------------------------------------------
# end to end through mteb.evaluate


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    tasks = load_local_tasks(EVAL_DIR, max_rows=150)
    wrapper = MtebEncoder(CharBigramEncoder(), "test/char-bigram", revision="rev-a")
    return out, _quiet_evaluate(wrapper, tasks, out, batch_size=64)


@needs_data
def test_end_to_end_scores_all_categories(smoke_run):
    out, summary = smoke_run
    assert set(summary["tasks"]) == set(EXPECTED)
    assert set(summary["categories"]) == set(CATEGORIES.values())
    for score in [*summary["tasks"].values(), *summary["categories"].values(), summary["Avg"]]:
        assert math.isfinite(score) and 0.0 <= score <= 100.0
    assert summary["Avg"] == pytest.approx(sum(summary["tasks"].values()) / 12)
    assert json.loads((out / "results.json").read_text(encoding="utf-8"))["Avg"] == pytest.approx(summary["Avg"])


@needs_data
def test_character_overlap_wins_on_cmrc_and_random_does_not(smoke_run, tmp_path):
    _, lexical = smoke_run
    assert lexical["tasks"]["CMRCRetrieval"] > 85.0
    tasks = load_local_tasks(EVAL_DIR, ["CMRCRetrieval"], max_rows=150)
    random = _quiet_evaluate(MtebEncoder(RandomEncoder(), "test/random", "r"), tasks, tmp_path, batch_size=64)
    assert random["tasks"]["CMRCRetrieval"] < 30.0
    assert lexical["tasks"]["CMRCRetrieval"] - random["tasks"]["CMRCRetrieval"] > 50.0


@needs_data
def test_runs_with_different_revisions_keep_separate_results(tmp_path):
    tasks = load_local_tasks(EVAL_DIR, ["STSB"], max_rows=60)
    first = _quiet_evaluate(MtebEncoder(CharBigramEncoder(), "test/enc", "ckpt-1"), tasks, tmp_path, batch_size=32)
    second = _quiet_evaluate(MtebEncoder(RandomEncoder(), "test/enc", "ckpt-2"), tasks, tmp_path, batch_size=32)
    assert first["tasks"]["STSB"] != pytest.approx(second["tasks"]["STSB"])

    model_dir = tmp_path / "mteb" / "results" / "test__enc"
    assert sorted(p.name for p in model_dir.iterdir()) == ["ckpt-1", "ckpt-2"]
    for revision, summary in (("ckpt-1", first), ("ckpt-2", second)):
        saved = json.loads((model_dir / revision / "STSB.json").read_text(encoding="utf-8"))
        assert 100 * saved["scores"]["test"][0]["main_score"] == pytest.approx(summary["tasks"]["STSB"], abs=1e-3)


@needs_data
def test_re_evaluating_a_task_object_is_deterministic(tmp_path):
    tasks = load_local_tasks(EVAL_DIR, ["TNewsClustering", "TNewsClassification"], max_rows=150)
    wrapper = MtebEncoder(CharBigramEncoder(dim=512), "test/enc", "same")
    first = _quiet_evaluate(wrapper, tasks, tmp_path / "a", batch_size=64)
    second = _quiet_evaluate(wrapper, tasks, tmp_path / "b", batch_size=64)
    assert first["tasks"] == second["tasks"]


def test_model_names_get_an_organisation_and_revisions_are_required():
    assert MtebEncoder(CharBigramEncoder(), "plain", "r1").mteb_model_meta.name == "embedkit/plain"
    with pytest.raises(ValueError, match="revision"):
        MtebEncoder(CharBigramEncoder(), "org/x", "")


@needs_data
def test_instruction_goes_to_retrieval_and_reranking_queries_only(tmp_path):
    names = ["CMRCRetrieval", "CMRCReranking", "STSB"]
    tasks = {t.metadata.name: t for t in load_local_tasks(EVAL_DIR, names, max_rows=12)}
    seen = {}
    for name, task in tasks.items():
        enc = RecordingEncoder()
        _quiet_evaluate(MtebEncoder(enc, "test/rec", name, query_instruction=BGE_INSTRUCTION), [task], tmp_path, 16)
        seen[name] = enc.seen

    for name in ("CMRCRetrieval", "CMRCReranking"):
        split = tasks[name].dataset["default"]["test"]
        queries, docs = set(split["queries"]["text"]), {t.strip() for t in split["corpus"]["text"]}
        prefixed = {t[len(BGE_INSTRUCTION):] for t in seen[name] if t.startswith(BGE_INSTRUCTION)}
        plain = {t for t in seen[name] if not t.startswith(BGE_INSTRUCTION)}
        assert prefixed == queries, name  # every query, and only queries, got the instruction
        assert plain == docs, name  # every passage went in unchanged

    sts = tasks["STSB"].dataset["test"]
    assert not any(t.startswith(BGE_INSTRUCTION) for t in seen["STSB"])
    assert set(seen["STSB"]) == set(sts["sentence1"]) | set(sts["sentence2"])


@needs_data
def test_instruction_rule_by_task_type_and_prompt_type(full_tasks):
    from mteb.types import PromptType

    wrapper = MtebEncoder(CharBigramEncoder(), "test/rule", "r", query_instruction=BGE_INSTRUCTION)
    for name, (_, task_type, _) in EXPECTED.items():
        metadata = full_tasks[name].metadata
        expected = BGE_INSTRUCTION if task_type in ("Retrieval", "Reranking") else ""
        # even if a task asked for query-side encoding, only retrieval/reranking queries get the instruction
        assert wrapper.instruction_for(metadata, PromptType.query) == expected, name
        assert wrapper.instruction_for(metadata, PromptType.document) == "", name
        assert wrapper.instruction_for(metadata, None) == "", name
    no_instruction = MtebEncoder(CharBigramEncoder(), "test/rule", "r")
    assert no_instruction.instruction_for(full_tasks["CMRCRetrieval"].metadata, PromptType.query) == ""


# --------------------------------------------------------------------------------------------------
# bad input


def _write_task(root: Path, config: dict, files: dict[str, str]) -> Path:
    task_dir = root / config.get("name", "Broken")
    task_dir.mkdir(parents=True)
    (task_dir / "task.json").write_text(json.dumps(config), encoding="utf-8")
    for name, text in files.items():
        (task_dir / name).write_text(text, encoding="utf-8")
    return task_dir


def test_unknown_task_type_lists_the_valid_ones(tmp_path):
    task_dir = _write_task(tmp_path, {"name": "Odd", "type": "Regression", "main_score": "x"}, {})
    with pytest.raises(TaskDataError) as err:
        build_task(task_dir)
    message = str(err.value)
    assert str(task_dir / "task.json") in message and "Regression" in message
    assert all(task_type in message for task_type in TASK_TYPES)


# --------------------------------------------------------------------------------------------------
# the suite's task folders are a configured list


def _own_task(tmp_path: Path, name: str = "MyAFQMC") -> Path:
    """A user's own task: a copy of a small zh-mini task under another name, outside the bundle."""
    import shutil

    folder = tmp_path / "my_tasks" / name
    shutil.copytree(EVAL_DIR / "AFQMC", folder)
    config = json.loads((folder / "task.json").read_text(encoding="utf-8"))
    (folder / "task.json").write_text(json.dumps({**config, "name": name}), encoding="utf-8")
    return folder


def _mini_cmteb(overrides):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from embedkit.config import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.data_dir={DATA}", "eval.max_rows=24", "seed=0",
                                          "eval.show_progress=false", *overrides])
    return instantiate(cfg.eval)


@needs_data
def test_the_suite_is_the_listed_folders_and_ignores_unlisted_ones(tmp_path):
    import shutil

    suite = _mini_cmteb([])
    assert [f.name for f in suite.task_folders()] == sorted(EXPECTED)   # the 12, by name
    # A bundle with a folder nobody listed (not even a task): the suite never reads it.
    bundle = tmp_path / "bundle"
    shutil.copytree(EVAL_DIR / "STSB", bundle / "eval" / "STSB")
    shutil.copytree(EVAL_DIR / "AFQMC", bundle / "eval" / "AFQMC")
    (bundle / "eval" / "NotATask").mkdir()
    suite = _mini_cmteb([f"eval.data_dir={bundle}", "eval.task_dirs=[STSB,AFQMC]"])
    assert [t.metadata.name for t in suite.tasks()] == ["STSB", "AFQMC"]
    # A listed folder that is missing is an error, not a smaller average.
    with pytest.raises(TaskDataError, match=r"task folder\(s\) not found: .*LCQMC"):
        _mini_cmteb([f"eval.data_dir={bundle}", "eval.task_dirs=[STSB,LCQMC]"]).tasks()


@needs_data
def test_a_users_own_task_folder_joins_with_one_config_line(tmp_path):
    folder = _own_task(tmp_path)
    suite = _mini_cmteb([f"eval.extra_task_dirs=[{folder}]", "eval.tasks=[STSB,MyAFQMC]"])
    assert [t.metadata.name for t in suite.tasks()] == ["STSB", "MyAFQMC"]
    results = _quiet_evaluate(MtebEncoder(CharBigramEncoder(), "test/own", "r"), suite.tasks(), tmp_path / "out",
                              batch_size=32)
    assert set(results["tasks"]) == {"STSB", "MyAFQMC"}
    assert results["Avg"] == pytest.approx((results["tasks"]["STSB"] + results["tasks"]["MyAFQMC"]) / 2)
    # Every listed task plus the user's: 13, the user's last.
    every = _mini_cmteb([f"eval.extra_task_dirs=[{folder}]"])
    assert [f.name for f in every.task_folders()] == [*sorted(EXPECTED), "MyAFQMC"]
    # Only the user's tasks: no bundled folder is listed.
    only = _mini_cmteb([f"eval.extra_task_dirs=[{folder}]", "eval.task_dirs=[]", "eval.data_dir=/nonexistent"])
    assert [t.metadata.name for t in only.tasks()] == ["MyAFQMC"]


@needs_data
def test_two_task_folders_of_one_name_are_refused(tmp_path):
    folder = _own_task(tmp_path, "STSB")
    with pytest.raises(TaskDataError, match="two task folders are named 'STSB'"):
        _mini_cmteb([f"eval.extra_task_dirs=[{folder}]"]).tasks()


def test_missing_task_json_is_named(tmp_path):
    (tmp_path / "Empty").mkdir()
    with pytest.raises(TaskDataError, match="task.json"):
        load_local_tasks(tmp_path)


def test_missing_data_file_is_named(tmp_path):
    config = {"name": "Ret", "type": "Retrieval", "main_score": "ndcg_at_10"}
    task_dir = _write_task(tmp_path, config, {"corpus.jsonl": '{"id": "d1", "text": "x"}\n',
                                              "qrels.jsonl": '{"query_id": "q1", "doc_id": "d1", "score": 1}\n'})
    with pytest.raises(TaskDataError) as err:
        build_task(task_dir)
    assert str(task_dir / "queries.jsonl") in str(err.value)


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    config = {"name": "Sts", "type": "STS", "main_score": "cosine_spearman", "min_score": 0, "max_score": 5}
    good = '{"sentence1": "a", "sentence2": "b", "score": 1.0}\n'
    task_dir = _write_task(tmp_path, config, {"data.jsonl": good + good + '{"sentence1": "a", "sentence2": \n' + good})
    with pytest.raises(TaskDataError) as err:
        build_task(task_dir)
    assert f"{task_dir / 'data.jsonl'}, line 3" in str(err.value)


def test_missing_field_names_file_and_line(tmp_path):
    config = {"name": "Pairs", "type": "PairClassification", "main_score": "max_ap"}
    rows = '{"sentence1": "a", "sentence2": "b", "label": 1}\n{"sentence1": "a", "label": 0}\n'
    task_dir = _write_task(tmp_path, config, {"data.jsonl": rows})
    with pytest.raises(TaskDataError, match=r"data.jsonl, line 2: missing field\(s\) \['sentence2'\]"):
        build_task(task_dir)


@needs_data
def test_a_main_score_mteb_does_not_compute_is_reported(tmp_path):
    task_dir = tmp_path / "STSB"
    task_dir.mkdir()
    config = json.loads((EVAL_DIR / "STSB" / "task.json").read_text(encoding="utf-8"))
    (task_dir / "task.json").write_text(json.dumps({**config, "main_score": "spearman_typo"}), encoding="utf-8")
    rows = (EVAL_DIR / "STSB" / "data.jsonl").read_text(encoding="utf-8").splitlines()[:30]
    (task_dir / "data.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="spearman_typo"):
        _quiet_evaluate(MtebEncoder(CharBigramEncoder(), "test/x", "r"), [build_task(task_dir)], tmp_path, 16)


def test_sts_needs_its_score_range(tmp_path):
    task_dir = _write_task(tmp_path, {"name": "S", "type": "STS", "main_score": "cosine_spearman"}, {})
    with pytest.raises(TaskDataError, match="min_score"):
        build_task(task_dir)


# --------------------------------------------------------------------------------------------------
# official C-MTEB


def test_official_cmteb_tasks_come_from_mteb_metadata():
    tasks = official_cmteb_tasks()
    names = {task.metadata.name for task in tasks}
    assert {"T2Retrieval", "LCQMC", "TNews", "CLSClusteringS2S", "T2Reranking", "Ocnli"} <= names
    assert {task.metadata.type for task in tasks} == set(CATEGORIES)
    sts = official_cmteb_tasks(["STS"])
    assert sts and {task.metadata.type for task in sts} == {"STS"}
    with pytest.raises(ValueError, match="Bitext"):
        official_cmteb_tasks(["BitextMining"])


def test_official_task_offline_raises_hub_needed(monkeypatch, tmp_path):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # both libraries read the variables at import time, so patch what they already read; empty caches make
    # sure a machine that once downloaded LCQMC cannot answer from its cache
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")

    task = next(t for t in official_cmteb_tasks(["STS"]) if t.metadata.name == "LCQMC")
    with pytest.raises(HubUnavailableError, match="Hugging Face hub") as err:
        _quiet_evaluate(MtebEncoder(CharBigramEncoder(), "test/offline", "r"), [task], tmp_path, 32)
    assert "eval=cmteb" in str(err.value) and "LCQMC" in str(err.value)
