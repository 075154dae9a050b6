"""Every exported model folder has a model card (README.md) as sentence-transformers writes one:
front matter (library_name, pipeline_tag, tags, language, base_model), then how the weights were
made and, once the run scored them, the eval table, equal to the run's table.json. The folder still
loads as a SentenceTransformer."""

import json
import re
import sys

import numpy as np
import pytest
from huggingface_hub import ModelCard
from omegaconf import OmegaConf

from embedkit import runs
from embedkit.config import REPO_ROOT
from embedkit.models.build import load_encoder
from embedkit.models.export import CARD_FILE, CardData, export_sentence_transformers, write_model_card
from embedkit.models.vocab import build_char_vocab, save_tokenizer
from embedkit.provenance import command_line, git_commit
from embedkit.recipes.model_card import stage_card
from embedkit.recipes.train_eval import run

from helpers import DATA, tiny_encoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")

needs_data = pytest.mark.skipif(not (DATA / "eval" / "STSB").is_dir(), reason=f"zh-mini data not found at {DATA}")
TEXTS = ["今天天气很好", "北京是中国的首都", "我们去公园散步吧"]
RECORD = {"steps": 7, "examples": 200, "epochs": 0.5}


def _scores(markdown: str) -> dict[str, list[str]]:
    """{row label: cells} of the card's eval table."""
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return header, {cells[0]: cells[1:] for cells in
                    ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}


@needs_data
def test_a_run_leaves_a_card_with_its_settings_and_its_table(compose_run, tmp_path):
    overrides = ["experiment_name=card", "debug=smoke", "logger=csv", "eval.tasks=[STSB]",
                 "eval.max_rows=32", "data.max_examples=96", "trainer.max_steps=2"]
    cfg = compose_run(overrides)
    run(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))
    run_dir = tmp_path / "run"
    folder = runs.model_dir(run_dir)
    card = ModelCard.load(folder / CARD_FILE)
    data = card.data.to_dict()
    assert data["library_name"] == "sentence-transformers" and data["language"] == "zh"
    assert data["pipeline_tag"] == "sentence-similarity"
    assert {"sentence-transformers", "loss:InfoNCE", "dataset_size:96"} <= set(data["tags"])
    assert "base_model" not in data   # tiny_zh is built from a config: no pre-trained base
    text = card.text
    assert "trained from random init" in text
    assert "- **Steps:** 2" in text and "- **Training rows:** 96" in text
    assert "- **Batch:** 32 per device x 1 device x 1 node = 32 global" in text
    assert "- **Learning rate:** 0.0003" in text
    assert "| temperature | 0.02 |" in text   # the objective's settings, as plan=true prints them
    assert "| negatives/query | 31 = 0 hard + 31 in-batch" in text
    # epochs: 2 batches of 32 over 96 rows (3 batches an epoch) are 2/3 of a pass
    assert json.loads(runs.done_file(run_dir).read_text())["epochs"] == round(2 / 3, 3)
    assert "- **Epochs:** 0.667" in text
    # the eval table: the run's table.json, to the 2 decimals table.md shows
    (row,) = json.loads(runs.table_file(run_dir).read_text())
    header, cells = _scores(text.split("## Evaluation", 1)[1].split("## Training Details", 1)[0])
    assert header[1:] == ["Retrieval", "STS", "PairCLF", "CLF", "Rerank", "Cluster", "Avg"]
    expected = ["–" if row[c] is None else f"{row[c]:.2f}" for c in header[1:]]
    assert cells[row["label"]] == expected and expected[1] != "–" and expected[-1] != "–"
    # provenance: the checkout's commit and the overrides that made it
    assert f"- **Git commit:** {git_commit(REPO_ROOT)}" in text
    (command,) = re.findall(r"- \*\*Command:\*\* `([^`]*)`", text)
    assert all(o in command for o in ["experiment_name=card", "logger=csv", "trainer.max_steps=2"])
    # and the folder still loads as sentence-transformers, with embedkit's embeddings
    from sentence_transformers import SentenceTransformer

    theirs = SentenceTransformer(str(folder), device="cpu").encode(TEXTS, convert_to_numpy=True)
    np.testing.assert_allclose(theirs, load_encoder(folder).encode(TEXTS), atol=1e-5)



