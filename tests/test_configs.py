"""Config composition for every experiment at both scales, and Hydra's errors on typos."""

import functools
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from embedkit.config import CONFIG_DIR
from helpers import compose
from helpers import resolve as _resolve

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
_compose = functools.partial(compose, return_hydra_config=True)


def test_experiments_exist():
    assert "bge_ablation_batchsize" in EXPERIMENTS


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("scale", ["mini", "paper"])
@pytest.mark.parametrize("debug", [[], ["debug=smoke"]])
def test_every_experiment_composes_at_both_scales(experiment, scale, debug):
    cfg = _compose([f"+experiment={experiment}", f"scale={scale}", *debug])
    resolved = _resolve(cfg)
    assert resolved["scale"]["name"] == scale
    assert resolved["experiment_name"] == experiment
    offered = resolved.get("experiment_scales") or [scale]
    if scale not in offered:   # an experiment for some scales only (the run refuses the others)
        assert scale not in ((resolved.get("ablation") or {}).get("rows") or {})
        return
    rows = resolved["ablation"]["rows"][scale] if resolved.get("ablation") else []
    for row in rows:
        for key in row.get("overrides") or {}:
            parts = key.split(".")
            # a stage's trainer/model tweaks merge into the run's (embedkit/recipes/rows.py stage_config)
            tweak = parts[0] == "stages" and len(parts) > 3 and parts[1] in cfg.stages and parts[2] in ("trainer", "model")
            assert tweak or OmegaConf.select(cfg, key) is not None, f"row override {key} names no config key"


def test_paper_scale_carries_the_papers_values():
    cfg = _resolve(_compose(["+experiment=bge_ablation_batchsize", "scale=paper"]))
    assert cfg["model"]["name"] == "hf"
    assert cfg["data"]["query_max_len"] == 128 and cfg["data"]["passage_max_len"] == 128
    assert 1e-5 <= cfg["objective"]["lr"] <= 3e-5
    assert 0.01 <= cfg["objective"]["temperature"] <= 0.02
    assert cfg["trainer"]["strategy"] == "ddp"
    assert cfg["eval"]["_target_"].endswith("OfficialCMTEB")
    largest = cfg["ablation"]["rows"]["paper"][-1]["overrides"]
    assert (largest["stages.general.data.batch_size"] * largest["stages.general.trainer.devices"]
            * largest["stages.general.trainer.num_nodes"]) == 19200
    # the rest of the paper's settings: tests/test_fidelity.py against experiments/*/fidelity.yaml


def test_mini_is_the_default_and_runs_on_cpu():
    cfg = _resolve(_compose([]))
    assert cfg["scale"]["name"] == "mini"
    assert cfg["model"]["name"] == "tiny_zh"
    assert cfg["trainer"]["accelerator"] == "cpu"
    # the default logs to W&B (offline: no key, no network) and CSV together (conf/logger/default.yaml)
    assert cfg["logger"]["wandb"]["offline"] is True
    assert cfg["logger"]["csv"]["_target_"].endswith("CSVLogger")
    assert Path(cfg["paths"]["data_dir"]).name == "zh-mini" or "EMBEDKIT_DATA_DIR" in __import__("os").environ


def test_objective_and_eval_instantiate_from_config():
    cfg = _compose(["+experiment=bge_ablation_batchsize", "debug=smoke"])
    _resolve(cfg)
    suite = instantiate(cfg.eval)
    assert suite.max_rows == 64 and suite.query_instruction is None
    objective = instantiate(cfg.objective, encoder=None)
    assert objective.loss.temperature == 0.02 and cfg.data.train_group_size == 1


BGE = "为这个句子生成表示以用于检索相关文章："


