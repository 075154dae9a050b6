"""Which rows a data config reads is its module's to say (`examples_key`): the recipe reads rows
once per key and shares them, so a module whose rows depend on an argument of its own must not
share another config's rows, while configs that differ only in batching must."""

import pytest
from omegaconf import OmegaConf

from embedkit.data.contrastive import ContrastiveDataModule
from embedkit.recipes.train_eval import Examples

ROWS = [{"query": "短", "pos": ["一"]}, {"query": "长一点的问题", "pos": ["二"]},
        {"query": "中等问题", "pos": ["三"]}, {"query": "很长很长的一个问题", "pos": ["四"]}]


def rows() -> list[dict]:
    return [dict(r) for r in ROWS]


class ShortQueries(ContrastiveDataModule):
    """A data module that reads only queries of at most `max_query_chars` characters: an argument
    no other module has, which decides which rows are read."""

    def __init__(self, sources, max_query_chars: int = 100, **kwargs):
        super().__init__(sources, **kwargs)
        self.max_query_chars = max_query_chars

    @property
    def examples(self):
        if self._examples is None:
            self._examples = [r for r in ContrastiveDataModule.examples.fget(self)
                              if len(r["query"]) <= self.max_query_chars]
        return self._examples


def _cfg(target=f"{__name__}.ShortQueries", **kwargs):
    return OmegaConf.create({"_target_": target, "batch_size": 1,
                             "sources": [{"_target_": f"{__name__}.rows", "_partial_": True}], **kwargs})


def test_an_argument_that_decides_the_rows_gives_distinct_examples():
    examples = Examples()
    short, _ = examples.get(_cfg(max_query_chars=4))
    every, _ = examples.get(_cfg(max_query_chars=100))
    assert [r["query"] for r in short] == ["短", "中等问题"]
    assert len(every) == 4
    assert examples.key(_cfg(max_query_chars=4)) != examples.key(_cfg(max_query_chars=100))


def test_batching_arguments_share_one_read():
    examples = Examples()
    first, _ = examples.get(_cfg(max_query_chars=4))
    again, _ = examples.get(_cfg(max_query_chars=4, batch_size=2, train_group_size=2, num_workers=0,
                                 query_instruction="为检索：", group_by_length=False))
    assert again is first


def test_the_key_is_the_modules_own():
    base = ContrastiveDataModule([rows], batch_size=1)
    assert base.examples_key() == ContrastiveDataModule([rows], batch_size=64, query_max_len=8).examples_key()
    assert base.examples_key() != ContrastiveDataModule([rows], batch_size=1, max_examples=2).examples_key()
    assert base.examples_key() != ContrastiveDataModule([rows], batch_size=1, seed=1).examples_key()
    assert base.examples_key() != ContrastiveDataModule([rows], batch_size=1, on_bad_row="skip").examples_key()
    # Another module class over the same sources reads its own rows.
    assert base.examples_key() != ShortQueries([rows], batch_size=1).examples_key()


def test_mined_rows_depend_on_the_instruction_the_miner_embeds_queries_with():
    from embedkit.mining.data import MinedContrastiveDataModule

    def key(instruction):
        return MinedContrastiveDataModule([rows], mining={"negative_number": 1}, batch_size=1,
                                          query_instruction=instruction).examples_key()

    assert key("为检索：") != key(None)
    assert key(None) != MinedContrastiveDataModule([rows], mining={"negative_number": 2}, batch_size=1).examples_key()


def test_a_copied_module_keeps_its_key():
    import copy
    import pickle

    dm = ShortQueries([rows], max_query_chars=4, batch_size=1)
    assert copy.deepcopy(dm).examples_key() == dm.examples_key()
    assert pickle.loads(pickle.dumps(dm)).examples_key() == dm.examples_key()


def test_multitask_key_is_its_tasks_and_its_cap():
    from embedkit.data.multitask import MultiTaskDataModule
    from embedkit.data.sts import StsDataModule

    def multitask(**kw):
        return MultiTaskDataModule({"retrieval": ContrastiveDataModule([rows], batch_size=1),
                                    "sts": StsDataModule([rows], batch_size=2)}, **kw)

    assert multitask(mode="cbb").examples_key() == multitask(mode="sequential", seed=3).examples_key()
    assert multitask().examples_key() != multitask(max_examples=2).examples_key()


def test_a_module_built_without_its_arguments_still_fails_as_before():
    with pytest.raises(TypeError):
        ContrastiveDataModule()