@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny encoder exported without run details: the card says only what the folder shows."""
    tok = save_tokenizer(build_char_vocab(TEXTS), tmp_path_factory.mktemp("tok"))
    out = tmp_path_factory.mktemp("model") / "model"
    return export_sentence_transformers(tiny_encoder(tok, 0, max_length=32, pooling="cls", projection_dim=16), out)


def test_a_bare_export_has_a_card_from_its_own_files(folder):
    card = ModelCard.load(folder / CARD_FILE)
    assert card.data.library_name == "sentence-transformers" and card.data.language == "zh"
    # the architecture lines are read back from the module files just written
    assert "(1): Pooling (cls, 32 dims)  [1_Pooling/]" in card.text
    assert "(2): Dense (32 -> 16, no activation)  [2_Dense/]" in card.text
    assert "- **Output Dimensionality:** 16 dimensions" in card.text
    assert "- **Maximum Sequence Length:** 32 tokens" in card.text


@pytest.mark.parametrize("overrides,lines", [
    # Matryoshka: the widths it trains; M3: the heads and the official weights (FlagEmbedding)
    (["objective=matryoshka"], ["| loss | Matryoshka over InfoNCE, dims [16, 32, 64, 128] |"]),
    (["objective=m3", "data=zh_mini_task", "data.train_group_size=4"],
     ["| loss weights | dense 1, sparse 0.1, multivec 1 |", "| ensemble weights | dense 1, sparse 0.3, multivec 1 |",
      "| negatives/query | 127 = 3 hard + 124 in-batch (on this device; cross-device off) |"]),
    (["objective=infonce", "objective.negatives_cross_device=true", "trainer.devices=4"],
     ["| negatives/query | 127 = 0 hard + 31 in-batch + 96 cross-device |"]),
])
def test_the_card_carries_the_objectives_settings(compose_run, folder, overrides, lines):
    cfg = compose_run(overrides)
    write_model_card(folder, stage_card(cfg, "x/row", RECORD))
    text = (folder / CARD_FILE).read_text(encoding="utf-8")
    for line in lines:
        assert line in text
    assert "- **Steps:** 7" in text and "- **Epochs:** 0.5" in text and "## Evaluation" not in text


def test_a_pretrained_base_is_named_and_a_stage_chain_keeps_it(compose_run, folder, tmp_path):
    hf = compose_run(["model=hf", "model.name_or_path=BAAI/bge-base-zh-v1.5"])
    write_model_card(folder, stage_card(hf, "x/row/general", RECORD))
    card = ModelCard.load(folder / CARD_FILE)
    assert card.data.base_model == "BAAI/bge-base-zh-v1.5"
    assert "fine-tuned from the pre-trained BAAI/bge-base-zh-v1.5" in card.text
    # the next stage starts from that folder: its card names the same hub base
    task = compose_run(["model=hf", "model.name_or_path=BAAI/bge-base-zh-v1.5", f"model.init_from={folder}"])
    card2 = stage_card(task, "x/row/task", RECORD)
    assert card2.base_model == "BAAI/bge-base-zh-v1.5"
    assert card2.init == f"initialised from the encoder at {folder}, based on BAAI/bge-base-zh-v1.5"
    tiny = compose_run([f"model.init_from={tmp_path}"])   # a folder without a card: no base to name
    assert stage_card(tiny, "x", RECORD).base_model is None


def test_multitask_data_lists_each_tasks_sources_and_rows(compose_run, folder):
    cfg = compose_run(["objective=multitask", "data=multitask"])
    card = stage_card(cfg, "x", {**RECORD, "examples": {"retrieval": 120, "sts": 80}})
    assert card.rows == {"retrieval": 120, "sts": 80}
    assert any(s.startswith("retrieval: ") for s in card.sources) and any(s.startswith("sts: ") for s in card.sources)
    assert card.batch.startswith("retrieval 32 per device") and "; sts 64 per device" in card.batch
    write_model_card(folder, card)
    text = (folder / CARD_FILE).read_text(encoding="utf-8")
    assert "- **Training rows:** retrieval 120, sts 80" in text and "dataset_size:200" in text


def test_the_command_has_its_credentials_masked(monkeypatch, folder):
    monkeypatch.setattr(sys, "argv", ["run.py", "data.batch_size=32", "+logger.api_key=abcdefgh1234"])
    assert command_line() == "python run.py data.batch_size=32 '+logger.api_key=***'"
    write_model_card(folder, CardData(command="python run.py +wandb_token=zyx98765"))
    assert "zyx98765" not in (folder / CARD_FILE).read_text(encoding="utf-8")
