"""The mini base (embedkit/models/zh_mini_base, built by `make base`), which a mini run starts from
with `model.init_from=${paths.mini_base}`.

Checked here: the committed folder is a model sentence-transformers loads, with the masked-LM head the
RetroMAE stage keeps; a run from it takes its vocabulary; a staged run
from it (RetroMAE → general → task) trains; a missing base stops before training and says how to
rebuild it; and the base experiment is refused at scale=paper.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from embedkit.objectives.retromae import MLM_HEAD_DIR

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "embedkit" / "models" / "zh_mini_base"
# The base's shape, which runs from it must keep (conf/model/tiny_zh.yaml; debug=smoke shrinks it).
BASE_SHAPE = ["model.encoder.hidden_size=128", "model.encoder.num_layers=2", "model.encoder.num_heads=2",
              "model.encoder.intermediate_size=512"]


def _run(args, tmp_path, timeout=420):
    env = dict(os.environ, EMBEDKIT_CACHE_DIR=str(tmp_path / "cache"), WANDB_MODE="offline")
    return subprocess.run([sys.executable, "run.py", *args, f"paths.log_dir={tmp_path}/logs", "logger=csv"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_committed_base_is_a_sentence_transformers_model_with_its_mlm_head():
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModelForMaskedLM

    assert (BASE / "model.safetensors").is_file()
    model = SentenceTransformer(str(BASE), device="cpu")
    a, b, c = model.encode(["今天北京天气很好", "北京今天天气不错", "这款手机的电池很耐用"], normalize_embeddings=True)
    assert float(a @ b) > float(a @ c)   # a pre-trained LM already puts paraphrases nearer
    lm = AutoModelForMaskedLM.from_pretrained(str(BASE / MLM_HEAD_DIR))
    assert lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    info = json.loads((BASE / "config.json").read_text())
    assert (info["hidden_size"], info["num_hidden_layers"]) == (128, 2)


def test_paths_name_the_committed_base_and_the_default_is_fresh(compose_run):
    cfg = compose_run(["model.init_from=${paths.mini_base}"])
    assert Path(cfg.model.init_from).resolve() == BASE.resolve()
    assert compose_run([]).model.init_from is None   # the default: a fresh encoder (README "The mini base")
    # debug=smoke's 32-wide model cannot load the 128-wide base; the command line still may ask
    assert compose_run(["debug=smoke"]).model.init_from is None


@pytest.mark.slow
def test_a_staged_run_from_the_base_keeps_its_vocabulary_and_head(tmp_path):
    proc = _run(["+experiment=bge_ablation_recipe", "debug=smoke", f"model.init_from={BASE}", *BASE_SHAPE,
                 "eval.tasks=[STSB]", "trainer.max_steps=2"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    (run_dir,) = (tmp_path / "logs" / "bge_ablation_recipe" / "runs").iterdir()
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(str(run_dir / "tokenizer")).get_vocab()
    assert vocab == AutoTokenizer.from_pretrained(str(BASE)).get_vocab()
    log = (run_dir / "run.log").read_text()
    assert f"initialised the encoder from {BASE}" in log
    # the RetroMAE stage copied the base's masked-LM head instead of starting a fresh one
    assert f"MLM head copied from {BASE}/{MLM_HEAD_DIR}" in log


def test_a_missing_base_stops_before_training_and_says_how_to_rebuild(tmp_path):
    proc = _run(["+experiment=bge_ablation_batchsize", f"model.init_from={tmp_path}/zh_mini_base"], tmp_path, 120)
    assert proc.returncode != 0
    assert "holds no model.safetensors" in proc.stderr and "make base" in proc.stderr


def test_the_base_experiment_is_mini_only(tmp_path):
    proc = _run(["+experiment=mini_base", "scale=paper", "plan=true"], tmp_path, 120)
    assert proc.returncode != 0
    assert "offered at scale=mini only, not scale=paper" in proc.stderr


def test_a_model_of_another_width_names_the_base_and_the_first_mismatches():
    from embedkit.models.build import init_encoder_from, pretrained_tokenizer, tiny_zh_encoder

    narrow = tiny_zh_encoder(pretrained_tokenizer(str(BASE)), hidden_size=32, num_layers=2, num_heads=2,
                             intermediate_size=64)
    with pytest.raises(ValueError) as err:
        init_encoder_from(narrow, BASE)
    message = str(err.value)
    assert str(BASE / "model.safetensors") in message and message.count("size mismatch") == 3
    assert "more)" in message and len(message) < 1500


def test_the_from_base_control_starts_from_the_base_and_smoke_stays_fresh(compose_run):
    cfg = compose_run(["+experiment=bge_ablation_recipe_from_base"])
    assert Path(cfg.model.init_from).resolve() == BASE.resolve()
    assert compose_run(["+experiment=bge_ablation_recipe_from_base", "debug=smoke"]).model.init_from is None
