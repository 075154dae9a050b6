"""`python -m embedkit.scoring`: teacher scores (pos_scores / neg_scores) for a FlagEmbedding jsonl,
checked against CrossEncoder.predict / the HF model run by hand on the same pairs."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from embedkit.data.readers import read_retrieval_jsonl
from embedkit.scoring.__main__ import main

from helpers import PASSAGES, QUERIES, REPO, tiny_encoder
from _numerics import RTOL32, assert_close_scaled

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LONG = "一个戴着安全帽的男人在跳舞，他跳得很好，旁边还有很多人在看。" * 2   # past the 24-token cut
ROWS = [
    {"query": QUERIES[0], "pos": [PASSAGES[0]], "neg": [PASSAGES[1], LONG, PASSAGES[2]], "id": "a"},
    {"query": QUERIES[1], "pos": [PASSAGES[1], PASSAGES[8]]},                       # no neg key
    {"query": QUERIES[2], "pos": [LONG], "neg": [PASSAGES[0]], "prompt": "问："},   # own instruction
    {"query": QUERIES[4], "pos": [PASSAGES[4]], "neg": [PASSAGES[9], PASSAGES[5]], "prompt": ""},
]
INSTRUCTION = "为这个句子生成表示以用于检索相关文章："


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def texts():
    return [t for r in ROWS for t in (r["query"], *r["pos"], *r.get("neg", ()), INSTRUCTION, "问：")]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from embedkit.models.vocab import build_char_vocab, save_tokenizer

    return save_tokenizer(build_char_vocab(texts()), tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def reranker(tok, tmp_path_factory):
    """A tiny cross-encoder: BertForSequenceClassification with one label, saved with its tokenizer."""
    from transformers import BertConfig, BertForSequenceClassification

    model = spread_weights(BertForSequenceClassification(BertConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128, num_labels=1, pad_token_id=tok.pad_token_id)), 0)
    out = tmp_path_factory.mktemp("reranker")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture
def train_file(tmp_path):
    return write_rows(tmp_path / "train.jsonl", ROWS)


def pairs(instruction=""):
    return [(instruction + r["query"], p) for r in ROWS for p in (*r["pos"], *r.get("neg", ()))]


def assert_same_scores(ours, expected):
    """Equal up to float32 rounding (the teachers run in float32; the file holds float64)."""
    assert_close_scaled(np.asarray(ours, np.float64), np.asarray(expected, np.float64), RTOL32)


def spread_weights(model, seed):
    """Re-draw the weights wide (std 0.5, LayerNorms kept): a fresh BERT's 0.02 makes every
    text's [CLS] state nearly the same, and every score nearly equal."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


def scores_of(path):
    rows = read_retrieval_jsonl(path)   # embedkit's reader takes the written file back
    assert [len(r["pos_scores"]) for r in rows] == [len(r["pos"]) for r in rows]
    assert [len(r["neg_scores"]) for r in rows] == [len(r["neg"]) for r in rows]
    return rows, np.array([s for r in rows for s in (*r["pos_scores"], *r["neg_scores"])])


def test_cross_encoder_scores_are_crossencoder_predict_logits(reranker, train_file, tmp_path):
    from sentence_transformers import CrossEncoder
    from transformers import AutoTokenizer, BertForSequenceClassification

    out = tmp_path / "scored.jsonl"
    main([str(train_file), str(out), "--teacher", "cross-encoder", "--model", str(reranker),
          "--max-length", "24", "--batch-size", "3", "--device", "cpu", "--no-progress"])
    rows, ours = scores_of(out)
    # every other field passes through
    assert [{k: v for k, v in r.items() if not k.endswith("_scores")} for r in rows] == \
        [{"neg": [], **r} for r in ROWS]
    # CrossEncoder.predict on the same pairs, raw logits (FlagEmbedding's normalize=False)
    ce = CrossEncoder(str(reranker), device="cpu", max_length=24, activation_fn=torch.nn.Identity())
    assert_same_scores(ours, ce.predict(pairs(), batch_size=16))
    # ... which are the model's logits on "[CLS] q [SEP] p [SEP]" cut at 24 tokens
    hf_tok = AutoTokenizer.from_pretrained(reranker)
    model = BertForSequenceClassification.from_pretrained(reranker).eval()
    q, p = zip(*pairs())
    with torch.no_grad():
        logits = model(**hf_tok(list(q), list(p), padding=True, truncation=True, max_length=24,
                                return_tensors="pt")).logits[:, 0]
    assert_same_scores(ours, logits.numpy())
    assert np.ptp(ours) > 1e-3   # the pairs do score differently


