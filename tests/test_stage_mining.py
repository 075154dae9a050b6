"""A staged run whose task stage mines its hard negatives with the previous stage's encoder.

C-Pack §4.3 mines the task data "with the stage-1 model" (FlagEmbedding hn_mine.py). The recipe
reads every stage's rows before training any stage (one vocabulary), so the mined data module
(embedkit/mining/data.py) must serve its rows as read until the stage's training sets it up, and
mine then, with the folder the previous stage has written by that time.
"""

import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")

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
