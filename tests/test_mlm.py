"""Masked-LM pre-training (the mini base's objective): its loss against transformers' BertForMaskedLM
on the same weights and batch, the encoder-only batches, and the head the RetroMAE stage keeps."""

import pytest
import torch

from embedkit.data.corpus import bundle_texts, people_daily_texts
from embedkit.data.mlm import MLMDataModule
from embedkit.models.vocab import build_char_vocab, save_tokenizer
from embedkit.objectives.mlm import MaskedLM, save_masked_lm
from embedkit.objectives.retromae import MLM_HEAD_DIR, RetroMAE

from _numerics import RTOL64
from helpers import DATA, tiny_encoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def rows():
    return people_daily_texts(max_texts=200, seed=1)


@pytest.fixture(scope="module")
def tok(rows, tmp_path_factory):
    return save_tokenizer(build_char_vocab([r["text"] for r in rows]), tmp_path_factory.mktemp("tok"))


def _batch(rows, tok, decoder_views=False, ratio=0.15):
    dm = MLMDataModule([lambda: rows], batch_size=8, max_len=64, seed=5, encoder_mask_ratio=ratio,
                       decoder_views=decoder_views)
    dm.attach_tokenizer(tok)
    dm.setup()
    return dm.collator([dm.dataset[(i, 0)] for i in range(8)])


def _trained_head(model):
    # A head that is not at its init, so a copy that silently kept a fresh head would show.
    with torch.no_grad():
        for p in model.loss.mlm_head.parameters():
            p.add_(torch.randn_like(p) * 0.05)


def test_encoder_only_batches_equal_the_retromae_encoder_view(rows, tok):
    plain, full = _batch(rows, tok), _batch(rows, tok, decoder_views=True)
    assert set(plain) == {"input_ids", "attention_mask", "labels"}
    for key in plain:   # the same masks: one generator per (seed, epoch, index), drawn in the same order
        assert torch.equal(plain[key], full[key])
    masked = (plain["labels"] != -100).sum() / (plain["attention_mask"].sum() - 2 * 8)
    assert 0.08 < float(masked) < 0.22   # BERT's 0.15 of the maskable tokens


def test_loss_equals_bert_for_masked_lm_on_the_same_weights(rows, tok, tmp_path):
    from transformers import BertForMaskedLM

    batch = _batch(rows, tok)
    model = MaskedLM(tiny_encoder(tok, dropout=0.0), lr=1e-3).eval()
    _trained_head(model)
    save_masked_lm(model.encoder, model.loss.mlm_head, tmp_path / "lm")   # float32, as trained
    model.double()
    ours = model.loss_from_embeddings(model.embed(batch), batch)
    reference = BertForMaskedLM.from_pretrained(tmp_path / "lm").double().eval()
    theirs = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       labels=batch["labels"]).loss
    torch.testing.assert_close(ours, theirs, rtol=RTOL64, atol=0)
    # and by hand: mean CE over the masked positions of the full logits
    logits = model.mlm_logits(model.encoder.hidden_states(batch["input_ids"], batch["attention_mask"]))
    keep = batch["labels"] != -100
    by_hand = torch.nn.functional.cross_entropy(logits[keep], batch["labels"][keep])
    torch.testing.assert_close(ours, by_hand, rtol=RTOL64, atol=0)


def test_retromae_keeps_the_pre_trained_head(rows, tok, tmp_path):
    model = MaskedLM(tiny_encoder(tok), lr=1e-3)
    _trained_head(model)
    model.encoder.save_pretrained(tmp_path / "base")
    model.save_extras(tmp_path / "base")
    assert (tmp_path / "base" / MLM_HEAD_DIR / "config.json").is_file()
    retro = RetroMAE(tiny_encoder(tok), lr=1e-3, mlm_head_init=str(tmp_path / "base"))
    for name, p in model.loss.mlm_head.state_dict().items():
        assert torch.equal(retro.loss.mlm_head.state_dict()[name], p), name


def test_a_short_run_lowers_the_loss(rows, tok):
    model = MaskedLM(tiny_encoder(tok), lr=2e-3, warmup_ratio=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    batch = _batch(rows, tok)
    first = model.loss_from_embeddings(model.embed(batch), batch).item()
    for _ in range(30):
        loss = model.loss_from_embeddings(model.embed(batch), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < first - 1.0


def test_bundle_texts_are_deduplicated_text_rows():
    got = bundle_texts(str(DATA), "train/stsb_pairs.jsonl", format="sts")
    texts = [r["text"] for r in got]
    assert len(texts) == len(set(texts)) > 5000
    assert all(set(r) == {"text"} for r in got)
