"""A saved model folder is also a sentence-transformers model: same embeddings, same mteb scores.

sentence-transformers is a dev dependency; these tests load the exported folders with the installed
version (5.x or 6.x) and compare against embedkit's own encoder and evaluation.
"""

import json
import warnings

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from embedkit.models.build import load_encoder
from embedkit.models.export import export_sentence_transformers
from embedkit.models.vocab import build_char_vocab, save_tokenizer

from helpers import DATA, tiny_encoder
from _numerics import RTOL32, assert_close_scaled

TEXTS = ["今天天气很好", "我们去公园散步吧", "人民日报一九九八年新年献词", "好", "embedding 模型 BGE",
         "一个女人在弹吉他。", "一个戴着安全帽的男人在跳舞，他跳得很好，旁边还有很多人在看。"]
STS_ROWS = 80

needs_data = pytest.mark.skipif(not (DATA / "eval" / "STSB").is_dir(),
                                reason=f"zh-mini data not found at {DATA}")


def _sts_texts() -> list[str]:
    texts = []
    with (DATA / "eval" / "STSB" / "data.jsonl").open(encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            texts += [row["sentence1"], row["sentence2"]]
    return texts


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = list(TEXTS)
    if (DATA / "eval" / "STSB").is_dir():
        texts += _sts_texts()
    return save_tokenizer(build_char_vocab(texts), tmp_path_factory.mktemp("tok"))


def _encoder(tokenizer, pooling="cls", projection_dim=None, normalize=True, seed=0):
    return tiny_encoder(tokenizer, seed, max_length=64, pooling=pooling, normalize=normalize,
                        projection_dim=projection_dim).eval()


def _sentence_transformer(path):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path), device="cpu")


@pytest.mark.parametrize("pooling,projection_dim,normalize", [
    ("cls", None, True),
    ("mean", None, True),
    ("cls", 16, True),      # Conan's layout: pooling, Dense, Normalize
    ("mean", 48, False),    # a widening projection, unnormalised
])
def test_sentence_transformers_gives_the_same_embeddings(tokenizer, tmp_path, pooling, projection_dim,
                                                         normalize):
    encoder = _encoder(tokenizer, pooling, projection_dim, normalize)
    out = export_sentence_transformers(encoder, tmp_path / "model")

    model = _sentence_transformer(out)
    theirs = model.encode(TEXTS, convert_to_numpy=True, batch_size=3)
    ours = encoder.encode(TEXTS)
    assert theirs.shape == ours.shape == (len(TEXTS), projection_dim or 32)
    # Two pipelines (padding, batching, kernels) in float32: relative to the embeddings' scale,
    # which the unnormalised projection sets (tests/_numerics.py).
    assert_close_scaled(theirs, ours, RTOL32)
    # embedkit reads the same folder back
    np.testing.assert_allclose(load_encoder(out).encode(TEXTS), ours, atol=1e-6)

    modules = json.loads((out / "modules.json").read_text())
    types = [m["type"].rsplit(".", 1)[-1] for m in modules]
    assert types == ["Transformer", "Pooling"] + (["Dense"] if projection_dim else []) + \
        (["Normalize"] if normalize else [])
    assert modules[0]["path"] == "" and [m["idx"] for m in modules] == list(range(len(modules)))
    pool_cfg = json.loads((out / "1_Pooling" / "config.json").read_text())
    assert pool_cfg["pooling_mode_cls_token"] is (pooling == "cls")
    assert pool_cfg["pooling_mode_mean_tokens"] is (pooling == "mean")
    assert json.loads((out / "sentence_bert_config.json").read_text()) == {"max_seq_length": 64,
                                                                          "do_lower_case": False}
    if projection_dim:
        dense = json.loads((out / "2_Dense" / "config.json").read_text())
        assert dense == {"in_features": 32, "out_features": projection_dim, "bias": True,
                         "activation_function": "torch.nn.modules.linear.Identity"}


def test_long_inputs_are_cut_at_the_same_length(tokenizer, tmp_path):
    encoder = _encoder(tokenizer, "mean")
    encoder.max_length = 8
    out = export_sentence_transformers(encoder, tmp_path / "model")
    model = _sentence_transformer(out)
    assert model.max_seq_length == 8
    assert_close_scaled(model.encode(TEXTS, convert_to_numpy=True), encoder.encode(TEXTS), RTOL32)


def test_re_export_without_projection_drops_the_stale_dense_module(tokenizer, tmp_path):
    export_sentence_transformers(_encoder(tokenizer, "cls", 16), tmp_path / "model")
    plain = _encoder(tokenizer, "cls", None, seed=1)
    out = export_sentence_transformers(plain, tmp_path / "model")
    assert not (out / "2_Dense").exists() and not (out / "projection.safetensors").exists()
    assert not (out / "3_Normalize").exists() and (out / "2_Normalize").is_dir()
    assert_close_scaled(_sentence_transformer(out).encode(TEXTS, convert_to_numpy=True),
                        plain.encode(TEXTS), RTOL32)