def test_the_command_runs_as_a_module():
    run = subprocess.run([sys.executable, "-m", "embedkit.scoring", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "--teacher {cross-encoder,embedding}" in run.stdout and "Examples:" in run.stdout


def test_cross_encoder_instruction_and_sigmoid(reranker, train_file, tmp_path):
    from sentence_transformers import CrossEncoder

    out = tmp_path / "scored.jsonl"
    main([str(train_file), str(out), "--teacher", "cross-encoder", "--model", str(reranker),
          "--query-instruction", INSTRUCTION, "--activation", "sigmoid", "--device", "cpu",
          "--no-progress"])
    _, ours = scores_of(out)
    ce = CrossEncoder(str(reranker), device="cpu", max_length=512, activation_fn=torch.nn.Identity())
    # the instruction goes before every query; a row's own `prompt` is an embedding instruction
    # and a reranker does not read it (FlagEmbedding's add_reranker_score.py)
    logits = ce.predict(pairs(INSTRUCTION), batch_size=16)
    assert_same_scores(ours, 1 / (1 + np.exp(-logits)))


@pytest.fixture(scope="module")
def embedder(tok, tmp_path_factory):
    """An embedkit encoder folder (TextEncoder.save_pretrained: CLS pooling, normalised)."""
    enc = tiny_encoder(tok, seed=5, dropout=0.0, max_length=64)
    spread_weights(enc.backbone, 5)
    return enc.save_pretrained(tmp_path_factory.mktemp("embedder"))


def test_embedding_teacher_scores_are_cosines_of_its_cls_embeddings(embedder, train_file, tmp_path):
    from transformers import AutoTokenizer, BertModel

    out = tmp_path / "scored.jsonl"
    main([str(train_file), str(out), "--teacher", "embedding", "--model", str(embedder),
          "--query-instruction", INSTRUCTION, "--max-length", "24", "--batch-size", "2",
          "--device", "cpu", "--no-progress"])
    _, ours = scores_of(out)

    hf_tok = AutoTokenizer.from_pretrained(embedder)
    model = BertModel.from_pretrained(embedder, add_pooling_layer=False).eval()

    def embed(text):
        with torch.no_grad():
            hidden = model(**hf_tok(text, truncation=True, max_length=24, return_tensors="pt")).last_hidden_state
        return F.normalize(hidden[0, 0].double(), dim=-1)

    expected = []
    for r in ROWS:
        # the row's own prompt (also "") replaces the instruction, as in training
        q = embed((r["prompt"] if "prompt" in r else INSTRUCTION) + r["query"])
        expected += [float(q @ embed(p)) for p in (*r["pos"], *r.get("neg", ()))]
    assert_same_scores(ours, np.array(expected))
    assert np.all(np.abs(ours) <= 1 + 1e-6) and np.ptp(ours) > 1e-3


def test_embedding_teacher_reads_a_sentence_transformers_folder(embedder, train_file, tmp_path):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    st_dir = tmp_path / "st_mean"
    t = Transformer(str(embedder), max_seq_length=20)
    SentenceTransformer(modules=[t, Pooling(t.get_embedding_dimension(), "mean")], device="cpu").save(str(st_dir))
    out = tmp_path / "scored.jsonl"
    main([str(train_file), str(out), "--teacher", "embedding", "--model", str(st_dir), "--device", "cpu",
          "--no-progress"])
    _, ours = scores_of(out)
    st = SentenceTransformer(str(st_dir), device="cpu")
    expected = []
    for r in ROWS:
        q = st.encode([r.get("prompt", "") + r["query"]], convert_to_tensor=True)
        p = st.encode([*r["pos"], *r.get("neg", ())], convert_to_tensor=True)
        expected += st.similarity(q, p)[0].tolist()   # its cosine, with its own mean pooling and cut
    assert_same_scores(ours, np.array(expected))


def test_a_bad_line_stops_with_file_and_line_and_writes_nothing(reranker, tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = [json.dumps(ROWS[0], ensure_ascii=False), "",
             json.dumps({"query": "q", "pos": ["p"], "neg": [1]})]
    bad.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "scored.jsonl"
    with pytest.raises(SystemExit, match=rf"{bad}:3: neg\[0\] must be a string"):
        main([str(bad), str(out), "--teacher", "cross-encoder", "--model", str(reranker),
              "--device", "cpu", "--no-progress"])
    assert list(tmp_path.iterdir()) == [bad]   # neither the output nor a temporary file


def test_wrong_options_are_refused(reranker, embedder, train_file, tmp_path):
    out = str(tmp_path / "o.jsonl")
    with pytest.raises(ValueError, match="--pooling applies to an embedding teacher"):
        main([str(train_file), out, "--teacher", "cross-encoder", "--model", str(reranker), "--pooling", "cls"])
    with pytest.raises(ValueError, match="--activation applies to a cross-encoder"):
        main([str(train_file), out, "--teacher", "embedding", "--model", str(embedder),
              "--activation", "sigmoid"])
    with pytest.raises(SystemExit):
        main([str(train_file), out, "--teacher", "embedding", "--model", str(embedder), "--batch-size", "0"])
