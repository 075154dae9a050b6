"""A staged run whose task stage mines its hard negatives with the previous stage's encoder.

C-Pack §4.3 mines the task data "with the stage-1 model" (FlagEmbedding hn_mine.py). The recipe
reads every stage's rows before training any stage (one vocabulary), so the mined data module
(embedkit/mining/data.py) must serve its rows as read until the stage's training sets it up, and
mine then, with the folder the previous stage has written by that time.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RANGE, NEGATIVES, KEEP = (2, 40), 3, 20

# Two stages at smoke size: general (InfoNCE on the zh-mini task rows, in-batch negatives), then
# task, whose data mines with general's model (model.init_from of the task stage).
STAGED = [
    "debug=smoke", "~logger", "data.max_examples=160", "trainer.max_steps=2",
    "checkpoint.every_n_train_steps=0",
    "model.tokenizer.corpora=[]",   # the vocabulary from the training rows only: no People's Daily read
    "+objective@stages.general.objective=infonce", "+data@stages.general.data=zh_mini_task",
    "+objective@stages.task.objective=infonce", "+data@stages.task.data=zh_mini_mined",
    "stages.task.data.train_group_size=2",
    f"stages.task.data.mining.range_for_sampling={RANGE[0]}-{RANGE[1]}",
    f"stages.task.data.mining.negative_number={NEGATIVES}",
    f"stages.task.data.mining.keep_candidates={KEEP}",
    "ablation={rows: {mini: [{label: staged, stages: [general, task]}]}}",
]


def _reference_ranking(model_dir: Path, rows: list[dict]):
    """Pool and, per row, the pool indices by cosine to the query, best first: sentence-transformers
    embeds (not embedkit's encoder), numpy ranks (not faiss)."""
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(model_dir), device="cpu")
    pool = list(dict.fromkeys(t for r in rows for t in (*r["pos"], *r.get("neg", ()))))
    # The miner's query instruction is null; a row's prompt ("" for NLI/STS) goes in front.
    queries = [(r.get("prompt") or "") + r["query"] for r in rows]
    q = st.encode(queries, convert_to_numpy=True, normalize_embeddings=True)
    p = st.encode(pool, convert_to_numpy=True, normalize_embeddings=True)
    scores = q.astype(np.float64) @ p.astype(np.float64).T
    return pool, scores, np.argsort(-scores, axis=1, kind="stable")


def test_the_task_stage_mines_with_the_saved_general_stage_after_it_finished(compose_run, monkeypatch,
                                                                              capsys):
    import embedkit.mining.ann as ann
    import embedkit.mining.data as mined_data
    import embedkit.recipes.train_eval as recipe
    from embedkit.eval.suite import MiniCMTEB
    from embedkit.recipes.rows import ablation_rows

    cfg = compose_run(STAGED)
    out_dir = Path(cfg.paths.output_dir)
    (row,) = recipe.planned(cfg, ablation_rows(cfg), out_dir)
    general, task = row["plan"]
    general_model = general["dir"] / "model"
    assert task["cfg"].data.mining.model_path == str(general_model)

    calls = []
    real_mine_rows, real_miner = mined_data.mine_rows, ann.HardNegativeMiner.__call__

    def mine_rows(rows, **kwargs):
        # Mining must wait for the general stage: its model folder, .done written last.
        calls.append({"model_path": kwargs.get("model_path"),
                      "general_done": (general_model / ".done").exists()})
        return real_mine_rows(rows, **kwargs)

    def miner(self, rows, encoder, **kwargs):
        calls[-1]["mined"] = True
        return real_miner(self, rows, encoder, **kwargs)

    monkeypatch.setattr(mined_data, "mine_rows", mine_rows)
    monkeypatch.setattr(ann.HardNegativeMiner, "__call__", miner)
    # Scoring the task stage is not under test here (and importing mteb would double the time).
    monkeypatch.setattr(MiniCMTEB, "check", lambda self: None)
    monkeypatch.setattr(MiniCMTEB, "evaluate", lambda self, *a, **k: {"categories": {"STS": 0.0}, "Avg": 0.0})

    # The plan and its preflight neither mine nor need the general stage's folder.
    plan_cfg = compose_run([*STAGED, "plan=true"])
    assert recipe.run(plan_cfg) is None
    assert "stage task" in capsys.readouterr().out
    from embedkit.recipes.preflight import config_problems

    assert config_problems(cfg, ablation_rows(cfg)) == []
    assert calls == [] and not general_model.exists()

    recipe.run(cfg)
    assert calls == [{"model_path": str(general_model), "general_done": True, "mined": True}]
    results = json.loads((out_dir / "results.json").read_text())
    assert results["stage_steps"] == {"general": 2, "task": 2}

    # The task stage's rows as the recipe reads them (for the vocabulary): unmined.
    data = instantiate(task["cfg"].data)
    rows = data.examples
    assert calls[1:] == [] and all("candidates" not in r for r in rows)
    (cached,) = (Path(cfg.paths.cache_dir) / "mined").glob("*.jsonl")
    mined = [json.loads(line) for line in cached.read_text(encoding="utf-8").splitlines()]
    assert [(m["query"], m["pos"]) for m in mined] == [(r["query"], r["pos"]) for r in rows]

    pool, scores, order = _reference_ranking(general_model, rows)
    index = {t: j for j, t in enumerate(pool)}
    a, b = RANGE
    exact, from_window = 0, 0
    for r, m, s, ranked in zip(rows, mined, scores, order):
        forbidden = {r["query"].strip(), *(p.strip() for p in r["pos"])}
        clean = [j for j in ranked if pool[j].strip() not in forbidden]
        window = [j for j in ranked[a:b] if pool[j].strip() not in forbidden]
        got = [index[t] for t in m["candidates"]]
        # The kept ranking is the reference's first KEEP, up to float-rounding ties.
        np.testing.assert_allclose(s[got], s[clean[:KEEP]], rtol=0, atol=1e-5)
        exact += got == clean[:KEEP]
        neg = [index[t] for t in m["neg"]]
        assert len(neg) == NEGATIVES == len(set(neg)) and not forbidden & set(m["neg"])
        # Negatives come from ranks a..b-1 (the window's scores, with the same tolerance).
        if len(window) >= NEGATIVES:
            lo, hi = s[ranked[b - 1]] - 1e-5, s[ranked[a]] + 1e-5
            assert all(lo <= s[j] <= hi for j in neg), (r["query"], m["neg"])
            from_window += set(neg) <= set(window)
    assert exact >= 0.95 * len(rows) and from_window >= 0.95 * len(rows)

    # A re-run of the stage (resume, or another row with the same stage) reads the cache.
    again = instantiate(task["cfg"].data)
    again.use_examples(rows)
    assert again.mine() == mined and calls[-1] == {"model_path": str(general_model),
                                                    "general_done": True}