def test_export_refuses_what_is_not_a_text_encoder(tokenizer, tmp_path):
    from embedkit.objectives.matryoshka import TruncatedEncoder

    with pytest.raises(TypeError, match="TextEncoder"):
        export_sentence_transformers(TruncatedEncoder(_encoder(tokenizer), 8), tmp_path / "m")


def test_export_does_not_import_sentence_transformers():
    """It is a dev dependency only: exporting must work without it installed."""
    import ast
    import inspect

    import embedkit.models.export as export

    imported = set()
    for node in ast.walk(ast.parse(inspect.getsource(export))):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    assert imported and not any(name.startswith("sentence_transformers") for name in imported)


@needs_data
def test_mteb_scores_the_exported_folder_as_embedkit_scores_the_encoder(tokenizer, tmp_path):
    from mteb.models.sentence_transformer_wrapper import SentenceTransformerEncoderWrapper

    from embedkit.eval.cmteb import evaluate_tasks
    from embedkit.eval.suite import MiniCMTEB

    encoder = _encoder(tokenizer, "mean", 16)
    out = export_sentence_transformers(encoder, tmp_path / "model")
    suite = MiniCMTEB(data_dir=str(DATA), tasks=["STSB"], max_rows=STS_ROWS, show_progress=False,
                      batch_size=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = suite.evaluate(encoder, model_name="embedkit/export-test", revision="embedkit",
                              output_dir=tmp_path / "ours")
        wrapper = SentenceTransformerEncoderWrapper(_sentence_transformer(out))
        theirs = evaluate_tasks(wrapper, suite.tasks(), tmp_path / "theirs", batch_size=32,
                                show_progress=False)
    assert set(ours["tasks"]) == set(theirs["tasks"]) == {"STSB"}
    # The embeddings agree to float32 rounding, but Spearman is rank-based: pairs whose cosines
    # are within rounding of each other (here three pairs of identical sentences, cos = 1 ± 1 ulp)
    # may come in either order on another CPU, and each swap moves the score by up to
    # 100·12/(n(n+1)) points (0.19 at n = 80). Two swaps allowed; a wrong pooling or a lost
    # projection moves it by 9-14 points.
    swap = 100 * 12 / (STS_ROWS * (STS_ROWS + 1))
    assert theirs["tasks"]["STSB"] == pytest.approx(ours["tasks"]["STSB"], abs=2 * swap)
    assert ours["tasks"]["STSB"] != 0.0, ours


# ---------------------------------------------------------------------- the recipe's saved folder


@needs_data
def test_recipe_stage_folder_loads_in_sentence_transformers_and_keeps_m3_heads(tokenizer, tmp_path):
    """train_stage (the recipe) saves an M3 model: the folder is a SentenceTransformer, embedkit's
    load_encoder and load_m3 read it, and the heads are the trained ones."""
    from embedkit.models.m3_heads import load_m3
    from embedkit.recipes.train_eval import train_stage

    rows = [json.loads(line) for line in (DATA / "train" / "stsb_hardneg.jsonl").open(encoding="utf-8")][:32]
    rows = [{"query": r["query"], "pos": r["pos"], "neg": r.get("neg") or []} for r in rows]
    cfg = OmegaConf.create({
        "seed": 0,
        "model": {"name": "tiny_zh", "init_from": None,
                  "encoder": {"_target_": "embedkit.models.build.tiny_zh_encoder", "hidden_size": 32,
                              "num_layers": 1, "num_heads": 2, "intermediate_size": 64,
                              "max_length": 32, "pooling": "cls"}},
        "data": {"_target_": "embedkit.data.contrastive.ContrastiveDataModule", "sources": [],
                 "batch_size": 4, "train_group_size": 2, "query_max_len": 16, "passage_max_len": 32,
                 "cache_dir": str(tmp_path / "cache")},
        "objective": {"_target_": "embedkit.objectives.m3.M3",
                      "lr": 1e-3, "warmup_ratio": 0.0},
        "trainer": {"_target_": "pytorch_lightning.Trainer", "accelerator": "cpu", "devices": 1,
                    "max_steps": 2, "enable_checkpointing": False, "enable_progress_bar": False,
                    "enable_model_summary": False, "default_root_dir": str(tmp_path)},
        "logger": None,
    })
    stage = train_stage(cfg, "m3-export", tokenizer, rows, tmp_path / "stage")
    module = stage["module"]
    assert stage["record"]["steps"] == 2 and stage["record"]["training"]["batches"] == 2
    folder = tmp_path / "stage" / "model"
    assert (folder / "modules.json").exists() and (folder / "m3_heads.safetensors").exists()

    encoder, heads = load_m3(folder)
    for (name, a), (_, b) in zip(module.loss.heads.state_dict().items(), heads.state_dict().items()):
        assert torch.equal(a.cpu(), b), name
    assert heads.has_sparse and heads.has_multivec
    expected = module.encoder.encode(TEXTS)
    np.testing.assert_allclose(encoder.encode(TEXTS), expected, atol=1e-6)
    assert_close_scaled(_sentence_transformer(folder).encode(TEXTS, convert_to_numpy=True),
                        expected, RTOL32)
