"""The mining, filter, DHNM and multi-task configs compose and build what they name."""

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

import embedkit.config  # noqa: F401  the ${embedkit_root:} resolver

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def _compose(name, overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(name, overrides=overrides)


def test_mining_settings_are_sweepable_data_settings():
    cfg = _compose("train", ["data=zh_mini_mined", "data.mining.range_for_sampling=2-200",
                             "data.mining.negative_number=3", "objective.train_group_size=2"])
    assert cfg.data.mining.range_for_sampling == "2-200" and cfg.data.mining.negative_number == 3
    assert cfg.data.train_group_size == 2
    cfg = _compose("train", ["data=mined_file", "data.sources.0.pattern=/tmp/mined.jsonl"])
    assert cfg.data.sources[0].pattern == "/tmp/mined.jsonl"


def test_mine_config_builds_its_filters_and_miner():
    cfg = _compose("mine", ["+filter@filters.teacher=teacher", "filters.teacher.threshold=0.43",
                            "miner.index=ivf", "miner.range_for_sampling=2-200"])
    teacher, minhash = instantiate(cfg.filters.teacher), instantiate(cfg.filters.minhash)
    assert teacher.threshold == 0.43 and minhash.ngram == 3
    miner = instantiate(cfg.miner)
    assert miner.settings["index"] == "ivf" and miner.settings["range_for_sampling"] == "2-200"


def test_dhnm_callback_and_multitask_objective_compose():
    cfg = _compose("train", ["objective=multitask", "data=multitask", "data.mode=sequential",
                             "+callbacks=dhnm", "callbacks.dhnm.task=retrieval"])
    cb = instantiate(cfg.callbacks.dhnm)
    assert (cb.check_every, cb.ratio, cb.max_abs, cb.offset, cb.task) == (100, 1.15, 0.8, 10, "retrieval")
    assert cfg.data.tasks.retrieval.train_group_size == 4 and cfg.data.mode == "sequential"
    assert cfg.data.tasks.retrieval.query_instruction == cfg.eval.query_instruction   # ${instruction.query}
    assert "query_instruction" not in cfg.data and "query_instruction" not in cfg.data.tasks.sts
    assert set(cfg.objective.tasks) == {"retrieval", "sts"}
