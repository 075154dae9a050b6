"""The mining, filter, DHNM and multi-task configs compose and build what they name."""

from hydra.utils import instantiate

from helpers import compose


def test_mining_settings_are_sweepable_data_settings():
    cfg = compose(["data=zh_mini_mined", "data.mining.range_for_sampling=2-200",
                  "data.mining.negative_number=3", "data.train_group_size=2"])
    assert cfg.data.mining.range_for_sampling == "2-200" and cfg.data.mining.negative_number == 3
    assert cfg.data.train_group_size == 2
    cfg = compose(["data=mined_file", "data.sources.0.pattern=/tmp/mined.jsonl"])
    assert cfg.data.sources[0].pattern == "/tmp/mined.jsonl"


def test_mine_config_builds_its_filters_and_miner():
    cfg = compose(["+filter@filters.teacher=teacher", "filters.teacher.threshold=0.43",
                  "miner.index=ivf", "miner.range_for_sampling=2-200"], "mine")
    teacher, minhash = instantiate(cfg.filters.teacher), instantiate(cfg.filters.minhash)
    assert teacher.threshold == 0.43 and minhash.ngram == 3
    miner = instantiate(cfg.miner)
    assert miner.settings["index"] == "ivf" and miner.settings["range_for_sampling"] == "2-200"


def test_dhnm_callback_and_multitask_objective_compose():
    cfg = compose(["objective=multitask", "data=multitask", "data.mode=sequential",
                  "+callbacks=dhnm", "callbacks.dhnm.task=retrieval"])
    cb = instantiate(cfg.callbacks.dhnm)
    assert (cb.check_every, cb.ratio, cb.max_abs, cb.offset, cb.task) == (100, 1.15, 0.8, 10, "retrieval")
    assert cfg.data.tasks.retrieval.train_group_size == 4 and cfg.data.mode == "sequential"
    assert cfg.data.tasks.retrieval.query_instruction == cfg.eval.query_instruction   # ${instruction.query}
    assert "query_instruction" not in cfg.data and "query_instruction" not in cfg.data.tasks.sts
    assert set(cfg.objective.tasks) == {"retrieval", "sts"}
