"""RetroMAE: encoder/decoder masking, the enhanced decoder's visibility rule, the loss, training, saving."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from embedkit.data.corpus import people_daily_texts, product_reviews
from embedkit.data.mlm import MLMCollator, MLMDataModule, word_ids
from embedkit.models.build import load_encoder, tiny_zh_encoder
from embedkit.models.vocab import SPECIAL_TOKENS, build_char_vocab, save_tokenizer
from embedkit.objectives.retromae import DECODER_DIR, RetroMAE

from _numerics import RTOL64, assert_close_scaled

WORDPIECE_VOCAB = SPECIAL_TOKENS + ["the", "cat", "play", "##ing", "un", "##believ", "##able", "dog",
                                    "run", "##s", "##ning", "a", "big", "##ger", "read", "##er"]
WORDPIECE_TEXTS = ["the cat unbelievable playing runs running dog a big bigger reader",
                   "unbelievable unbelievable playing reader runs the dog",
                   "a big dog playing running the cat bigger reads"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pd_rows():
    return people_daily_texts(max_texts=400, seed=0)


@pytest.fixture(scope="module")
def zh_tok(pd_rows, tmp_path_factory):
    return save_tokenizer(build_char_vocab([r["text"] for r in pd_rows]), tmp_path_factory.mktemp("zh"))


@pytest.fixture(scope="module")
def wp_tok(tmp_path_factory):
    return save_tokenizer(WORDPIECE_VOCAB, tmp_path_factory.mktemp("wp"))


def _module(rows, tok, **kw):
    args = dict(batch_size=16, max_len=128, seed=3)
    args.update(kw)
    dm = MLMDataModule([lambda: rows], **args)
    dm.attach_tokenizer(tok)
    dm.setup()
    return dm


def _collate_all(dm, epoch=0, chunk=64):
    """Every example of the module, in index order, in batches of `chunk`."""
    n = len(dm.dataset)
    return [dm.collator([dm.dataset[(i, epoch)] for i in range(s, min(n, s + chunk))])
            for s in range(0, n, chunk)]


def _specials(tok, ids):
    return torch.isin(ids, torch.tensor(tok.all_special_ids))


# ---------------------------------------------------------------- (a) encoder mask

def test_encoder_mask_ratio_80_10_10_and_specials(pd_rows, zh_tok):
    dm = _module(pd_rows, zh_tok)
    masked = maskable = n_mask = n_keep = n_rand = 0
    for b in _collate_all(dm):
        orig, inp, lab, att = b["decoder_input_ids"], b["input_ids"], b["labels"], b["attention_mask"].bool()
        special = _specials(zh_tok, orig)
        can = att & ~special
        can[:, 0] = False
        sel = lab != -100
        assert not (sel & ~can).any(), "a special token, position 0 or padding was selected"
        assert torch.equal(inp[~sel], orig[~sel]), "an unselected position was changed"
        assert torch.equal(lab[sel], orig[sel])
        assert not _specials(zh_tok, inp[sel & (inp != zh_tok.mask_token_id)]).any()
        masked += int(sel.sum())
        maskable += int(can.sum())
        n_mask += int((inp[sel] == zh_tok.mask_token_id).sum())
        n_keep += int((inp[sel] == orig[sel]).sum())
        n_rand += int(((inp[sel] != orig[sel]) & (inp[sel] != zh_tok.mask_token_id)).sum())
    ratio = masked / maskable
    print(f"encoder: {masked}/{maskable} maskable tokens selected = {ratio:.4f}; "
          f"[MASK] {n_mask / masked:.3f}, random {n_rand / masked:.3f}, kept {n_keep / masked:.3f}")
    assert maskable > 20_000
    assert ratio == pytest.approx(0.3, abs=0.01)
    assert n_mask / masked == pytest.approx(0.8, abs=0.02)
    assert n_rand / masked == pytest.approx(0.1, abs=0.015)
    assert n_keep / masked == pytest.approx(0.1, abs=0.015)


def test_whole_word_groups_are_masked_together(wp_tok):
    rows = [{"text": t} for t in WORDPIECE_TEXTS] * 60
    dm = _module(rows, wp_tok, batch_size=8)
    cont = torch.tensor([wp_tok.convert_ids_to_tokens(i).startswith("##") for i in range(len(wp_tok))])
    groups = masked_pieces = 0
    dec_pairs = dec_split = 0
    for b in _collate_all(dm):
        orig, sel = b["decoder_input_ids"], b["labels"] != -100
        is_cont = cont[orig]
        # a ## piece and the token before it are always in the same state
        assert torch.equal(sel[:, 1:][is_cont[:, 1:]], sel[:, :-1][is_cont[:, 1:]])
        groups += int(is_cont.sum())
        masked_pieces += int((sel[:, 1:] & is_cont[:, 1:]).sum())
        # decoder: a row sees both pieces of a word or neither (unless one of them is the row itself)
        att = b["decoder_attention"]
        for k in range(orig.shape[0]):
            for j in torch.nonzero(is_cont[k]).flatten().tolist():
                rows_ok = [i for i in range(att.shape[1])
                           if i not in (j, j - 1) and b["attention_mask"][k, i]]
                a, c = att[k, rows_ok, j - 1], att[k, rows_ok, j]
                dec_pairs += len(rows_ok)
                dec_split += int((a != c).sum())
    assert groups > 0 and masked_pieces > 0  # ## words do get masked
    assert dec_split == 0 and dec_pairs > 1000


def test_word_ids_follow_wordpiece_continuations(wp_tok):
    ids = np.array(wp_tok("the unbelievable play playing")["input_ids"])
    special = np.zeros(len(wp_tok), bool)
    special[wp_tok.all_special_ids] = True
    cont = np.array([t.startswith("##") for t in wp_tok.convert_ids_to_tokens(list(range(len(wp_tok))))])
    # [CLS] the un ##believ ##able play play ##ing [SEP]
    assert word_ids(ids, special, cont).tolist() == [-1, 0, 1, 1, 1, 2, 3, 3, -1]


def test_specials_are_found_by_id_not_by_spelling():
    from transformers import BertTokenizer

    vocab = ["<pad>", "<unk>", "<s>", "</s>", "<mask>", "甲", "乙", "丙", "丁", "戊"]
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, cls_token="<s>", sep_token="</s>",
                        pad_token="<pad>", unk_token="<unk>", mask_token="<mask>")
    collator = MLMCollator.from_tokenizer(tok, encoder_mask_ratio=0.9, decoder_mask_ratio=0.5)
    row = np.array(tok("甲乙丙丁戊甲乙丙")["input_ids"])
    assert tok.convert_ids_to_tokens([int(row[0]), int(row[-1])]) == ["<s>", "</s>"]
    for seed in range(50):
        b = collator([(row, seed, 0)])
        assert b["labels"][0, 0] == -100 and b["labels"][0, -1] == -100
        assert b["input_ids"][0, 0] == row[0] and b["input_ids"][0, -1] == row[-1]
        assert b["decoder_labels"][0, 0] == -100 and b["decoder_labels"][0, -1] == -100
        # 10% random replacements never draw a special id
        assert not torch.isin(b["input_ids"][0, 1:-1], torch.tensor([0, 1, 2, 3])).any()


def test_masks_are_a_function_of_seed_epoch_and_index(pd_rows, zh_tok):
    dm = _module(pd_rows[:40], zh_tok)
    items = [dm.dataset[(i, 0)] for i in (5, 2, 9)]
    a, b = dm.collator(items), dm.collator(items)
    assert all(torch.equal(a[k], b[k]) for k in a)
    alone = dm.collator([dm.dataset[(2, 0)]])
    n = int(alone["attention_mask"].sum())
    assert torch.equal(alone["labels"][0, :n], a["labels"][1, :n])  # batch-mates do not matter
    c = dm.collator([dm.dataset[(i, 1)] for i in (5, 2, 9)])
    assert not torch.equal(a["labels"], c["labels"]) and not torch.equal(a["decoder_attention"], c["decoder_attention"])


def test_lightning_advances_the_sampler_epoch(pd_rows, zh_tok):
    from lightning_fabric.utilities.data import _set_sampler_epoch

    dm = _module(pd_rows[:64], zh_tok)
    loader = dm.train_dataloader()
    _set_sampler_epoch(loader, 3)  # what Lightning's fit loop calls at every epoch start
    assert {e for batch in loader.batch_sampler for _, e in batch} == {3}


# ---------------------------------------------------------------- (b, c) decoder attention, labels

def test_decoder_attention_rule_and_labels(pd_rows, zh_tok):
    dm = _module(pd_rows, zh_tok)
    seen = possible = 0
    for b in _collate_all(dm):
        orig, att, am = b["decoder_input_ids"], b["decoder_attention"], b["attention_mask"].bool()
        special = _specials(zh_tok, orig)
        lengths = am.sum(1)
        for k in range(orig.shape[0]):
            n, A = int(lengths[k]), att[k]
            assert not A.diagonal()[:n].any(), "a position attends to itself"
            assert A[1:, 0].all(), "slot 0 (h_cls) hidden from some row"
            assert not A[:, n:].any(), "padding visible"
            other = ~special[k, :n].clone()
            other[0] = False
            block = A[1:n, :n][:, other]  # rows 1..n-1 over the maskable columns
            not_self = torch.ones_like(block)
            cols = torch.nonzero(other).flatten()
            not_self[cols - 1, torch.arange(len(cols))] = False
            seen += int(block[not_self].sum())
            possible += int(not_self.sum())
            if n > 30:
                assert len({tuple(r.tolist()) for r in A[1:n, :n]}) > 0.9 * (n - 1), "rows repeat"
        # (c) decoder labels: every real token, never specials, position 0 or padding
        dl = b["decoder_labels"]
        want = am & ~special
        want[:, 0] = False
        assert torch.equal(dl != -100, want)
        assert torch.equal(dl[want], orig[want])
    frac = seen / possible
    print(f"decoder: visible fraction of the other maskable positions {frac:.4f} over {possible} pairs")
    assert frac == pytest.approx(0.5, abs=0.01)


# ---------------------------------------------------------------- model

@pytest.fixture(scope="module")
def model(zh_tok):
    torch.manual_seed(0)
    enc = tiny_zh_encoder(zh_tok, hidden_size=64, num_layers=1, num_heads=4, intermediate_size=128,
                          max_length=64)
    return RetroMAE(enc).eval()


@pytest.fixture(scope="module")
def model64(model):
    """The same model in float64, for the tests that compare equal computations (tests/_numerics.py)."""
    return copy.deepcopy(model).double()


@pytest.fixture(scope="module")
def batch(pd_rows, zh_tok):
    dm = _module(pd_rows[:16], zh_tok, max_len=48)
    return dm.collator([dm.dataset[(i, 0)] for i in range(8)])


def _ce_by_hand(logits, labels):
    logp = logits.log_softmax(-1)
    keep = labels != -100
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(picked * keep).sum() / keep.sum()


def test_loss_is_encoder_mlm_plus_decoder_reconstruction(model64, batch):
    model = model64
    with torch.no_grad():
        parts = model.loss.loss_parts(model.embed(batch), batch)
        out = model(batch)
        total = model.loss_from_embeddings(model.embed(batch), batch)
    enc = _ce_by_hand(out["encoder_logits"], batch["labels"])
    dec = _ce_by_hand(out["decoder_logits"], batch["decoder_labels"])
    assert total.dtype == torch.float64
    assert parts["encoder_mlm_loss"].item() == pytest.approx(enc.item(), rel=RTOL64)
    assert parts["decoder_loss"].item() == pytest.approx(dec.item(), rel=RTOL64)
    assert total.item() == pytest.approx(enc.item() + dec.item(), rel=RTOL64)
    # a fresh model is near the uniform-distribution loss
    assert dec.item() == pytest.approx(math.log(model.loss.mlm_head.bias.numel()), rel=0.15)


def test_mlm_head_is_tied_to_the_word_embeddings(model, model64):
    emb = model.encoder.backbone.embeddings.word_embeddings.weight
    names = [n for n, _ in model.named_parameters()]
    assert sum(p is emb for p in model.parameters()) == 1 and len(names) == len(set(names))
    # The logits against a recomputation, in float64 (the deep copy keeps the tie).
    model = model64
    emb = model.encoder.backbone.embeddings.word_embeddings.weight
    assert sum(p is emb for p in model.parameters()) == 1
    h = torch.randn(3, emb.shape[1], dtype=torch.float64)
    t = model.loss.mlm_head
    want = t.LayerNorm(F.gelu(t.dense(h))) @ emb.T + t.bias
    with torch.no_grad():
        assert_close_scaled(model.mlm_logits(h), want, RTOL64)


def test_decoder_layer_matches_a_naive_recomputation(model64, batch):
    """Per row and head: softmax over the visible keys only, Q from the query stream, K/V from h + tokens.
    In float64: the same function by two summation orders."""
    model = model64
    k = 0
    n = int(batch["attention_mask"][k].sum())
    ids, A = batch["decoder_input_ids"][k:k + 1, :n], batch["decoder_attention"][k:k + 1, :n, :n]
    with torch.no_grad():
        h = model.embed(batch)["cls"][k:k + 1]
        got = model.decoder_hidden(h, ids, A)[0]
        emb = model.encoder.backbone.embeddings
        content = emb.LayerNorm(emb.word_embeddings(ids[0]) + emb.position_embeddings(torch.arange(n))
                                + emb.token_type_embeddings(torch.zeros(n, dtype=torch.long)))
        kv = torch.cat([h, content[1:]])
        qs = h + emb.position_embeddings(torch.arange(n))
        d = model.loss.decoder
        heads, hd = d.num_heads, d.head_dim
        out = torch.empty(n, qs.shape[1], dtype=qs.dtype)
        for i in range(n):
            vis = torch.nonzero(A[0, i]).flatten()
            ctx = []
            for hh in range(heads):
                sl = slice(hh * hd, (hh + 1) * hd)
                q = d.query(qs[i])[sl]
                keys, vals = d.key(kv[vis])[:, sl], d.value(kv[vis])[:, sl]
                w = torch.softmax(keys @ q / math.sqrt(hd), 0)
                ctx.append(w @ vals)
            a = d.attention_LayerNorm(d.attention_output(torch.cat(ctx)) + qs[i])
            out[i] = d.output_LayerNorm(d.output(F.gelu(d.intermediate(a))) + a)
    assert got.dtype == torch.float64
    assert_close_scaled(got, out, RTOL64)


def test_decoder_never_lets_position_i_see_token_i(model, batch):
    ids, A = batch["decoder_input_ids"], batch["decoder_attention"]
    k = 0
    n = int(batch["attention_mask"][k].sum())
    with torch.no_grad():
        h = model.embed(batch)["cls"]
        base = model.mlm_logits(model.decoder_hidden(h, ids, A))
        for i in range(1, n - 1, 3):
            changed = ids.clone()
            changed[k, i] = ids[k, i] + 1 if ids[k, i] + 1 < len(model.loss.mlm_head.bias) else 5
            new = model.mlm_logits(model.decoder_hidden(h, changed, A))
            # A hidden key gets weight exp(finfo.min) = 0 exactly, so the hidden rows' logits do
            # not move at all (< 1e-5 is a margin over 0); a visible token moves them by ≫ 1e-6.
            diff = (new[k, :n] - base[k, :n]).abs().amax(-1)
            assert diff[i] < 1e-5, f"row {i} depends on its own token"
            sees = A[k, :n, i]
            assert (diff[~sees] < 1e-5).all(), "a row depends on a token hidden from it"
            assert (diff[sees] > 1e-6).all(), "a row ignores a token it may see"
            assert torch.equal(new[1:], base[1:])  # other examples untouched


def _embeddings_query_stream_by_hand(emb, h, positions):
    """FlagEmbedding's query stream written out: LayerNorm(h + P[i] + T[0]) (eval: no dropout)."""
    ln = emb.LayerNorm
    x = h[:, None] + emb.position_embeddings.weight[positions][None] + emb.token_type_embeddings.weight[0]
    return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


