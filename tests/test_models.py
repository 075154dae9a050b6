"""The encoder: pooling, normalisation, batching, and loading Hugging Face checkpoints saved locally."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from embedkit.models.build import hf_encoder, load_encoder, pretrained_tokenizer, tiny_zh_encoder
from embedkit.models.encoder import pool
from embedkit.models.vocab import build_char_vocab, save_tokenizer

from _numerics import RTOL32, assert_close_scaled

TEXTS = ["今天天气很好", "我们去公园散步吧", "人民日报一九九八年新年献词", "好", "embedding 模型 BGE"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return save_tokenizer(build_char_vocab(TEXTS), tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def encoder(tokenizer):
    torch.manual_seed(0)
    return tiny_zh_encoder(tokenizer, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64).eval()


def test_pooling_worked_case():
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert torch.equal(pool(hidden, mask, "cls"), torch.tensor([[1.0, 0.0]]))
    assert torch.equal(pool(hidden, mask, "mean"), torch.tensor([[2.0, 1.0]]))  # padding ignored
    with pytest.raises(ValueError, match="pooling"):
        pool(hidden, mask, "max")


def test_no_pooler_layer_and_unit_norm(encoder, tokenizer):
    assert not any("pooler" in name for name, _ in encoder.named_parameters())
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    emb = encoder(batch["input_ids"], batch["attention_mask"])
    assert torch.allclose(emb.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5)
    assert torch.allclose(emb, F.normalize(encoder.hidden_states(**batch)[:, 0], dim=-1), atol=1e-6)


def test_encode_keeps_input_order_whatever_the_batching(encoder, tokenizer):
    one_by_one = np.concatenate([encoder.encode([t], batch_size=1) for t in TEXTS])
    batched = encoder.encode(TEXTS, batch_size=2)
    # Other padding, other kernel shapes: float32 rounding of the unit vectors (tests/_numerics.py).
    assert_close_scaled(one_by_one, batched, RTOL32)
    assert not np.allclose(batched[0], batched[1])


def test_chinese_tokenizes_without_unknowns(tokenizer):
    ids = tokenizer("人民日报")["input_ids"]
    assert tokenizer.unk_token_id not in ids and len(ids) == 4 + 2


def test_hf_encoder_loads_a_checkpoint_saved_locally(tmp_path, tokenizer):
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=64)
    reference = BertModel(config)          # with a pooler, as hub BERT checkpoints have
    reference.save_pretrained(tmp_path / "ckpt")
    tokenizer.save_pretrained(tmp_path / "ckpt")

    tok = pretrained_tokenizer(str(tmp_path / "ckpt"))
    enc = hf_encoder(tok, str(tmp_path / "ckpt"), pooling="cls").eval()
    assert not any("pooler" in name for name, _ in enc.named_parameters())
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = F.normalize(reference.eval()(**batch).last_hidden_state[:, 0], dim=-1)
    assert_close_scaled(enc.encode(TEXTS), expected.numpy()[np.arange(len(TEXTS))], RTOL32)


def test_save_and_reload_round_trip(encoder, tmp_path):
    encoder.pooling = "mean"
    try:
        encoder.save_pretrained(tmp_path / "model")
        assert (tmp_path / "model" / "model.safetensors").exists()
        again = load_encoder(tmp_path / "model")
        assert again.pooling == "mean"
        assert np.allclose(again.encode(TEXTS), encoder.encode(TEXTS), atol=1e-6)
    finally:
        encoder.pooling = "cls"