@pytest.mark.parametrize("experiment, expected", [
    # {(row, stage): instruction on training queries and on eval queries} of the final stages
    ("bge_ablation_recipe", {("BGE-pretrain", "pretrain"): None, ("BGE-pretrain", "general"): None,
                             ("BGE w.o. pre-train", "general"): None, ("BGE w.o. Instruct", "general"): None,
                             ("BGE w.o. Instruct", "task"): None, ("BGE-finetune", "task"): BGE}),
    ("conan_ablation", {("Baseline", "general"): None, ("Vanilla", "vanilla"): BGE, ("+DHNM", "dhnm"): BGE,
                        ("+CBB", "cbb"): BGE, ("Conan", "conan"): BGE}),
    ("m3_ablation_selfdistill", {("self-distill", None): None}),
    ("mrl_dims", {("*", None): BGE}),   # a plain run: one row, labelled by its overrides
    ("bge_ablation_batchsize", {("32", None): None, ("512", None): None}),
])
def test_one_instruction_node_reaches_the_training_data_and_the_eval(compose_run, experiment, expected):
    """`instruction.query` (or `stages.<name>.instruction.query`) is what the stage's contrastive data
    puts in front of training queries and what the eval puts in front of retrieval queries."""
    from embedkit.recipes.rows import ablation_rows, row_config, stage_config

    cfg = compose_run([f"+experiment={experiment}", "debug=smoke"])
    found = {}
    for row in ablation_rows(cfg):
        row_cfg = row_config(cfg, row["overrides"])
        for stage in row["stages"] or [None]:
            stage_cfg = stage_config(row_cfg, stage, None)
            data = OmegaConf.to_container(stage_cfg.data, resolve=True)
            trained = (data["tasks"]["retrieval"] if "tasks" in data else data).get("query_instruction")
            if stage != "pretrain":
                assert trained == stage_cfg.eval.query_instruction, (row["label"], stage)
            found[(row["label"], stage)] = stage_cfg.eval.query_instruction
            found[("*", stage)] = stage_cfg.eval.query_instruction
    assert {k: found[k] for k in expected} == expected


def test_only_contrastive_data_takes_an_instruction():
    cfg = _compose(["+experiment=conan_ablation"])
    assert "query_instruction" not in cfg.stages.vanilla.data
    assert "query_instruction" not in cfg.stages.vanilla.data.tasks.sts
    for data in ("sts_pairs", "pd_corpus"):
        assert "query_instruction" not in _compose([f"data={data}"]).data, data


def test_typo_in_a_group_option_lists_the_valid_options():
    with pytest.raises((MissingConfigException, ConfigCompositionException)) as err:
        _compose(["model=tiny_zhh"])
    message = str(err.value)
    assert "tiny_zhh" in message and "tiny_zh" in message and "hf" in message


def test_unknown_experiment_lists_the_experiments():
    with pytest.raises((MissingConfigException, ConfigCompositionException)) as err:
        _compose(["+experiment=bge_ablation_batchsiz"])
    assert "bge_ablation_batchsize" in str(err.value)


def test_model_hf_config_builds_from_a_local_checkpoint(tmp_path):
    import torch
    from transformers import BertConfig, BertModel

    from embedkit.models.vocab import build_char_vocab, save_tokenizer

    tok = save_tokenizer(build_char_vocab(["检索模型测试"]), tmp_path / "ckpt")
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(tmp_path / "ckpt")
    cfg = _compose(["model=hf", f"model.name_or_path={tmp_path / 'ckpt'}"])
    _resolve(cfg)
    tokenizer = instantiate(cfg.model.tokenizer, texts=None, out_dir=str(tmp_path / "run_tok"))
    encoder = instantiate(cfg.model.encoder, tokenizer=tokenizer)
    assert encoder.pooling == "cls" and encoder.dim == 32
    assert (tmp_path / "run_tok" / "tokenizer_config.json").exists()
    emb = encoder.encode(["检索测试", "模型"])
    # A float32 unit vector: 32 squares, rounded to ≤ 32·eps32 = 4e-6; unnormalised it is far off 1.
    assert emb.shape == (2, 32) and abs(float((emb[0] ** 2).sum()) - 1) < 1e-5


def test_missing_data_dir_says_where_it_looked_and_how_to_fix_it(tmp_path):
    from embedkit.data.paths import require_data_dir

    with pytest.raises(FileNotFoundError) as err:
        require_data_dir(tmp_path / "nope")
    message = str(err.value)
    assert str(tmp_path / "nope") in message
    assert "EMBEDKIT_DATA_DIR" in message and "paths.data_dir" in message


def test_paper_scale_data_reads_cmtp_files_from_a_local_stand_in(tmp_path, monkeypatch):
    import json

    for name, n in [("part-0.jsonl", 3), ("part-1.jsonl", 2)]:
        with open(tmp_path / name, "w", encoding="utf-8") as f:
            for i in range(n):
                f.write(json.dumps({"query": f"{name}问题{i}", "pos": [f"段落{i}"], "neg": []}, ensure_ascii=False) + "\n")
    monkeypatch.setenv("CMTP_DIR", str(tmp_path))
    cfg = _compose(["+experiment=bge_ablation_batchsize", "scale=paper"])
    _resolve(cfg)
    data = instantiate(cfg.data)
    assert len(data.examples) == 5 and data.batch_size == 800
    monkeypatch.setenv("CMTP_DIR", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="CMTP_DIR"):
        instantiate(_compose(["scale=paper"]).data).examples