# ---------------------------------------------------------------- the module on its own

ROWS = [{"query": f"第{i}个问题关于{c}", "pos": [f"{c}的答案段落{i}"], "neg": []}
        for i, c in enumerate("天地人山水火木金土日月星")]


def _module(tmp_path, train_instruction=None, **mining):
    from embedkit.mining.data import MinedContrastiveDataModule

    return MinedContrastiveDataModule([lambda: ROWS], mining={"range_for_sampling": "0-8",
                                      "negative_number": 3, **mining}, batch_size=4,
                                      train_group_size=2, query_instruction=train_instruction,
                                      cache_dir=str(tmp_path / "cache"))


def test_a_missing_model_folder_is_named_when_the_data_is_set_up(tmp_path):
    missing = tmp_path / "stages" / "general-abc" / "model"
    dm = _module(tmp_path, model_path=str(missing))
    assert dm.examples == ROWS            # building and reading need no model
    with pytest.raises(FileNotFoundError, match=r"data\.mining\.model_path: no encoder folder at "
                                                r".*stages/general-abc/model"):
        dm.setup("fit")
    missing.mkdir(parents=True)           # a folder, but nothing saved in it
    with pytest.raises(FileNotFoundError, match=r"data\.mining\.model_path: .*config\.json missing"):
        dm.setup("fit")


def test_mining_settings_are_checked_when_the_module_is_built(tmp_path):
    with pytest.raises(ValueError, match=r"data\.mining: unknown setting\(s\) \['negative_numbr'\]"):
        _module(tmp_path, negative_numbr=3)
    with pytest.raises(ValueError, match=r"data\.mining\.range_for_sampling needs 0 <= a < b"):
        _module(tmp_path, range_for_sampling="20-10")
    with pytest.raises(ValueError, match=r"data\.mining\.negative_number must be an integer"):
        _module(tmp_path, negative_number="many")
    with pytest.raises(ValueError, match=r"data\.mining\.index must be one of"):
        _module(tmp_path, index="hnsw")


def test_the_miner_embeds_queries_with_the_mining_instruction_not_the_training_one(tmp_path,
                                                                                   monkeypatch):
    from embedkit.models.encoder import TextEncoder

    embedded = []
    real = TextEncoder.encode

    def encode(self, texts, *args, **kwargs):
        embedded.append(list(texts))
        return real(self, texts, *args, **kwargs)

    monkeypatch.setattr(TextEncoder, "encode", encode)
    _module(tmp_path / "a", train_instruction="训练：", query_instruction="挖掘：").mine()
    assert embedded[0] == ["挖掘：" + r["query"] for r in ROWS]
    # None (hn_mine.py's default) embeds the plain queries, whatever the training instruction.
    _module(tmp_path / "b", train_instruction="训练：").mine()
    assert embedded[2] == [r["query"] for r in ROWS]


def test_rows_mined_with_one_model_are_not_served_for_another_saved_at_the_same_path(tmp_path,
                                                                                     monkeypatch):
    import embedkit.mining.ann as ann
    from embedkit.models.vocab import build_char_vocab, save_tokenizer

    from helpers import tiny_encoder

    mined = []
    real = ann.HardNegativeMiner.__call__

    def miner(self, rows, encoder, **kwargs):
        mined.append(1)
        return real(self, rows, encoder, **kwargs)

    monkeypatch.setattr(ann.HardNegativeMiner, "__call__", miner)
    tokenizer = save_tokenizer(build_char_vocab([t for r in ROWS for t in (r["query"], *r["pos"])]),
                               tmp_path / "tok")
    folder = tmp_path / "stage" / "model"
    tiny_encoder(tokenizer, seed=0, pooling="mean").save_pretrained(folder)
    first = _module(tmp_path, model_path=str(folder), keep_candidates=8).mine()
    assert _module(tmp_path, model_path=str(folder), keep_candidates=8).mine() == first
    (folder / ".done").write_text('{"train_seconds": 1.0}')   # the stage's record is not the model
    assert _module(tmp_path, model_path=str(folder), keep_candidates=8).mine() == first
    assert len(mined) == 1
    tiny_encoder(tokenizer, seed=1, pooling="mean").save_pretrained(folder)   # trained again
    _module(tmp_path, model_path=str(folder), keep_candidates=8).mine()
    assert len(mined) == 2
