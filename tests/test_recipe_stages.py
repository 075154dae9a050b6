"""Multi-stage rows: stage configs, reuse keys, and handing a stage's encoder to the next."""

import pytest
import torch
from omegaconf import OmegaConf

from embedkit.models.build import init_encoder_from, tiny_zh_encoder
from embedkit.models.vocab import build_char_vocab, save_tokenizer
from embedkit.recipes.rows import row_config, stage_config
from embedkit.recipes.train_eval import stage_key

BASE = OmegaConf.create({
    "seed": 1,
    "model": {"name": "tiny_zh", "init_from": None, "encoder": {"hidden_size": 32}},
    "trainer": {"max_epochs": 1},
    "objective": {"_target_": "top.Objective", "lr": 1.0},
    "data": {"_target_": "top.Data", "batch_size": 8},
    "stages": {
        "pretrain": {"objective": {"_target_": "a.RetroMAE", "lr": 1e-4},
                     "data": {"_target_": "a.Corpus", "batch_size": 4}, "trainer": {"max_epochs": 3}},
        "task": {"objective": {"_target_": "b.InfoNCE", "lr": 1e-5},
                 "data": {"_target_": "b.Groups", "batch_size": 2, "query_instruction": "指令："}},
    },
})


def test_stage_swaps_objective_and_data_and_merges_trainer():
    cfg = stage_config(BASE, "pretrain", None)
    assert cfg.objective._target_ == "a.RetroMAE" and cfg.data._target_ == "a.Corpus"
    assert cfg.trainer.max_epochs == 3 and BASE.trainer.max_epochs == 1   # the base is untouched
    assert stage_config(BASE, None, None).objective._target_ == "top.Objective"


def test_previous_stage_feeds_the_next_through_init_from():
    cfg = stage_config(BASE, "task", "/runs/x/stages/pretrain-abc/model")
    assert cfg.model.init_from == "/runs/x/stages/pretrain-abc/model"


def test_unknown_stage_is_a_clear_error():
    with pytest.raises(KeyError, match="defines"):
        stage_config(BASE, "general", None)


def test_row_overrides_reach_stage_settings_and_change_the_reuse_key():
    plain = stage_config(BASE, "task", "init")
    no_instruction = stage_config(row_config(BASE, {"stages.task.data.query_instruction": None}), "task", "init")
    assert no_instruction.data.query_instruction is None
    assert stage_key(plain) != stage_key(no_instruction)
    assert stage_key(plain) == stage_key(stage_config(BASE, "task", "init"))
    assert stage_key(plain) != stage_key(stage_config(BASE, "task", "other-init"))


def test_a_stage_sets_the_instruction_its_data_and_the_eval_read():
    base = OmegaConf.merge(BASE, {
        "instruction": {"query": None},
        "eval": {"query_instruction": "${instruction.query}"},
        "stages": {"task": {"instruction": {"query": "指令："},
                            "data": {"query_instruction": "${instruction.query}"}},
                   "pretrain": {"data": {"query_instruction": "${instruction.query}"}}}})
    task = stage_config(base, "task", None)
    assert task.data.query_instruction == task.eval.query_instruction == "指令："
    pretrain = stage_config(base, "pretrain", None)   # no instruction of its own: the run's
    assert pretrain.data.query_instruction is None and pretrain.eval.query_instruction is None
    assert base.instruction.query is None   # the base is untouched
    plain = stage_config(row_config(base, {"stages.task.instruction.query": None}), "task", None)
    assert plain.data.query_instruction is None and plain.eval.query_instruction is None
    assert stage_key(plain) != stage_key(task)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return save_tokenizer(build_char_vocab(["中文句子编码测试"]), tmp_path_factory.mktemp("tok"))


def test_init_encoder_from_loads_the_saved_weights(tokenizer, tmp_path):
    torch.manual_seed(0)
    trained = tiny_zh_encoder(tokenizer, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    trained.save_pretrained(tmp_path / "stage")
    torch.manual_seed(1)
    fresh = tiny_zh_encoder(tokenizer, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    assert not torch.equal(fresh.backbone.embeddings.word_embeddings.weight,
                           trained.backbone.embeddings.word_embeddings.weight)
    init_encoder_from(fresh, tmp_path / "stage")
    for (name, a), (_, b) in zip(fresh.backbone.state_dict().items(), trained.backbone.state_dict().items()):
        assert torch.equal(a, b), name


def test_init_encoder_from_refuses_a_different_architecture(tokenizer, tmp_path):
    tiny_zh_encoder(tokenizer, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64).save_pretrained(tmp_path / "s")
    one_layer = tiny_zh_encoder(tokenizer, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    with pytest.raises(ValueError, match="does not fit"):
        init_encoder_from(one_layer, tmp_path / "s")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        init_encoder_from(one_layer, tmp_path / "nowhere")