def test_query_stream_variants(model64, batch):
    model = copy.deepcopy(model64)
    emb = model.encoder.backbone.embeddings
    with torch.no_grad():
        h = model.embed(batch)["cls"]
        q = model.query_stream_input(h, 10)
        assert_close_scaled(q, h[:, None] + emb.position_embeddings.weight[:10][None], RTOL64)
        model.loss.query_stream = "embeddings"
        q2 = model.query_stream_input(h, 10)
        assert_close_scaled(q2, _embeddings_query_stream_by_hand(emb, h, torch.arange(10)), RTOL64)
        # and what the decoder is fed is that stream
        query = model.embed(batch)["decoder_query"]
        n = batch["decoder_input_ids"].shape[1]
        assert_close_scaled(query, _embeddings_query_stream_by_hand(emb, h, torch.arange(n)), RTOL64)


def test_mlm_head_init_copies_a_checkpoint_head(zh_tok, tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(vocab_size=len(zh_tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64)
    lm = BertForMaskedLM(cfg)
    with torch.no_grad():
        lm.cls.predictions.bias.normal_()
        lm.cls.predictions.decoder.bias.copy_(lm.cls.predictions.bias)
    lm.save_pretrained(tmp_path)
    enc = tiny_zh_encoder(zh_tok, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    m = RetroMAE(enc, mlm_head_init=str(tmp_path))
    src = BertForMaskedLM.from_pretrained(tmp_path).cls.predictions
    assert torch.allclose(m.loss.mlm_head.dense.weight, src.transform.dense.weight)
    assert torch.allclose(m.loss.mlm_head.bias, src.decoder.bias)


# ---------------------------------------------------------------- paper scale: model=hf, the checkpoint's head

def _masked_lm(kind, tok, tie=True):
    """A tiny BERT or RoBERTa masked LM whose head is not at its init (so a copy is visible)."""
    from transformers import BertConfig, BertForMaskedLM, RobertaConfig, RobertaForMaskedLM

    config_class, model_class = {"bert": (BertConfig, BertForMaskedLM),
                                 "roberta": (RobertaConfig, RobertaForMaskedLM)}[kind]
    torch.manual_seed(1)
    lm = model_class(config_class(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=64, pad_token_id=tok.pad_token_id,
                                  max_position_embeddings=80, tie_word_embeddings=tie))
    with torch.no_grad():
        for p in lm.get_output_embeddings().parameters():
            p.normal_()
        for n, p in lm.named_parameters():
            if n.startswith(("cls.", "lm_head.")):
                p.add_(torch.randn_like(p) * 0.3)
    return lm


@pytest.fixture(scope="module")
def bert_mlm_checkpoint(zh_tok, tmp_path_factory):
    """A BertForMaskedLM saved with its tokenizer: what model=hf loads at paper scale."""
    out = tmp_path_factory.mktemp("bert_mlm")
    _masked_lm("bert", zh_tok).save_pretrained(out)
    zh_tok.save_pretrained(out)
    return out


def test_paper_keys_keep_the_checkpoints_head_and_flagembeddings_query_stream(bert_mlm_checkpoint, batch):
    """model=hf with objective.mlm_head_init=from_model and objective.query_stream=embeddings, built
    the way the recipe builds a stage: the head is the checkpoint's (its tensors, and its logits and
    MLM loss are BertForMaskedLM's own), and the decoder's queries are FlagEmbedding's."""
    from hydra.utils import instantiate
    from safetensors.torch import load_file
    from transformers import BertForMaskedLM

    from embedkit.recipes.train_eval import build_stage
    from helpers import compose

    ckpt = bert_mlm_checkpoint
    cfg = compose(["model=hf", f"model.name_or_path={ckpt}", "data=pd_corpus", "objective=retromae",
                   "objective.mlm_head_init=from_model", "objective.query_stream=embeddings"])
    module = build_stage(cfg, instantiate(cfg.model.tokenizer)).eval()
    saved = load_file(str(ckpt / "model.safetensors"))
    head = module.loss.mlm_head
    assert torch.equal(head.dense.weight, saved["cls.predictions.transform.dense.weight"])
    assert torch.equal(head.dense.bias, saved["cls.predictions.transform.dense.bias"])
    assert torch.equal(head.LayerNorm.weight, saved["cls.predictions.transform.LayerNorm.weight"])
    assert torch.equal(head.LayerNorm.bias, saved["cls.predictions.transform.LayerNorm.bias"])
    assert torch.equal(head.bias, saved["cls.predictions.bias"])
    assert head.bias.abs().max() > 0.1   # not the fresh zeros

    module = module.double()
    lm = BertForMaskedLM.from_pretrained(ckpt).double().eval()
    with torch.no_grad():
        emb = module.embed(batch)
        ref = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        assert_close_scaled(module.mlm_logits(emb["hidden"]), ref.logits, RTOL64)
        enc_loss = module.loss.loss_parts(emb, batch)["encoder_mlm_loss"]
        assert enc_loss.item() == pytest.approx(ref.loss.item(), rel=RTOL64)
        # the query stream by hand from the checkpoint's own tensors, and as FlagEmbedding calls it
        h = emb["cls"]
        n = batch["decoder_input_ids"].shape[1]
        ln_w, ln_b = saved["bert.embeddings.LayerNorm.weight"], saved["bert.embeddings.LayerNorm.bias"]
        x = (h[:, None] + saved["bert.embeddings.position_embeddings.weight"][:n].double()[None]
             + saved["bert.embeddings.token_type_embeddings.weight"][0].double())
        by_hand = F.layer_norm(x, (x.shape[-1],), ln_w.double(), ln_b.double(), lm.config.layer_norm_eps)
        assert_close_scaled(emb["decoder_query"], by_hand, RTOL64)
        flag = lm.bert.embeddings(inputs_embeds=h[:, None].expand(-1, n, -1))
        assert_close_scaled(emb["decoder_query"], flag, RTOL64)


def test_from_model_keeps_a_roberta_head_and_its_position_numbering(zh_tok, tmp_path):
    """XLM-R / RoBERTa (BGE-M3's RetroMAE): `lm_head.*`, and positions from padding_idx + 1."""
    from safetensors.torch import load_file
    from transformers import RobertaForMaskedLM

    from embedkit.models.build import hf_encoder

    lm = _masked_lm("roberta", zh_tok)
    lm.save_pretrained(tmp_path)
    m = RetroMAE(hf_encoder(zh_tok, str(tmp_path)), mlm_head_init="from_model",
                 query_stream="embeddings").double().eval()
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert torch.equal(m.loss.mlm_head.dense.weight, saved["lm_head.dense.weight"].double())
    assert torch.equal(m.loss.mlm_head.LayerNorm.weight, saved["lm_head.layer_norm.weight"].double())
    assert torch.equal(m.loss.mlm_head.bias, saved["lm_head.bias"].double())
    lm = RobertaForMaskedLM.from_pretrained(tmp_path).double().eval()
    ids = zh_tok(["北京是中国的首都", "今天"], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = m.encoder.hidden_states(ids["input_ids"], ids["attention_mask"])
        assert_close_scaled(m.mlm_logits(hidden), lm(**ids).logits, RTOL64)
        h = hidden[:, 0]
        pad = lm.config.pad_token_id
        emb = m.encoder.backbone.embeddings
        got = m.query_stream_input(h, 7)
        assert_close_scaled(got, _embeddings_query_stream_by_hand(emb, h, torch.arange(pad + 1, pad + 8)), RTOL64)
        assert_close_scaled(got, lm.roberta.embeddings(inputs_embeds=h[:, None].expand(-1, 7, -1)), RTOL64)


def test_from_model_needs_a_checkpoint(zh_tok):
    enc = tiny_zh_encoder(zh_tok, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    with pytest.raises(ValueError, match="mlm_head_init=from_model.*built from a config"):
        RetroMAE(enc, mlm_head_init="from_model")


def test_mlm_head_init_refuses_a_checkpoint_without_a_trained_head(zh_tok, tmp_path):
    """A plain encoder checkpoint (BertModel, as BAAI/bge-*-zh ship) would get a random head."""
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=len(zh_tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(tmp_path / "plain")
    enc = tiny_zh_encoder(zh_tok, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    with pytest.raises(ValueError, match="no trained MLM head"):
        RetroMAE(enc, mlm_head_init=str(tmp_path / "plain"))
    _masked_lm("bert", zh_tok, tie=False).save_pretrained(tmp_path / "untied")
    with pytest.raises(ValueError, match="not tied"):
        RetroMAE(enc, mlm_head_init=str(tmp_path / "untied"))


def test_mlm_head_is_read_at_the_models_revision(monkeypatch, bert_mlm_checkpoint):
    import transformers

    from helpers import compose

    cfg = compose(["model=hf", "model.revision=0123abc", "objective=retromae", "objective.mlm_head_init=from_model"])
    assert cfg.objective.mlm_head_revision == "0123abc"
    assert compose(["objective=retromae"]).objective.mlm_head_revision is None   # tiny_zh: no revision
    seen, load = [], transformers.AutoModelForMaskedLM.from_pretrained

    def recording(name, **kw):
        seen.append((str(name), kw.get("revision")))
        return load(name, **{k: v for k, v in kw.items() if k != "revision"})

    monkeypatch.setattr(transformers.AutoModelForMaskedLM, "from_pretrained", recording)
    from embedkit.models.build import hf_encoder
    from transformers import AutoTokenizer

    enc = hf_encoder(AutoTokenizer.from_pretrained(bert_mlm_checkpoint), str(bert_mlm_checkpoint))
    RetroMAE(enc, mlm_head_init="from_model", mlm_head_revision="0123abc")
    assert seen == [(str(bert_mlm_checkpoint), "0123abc")]


# ---------------------------------------------------------------- (f, g) training and saving

def test_short_run_lowers_loss_and_encoder_round_trips(pd_rows, zh_tok, tmp_path):
    import pytorch_lightning as pl

    rows = pd_rows[:200]
    dm = _module(rows, zh_tok, batch_size=16, max_len=64)
    fixed = dm.collator([dm.dataset[(i, 99)] for i in range(32)])
    torch.manual_seed(0)
    enc = tiny_zh_encoder(zh_tok, hidden_size=64, num_layers=1, num_heads=2, intermediate_size=128,
                          max_length=64)
    module = RetroMAE(enc, lr=2e-3)

    def fixed_loss():
        module.eval()
        with torch.no_grad():
            return {k: v.item() for k, v in module.loss.loss_parts(module.embed(fixed), fixed).items()}

    before = fixed_loss()
    module.train()
    trainer = pl.Trainer(max_steps=30, max_epochs=-1, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, log_every_n_steps=1, num_sanity_val_steps=0,
                         use_distributed_sampler=False)
    trainer.fit(module, datamodule=dm)
    after = fixed_loss()
    print(f"fixed-batch loss before {before}, after 30 steps {after}")
    assert trainer.global_step == 30
    assert after["loss"] < before["loss"] - 1.0
    assert after["encoder_mlm_loss"] < before["encoder_mlm_loss"]
    assert after["decoder_loss"] < before["decoder_loss"]
    assert {"train/loss", "train/encoder_mlm_loss", "train/decoder_loss"} <= set(trainer.callback_metrics)
    assert trainer.train_dataloader.batch_sampler.epoch == 2  # 12 batches an epoch: epochs 0, 1, 2

    # (g) the encoder is the stage's output; it reloads the way the next stage / eval loads it
    out = tmp_path / "model"
    enc.save_pretrained(out)
    module.save_extras(out)
    texts = [r["text"] for r in rows[:10]]
    reloaded = load_encoder(out)
    assert np.allclose(enc.encode(texts), reloaded.encode(texts), atol=1e-5)
    # and the decoder + head, saved beside it, reload into a fresh module
    again = RetroMAE(reloaded).eval()
    again.loss.load_decoder(out / DECODER_DIR)
    module.eval()
    with torch.no_grad():
        assert torch.allclose(module(fixed)["decoder_logits"], again(fixed)["decoder_logits"], atol=1e-4)


# ---------------------------------------------------------------- sources and configs

def test_corpus_sources_are_text_rows():
    rows = people_daily_texts(max_texts=50, min_chars=30, seed=1)
    assert len(rows) == 50 and all(len(r["text"]) >= 30 for r in rows)
    assert rows == people_daily_texts(max_texts=50, min_chars=30, seed=1)
    reviews = product_reviews(max_texts=20)
    assert len(reviews) == 20 and all(set(r) == {"text"} and r["text"] for r in reviews)


def test_config_keeps_the_mask_ratios_with_the_data():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from embedkit.config import CONFIG_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["objective=retromae", "data=pd_corpus",
                                                      "data.decoder_mask_ratio=0.45"])
    GlobalHydra.instance().clear()
    assert cfg.objective._target_ == "embedkit.objectives.retromae.RetroMAE"
    assert OmegaConf.select(cfg, "data.encoder_mask_ratio") == 0.3
    assert OmegaConf.select(cfg, "data.decoder_mask_ratio") == 0.45
    assert "encoder_mask_ratio" not in cfg.objective   # only the collator applies them
    assert cfg.objective.lr == 1e-4 and cfg.objective.warmup_ratio == 0.1
    assert cfg.objective.optimizer.weight_decay == 0.01 and cfg.objective.optimizer.lr == 1e-4


def test_a_batch_with_nothing_masked_still_reaches_every_head_parameter():
    """Under DDP every parameter must get a gradient each step: a batch without a masked position
    (short or unknown texts) gives a zero loss that still runs through the MLM head."""
    import torch

    from embedkit.objectives.retromae import _masked_ce

    head = torch.nn.Linear(8, 11)
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    labels = torch.full((2, 5), -100)
    loss = _masked_ce(head, hidden, labels)
    loss.backward()
    assert float(loss) == 0.0
    assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in head.parameters())
    labels[0, 1] = 3
    assert float(_masked_ce(head, hidden, labels)) == pytest.approx(
        float(torch.nn.functional.cross_entropy(head(hidden[0, 1:2]), labels[0, 1:2])))
