"""embedkit against FlagEmbedding 1.4.2's own training code, on the same weights and batches.

Both sides load one tiny BERT saved by the test (transformers `BertModel`, 32 wide, 1 layer,
dropout 0, eager attention) into their own model objects, run in float64, and compare the loss and
every parameter gradient (tests/_numerics.py RTOL64): the claims are exact equalities.

- InfoNCE (`embedkit.objectives.infonce.InfoNCE`) vs `BiEncoderOnlyEmbedderModel`
  (FlagEmbedding/finetune/embedder/encoder_only/base/modeling.py; its loss paths in
  FlagEmbedding/abc/finetune/embedder/AbsModeling.py): group size 1 and 4, two temperatures,
  in-batch negatives, without and with teacher scores (kd_loss_type kl_div and m3_kd_loss).
- M3 unified fine-tuning with self-distillation (`embedkit.objectives.m3.M3`, dense + sparse +
  multi-vector + ensemble) vs `EncoderOnlyEmbedderM3Model` (encoder_only/m3/modeling.py,
  unified_finetuning and use_self_distill on), with the head weights copied over, without and with
  teacher scores.
- The one deliberate difference, ColBERT padding: FlagEmbedding's training
  `compute_colbert_score` takes each query token's max over all passage positions, padding
  included; padded positions hold zero vectors, so every max is floored at 0. embedkit (as the
  paper's formula and FlagEmbedding's inference code) takes the max over real tokens only. On a
  batch without passage padding the two are equal; with padding they differ, by exactly
  Σ_i max(0, −best_i) / N_q for each padded passage, and are equal again once embedkit's masked
  max is given an all-real passage mask (the padded max).
- Cross-device negatives with 2 gloo ranks (FlagEmbedding's `negatives_cross_device`,
  `_dist_gather_tensor`): FlagEmbedding gathers without gradient and scores all W·B queries on
  every rank; embedkit gathers with gradient and scores its own queries. The mean of embedkit's
  rank losses equals FlagEmbedding's loss; the DDP-averaged gradients differ by exactly
  (1 − 1/W)·∂X/∂θ, X being the part FlagEmbedding takes over the gathered matrix (see
  embedkit/objectives/cross_device.py: its gather leaves 1/W of the full-batch gradient).

Two things the test works around on FlagEmbedding's side, documented where they are done:
- A BERT tokenizer has no EOS token, and FlagEmbedding's M3 `_sparse_embedding` zeroes the ids
  [cls, eos, pad, unk], so `eos_token_id` None crashes the indexing. FlagEmbedding gets a copy of
  the tokenizer with eos_token = [SEP] (BERT's end token), which makes its zeroed ids [CLS], [SEP],
  [PAD], [UNK]: the ones embedkit zeroes (`special_token_ids`).
- FlagEmbedding builds the teacher tensor with `torch.tensor(teacher_scores)`, i.e. in the default
  dtype; its forward runs under `torch.set_default_dtype(torch.float64)` so that the comparison
  stays in float64.
"""

from __future__ import annotations

import copy
import functools
import os
import socket

import pytest
import torch

from embedkit.models import m3_heads
from embedkit.models.build import hf_encoder
from embedkit.models.vocab import build_char_vocab, save_tokenizer
from embedkit.objectives.infonce import InfoNCE
from embedkit.objectives.m3 import M3

from _numerics import RTOL64, assert_close_scaled, float64, scale_of
from helpers import PASSAGES, QUERIES
from peers import flagembedding_modeling

pytestmark = pytest.mark.usefixtures("one_torch_thread")

B = 3
EVEN_PASSAGES = [p[:5] for p in PASSAGES]   # 5 characters each: no passage padding


@pytest.fixture(scope="module")
def fe():
    return flagembedding_modeling()


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return save_tokenizer(build_char_vocab(QUERIES + PASSAGES), tmp_path_factory.mktemp("peertok"))


def fe_tokenizer(tok):
    """The tokenizer FlagEmbedding gets: eos_token = [SEP] (the module docstring says why)."""
    t = copy.deepcopy(tok)
    t.eos_token = t.sep_token
    return t


@pytest.fixture(scope="module")
def bert_dir(tok, tmp_path_factory):
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("peerbert")
    BertModel(config, add_pooling_layer=False).save_pretrained(out)
    return str(out)


def load_both(tok, bert_dir):
    """(embedkit TextEncoder, FlagEmbedding's base model): the same saved weights, float64."""
    from transformers import AutoModel

    ours = hf_encoder(tok, bert_dir, pooling="cls", normalize=True, attn_implementation="eager").double()
    theirs = AutoModel.from_pretrained(bert_dir, add_pooling_layer=False, attn_implementation="eager").double()
    return ours, theirs.train()


def features(tok, texts):
    t = tok(list(texts), padding=True, return_tensors="pt")
    return {"input_ids": t["input_ids"], "attention_mask": t["attention_mask"]}


def make_batch(tok, group, passages=PASSAGES, seed=0, scores=True):
    """B queries, B·group passages and (B, group) teacher scores (raw logits, as a reranker's)."""
    batch = {"query": features(tok, QUERIES[:B]), "passages": features(tok, passages[:B * group])}
    if scores:
        g = torch.Generator().manual_seed(seed)
        batch["teacher_scores"] = torch.randn(B, group, generator=g, dtype=torch.float64) * 3
    return batch


def fe_loss(model, batch, kd):
    teacher = batch["teacher_scores"].reshape(-1).tolist() if kd else None
    with float64():
        return model(queries=batch["query"], passages=batch["passages"], teacher_scores=teacher).loss


def ours_loss(module, batch):
    return module.loss_from_embeddings(module.embed(batch), batch)


def grads_of(module, loss, rename=lambda n: n):
    module.zero_grad(set_to_none=True)
    loss.backward()
    return {rename(n): p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def assert_same(ours_loss_value, ours_grads, theirs_loss_value, theirs_grads):
    assert_close_scaled(ours_loss_value, theirs_loss_value, RTOL64, what="loss")
    assert set(ours_grads) == set(theirs_grads) and ours_grads
    scale = scale_of(theirs_grads)
    for name, g in theirs_grads.items():
        assert_close_scaled(ours_grads[name], g, RTOL64, scale=scale, what=name)


def _encoder_name(n):
    return n.replace("encoder.backbone.", "model.").replace("loss.heads.", "")


# ---------------------------------------------------------------------- InfoNCE

def infonce_pair(fe, tok, bert_dir, temperature, kd, cross_device=False):
    enc, bert = load_both(tok, bert_dir)
    ours = InfoNCE(enc, temperature=temperature, kd_loss_type=kd, negatives_cross_device=cross_device)
    theirs = fe["base"].BiEncoderOnlyEmbedderModel(
        bert, tokenizer=fe_tokenizer(tok), negatives_cross_device=cross_device, temperature=temperature,
        kd_loss_type=kd or "kl_div", sentence_pooling_method="cls", normalize_embeddings=True).train()
    return ours, theirs


@pytest.mark.parametrize("group, temperature", [(1, 0.02), (4, 0.05)])
@pytest.mark.parametrize("kd", [None, "kl_div", "m3_kd_loss"])
def test_infonce_loss_and_gradients_equal_flagembedding(fe, tok, bert_dir, group, temperature, kd):
    ours, theirs = infonce_pair(fe, tok, bert_dir, temperature, kd)
    batch = make_batch(tok, group, seed=group)
    mine = ours_loss(ours, batch)
    ref = fe_loss(theirs, batch, kd)
    assert_same(mine, grads_of(ours, mine, _encoder_name), ref, grads_of(theirs, ref))
    if kd:
        plain = ours_loss(InfoNCE(load_both(tok, bert_dir)[0], temperature=temperature), batch)
        if group == 1:   # a one-member group: the teacher is a point mass, both reduce to InfoNCE
            assert_close_scaled(mine, plain, RTOL64)
        else:            # the teacher changes the loss: the comparison above is not InfoNCE's twice
            assert abs(plain.item() - mine.item()) > 1e-3


# ---------------------------------------------------------------------- M3

def m3_pair(fe, tok, bert_dir, kd, temperature=0.02, cross_device=False, colbert_dim=None):
    enc, bert = load_both(tok, bert_dir)
    torch.manual_seed(1)
    ours = M3(enc, temperature=temperature, self_distill=True, kd_loss_type=kd,
              negatives_cross_device=cross_device, colbert_dim=colbert_dim).double()
    heads = ours.loss.heads
    colbert = torch.nn.Linear(32, heads.colbert_dim, dtype=torch.float64)
    sparse = torch.nn.Linear(32, 1, dtype=torch.float64)
    colbert.load_state_dict(heads.colbert_linear.state_dict())
    sparse.load_state_dict(heads.sparse_linear.state_dict())
    theirs = fe["m3"].EncoderOnlyEmbedderM3Model(
        {"model": bert, "colbert_linear": colbert, "sparse_linear": sparse}, tokenizer=fe_tokenizer(tok),
        negatives_cross_device=cross_device, temperature=temperature, kd_loss_type=kd or "m3_kd_loss",
        sentence_pooling_method="cls", normalize_embeddings=True, unified_finetuning=True,
        use_self_distill=True, self_distill_start_step=-1).train()
    return ours, theirs


def padded_max(multivec_scores):
    """embedkit's multi-vector score with FlagEmbedding's training max: over every passage position
    (the pad vectors are zero), i.e. an all-real passage mask."""
    @functools.wraps(multivec_scores)
    def scores(q_vecs, q_mask, p_vecs, p_mask):
        return multivec_scores(q_vecs, q_mask, p_vecs, torch.ones_like(p_mask))
    return scores


@pytest.mark.parametrize("kd", [None, "m3_kd_loss", "kl_div"])
def test_m3_unified_self_distill_equals_flagembedding_without_passage_padding(fe, tok, bert_dir, kd):
    batch = make_batch(tok, 4, passages=EVEN_PASSAGES, seed=5)
    assert bool(batch["passages"]["attention_mask"].all())
    ours, theirs = m3_pair(fe, tok, bert_dir, kd)
    mine = ours_loss(ours, batch)
    ref = fe_loss(theirs, batch, kd)
    assert "distill" in ours.loss._last_terms   # self-distillation is in the compared loss
    assert_same(mine, grads_of(ours, mine, _encoder_name), ref, grads_of(theirs, ref))


def center_colbert(ours, theirs, batch):
    """Set both ColBERT heads' bias to −W·mean(h) over the batch's real tokens. A fresh tiny BERT's
    token states share a large common part, so every token similarity is positive and the padded
    max never differs; centred vectors in 2 dimensions (colbert_dim=2) give negative best
    matches, the case that matters."""
    enc = ours.encoder
    hidden = [(enc.hidden_states(**batch[s]), batch[s]["attention_mask"]) for s in ("query", "passages")]
    mean = (sum((h * m[..., None]).sum((0, 1)) for h, m in hidden)
            / sum(m.sum() for _, m in hidden))
    with torch.no_grad():
        for layer in (ours.loss.heads.colbert_linear, theirs.colbert_linear):
            layer.bias.copy_(-layer.weight @ mean.detach())


@pytest.mark.parametrize("kd", [None, "m3_kd_loss"])
def test_m3_with_passage_padding_differs_only_by_the_padded_max(fe, tok, bert_dir, monkeypatch, kd):
    batch = make_batch(tok, 4, seed=6)
    p_mask = batch["passages"]["attention_mask"]
    assert not bool(p_mask.all())   # the case under test: padded passages
    ours, theirs = m3_pair(fe, tok, bert_dir, kd, colbert_dim=2)
    center_colbert(ours, theirs, batch)
    emb = ours.embed(batch)

    # the score matrices: FlagEmbedding's colbert score on the same vectors, against ours
    ours_scores = m3_heads.multivec_scores(emb["query_colbert"], emb["query_colbert_mask"],
                                           emb["passages_colbert"], emb["passages_colbert_mask"])
    theirs_scores = theirs.compute_colbert_score(emb["query_colbert"], emb["passages_colbert"],
                                                 q_mask=batch["query"]["attention_mask"]) * theirs.temperature
    # expected gap, written out: per query token, its best real match; where a padded passage's
    # best is negative, FlagEmbedding's max is the pad vectors' 0 instead
    sim = torch.einsum("qid,pjd->qipj", emb["query_colbert"], emb["passages_colbert"])
    real = emb["passages_colbert_mask"].bool()[None, None]
    best = sim.masked_fill(~real, float("-inf")).amax(-1)                      # (B, Lq, N)
    padded = (~emb["passages_colbert_mask"].bool()).any(-1)[None, None]        # (1, 1, N)
    q_real = emb["query_colbert_mask"].bool()[:, :, None]
    gap = (torch.relu(-best) * (padded & q_real)).sum(1) / emb["query_colbert_mask"].sum(-1, keepdim=True)
    assert int(((best < 0) & padded & q_real).sum()) > 0   # some max does hit the floor here
    assert_close_scaled(theirs_scores - ours_scores, gap, RTOL64, scale=scale_of(ours_scores))

    ref = fe_loss(theirs, batch, kd)
    theirs_grads = grads_of(theirs, ref)
    mine = ours_loss(ours, batch)
    assert abs(mine.item() - ref.item()) > 1e-6   # the masked max is a different loss
    monkeypatch.setattr("embedkit.objectives.m3.multivec_scores", padded_max(m3_heads.multivec_scores))
    floored = ours_loss(ours, batch)
    assert_same(floored, grads_of(ours, floored, _encoder_name), ref, theirs_grads)


# ---------------------------------------------------------------------- cross-device, 2 gloo ranks

WORLD, PER_RANK, GROUP = 2, 2, 2
CROSS_CASES = [("infonce", None), ("infonce", "kl_div"), ("infonce", "m3_kd_loss"), ("m3", None),
               ("m3", "m3_kd_loss")]


def _rank_slice(batch, rank):
    q = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    p = slice(rank * PER_RANK * GROUP, (rank + 1) * PER_RANK * GROUP)
    return {"query": {k: v[q] for k, v in batch["query"].items()},
            "passages": {k: v[p] for k, v in batch["passages"].items()},
            "teacher_scores": batch["teacher_scores"][q]}


def _global_batch(tok):
    """W·B queries and their groups, each rank's passages padded alike (no padding at all, so
    that M3's ColBERT max is not the question here)."""
    n = WORLD * PER_RANK
    g = torch.Generator().manual_seed(11)
    return {"query": features(tok, QUERIES[:n]), "passages": features(tok, EVEN_PASSAGES[:n * GROUP]),
            "teacher_scores": torch.randn(n, GROUP, generator=g, dtype=torch.float64) * 3}


def _averaged(grads):
    """DDP's averaging of the ranks' gradients."""
    import torch.distributed as dist

    out = {}
    for name, g in sorted(grads.items()):
        g = g.clone()
        dist.all_reduce(g)
        out[name] = g / dist.get_world_size()
    return out


def _rank_main(rank, port, tok_dir, bert_dir, out_dir):
    import torch.distributed as dist

    from embedkit.models.vocab import load_tokenizer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        fe, tok = flagembedding_modeling(), load_tokenizer(tok_dir)
        batch = _rank_slice(_global_batch(tok), rank)
        results = {}
        for kind, kd in CROSS_CASES:
            pair = infonce_pair if kind == "infonce" else m3_pair
            ours, theirs = pair(fe, tok, bert_dir, kd=kd, temperature=0.05, cross_device=True)
            mine = ours_loss(ours, batch)
            ours_grads = _averaged(grads_of(ours, mine, _encoder_name))
            ref = fe_loss(theirs, batch, kd)
            theirs_grads = _averaged(grads_of(theirs, ref))
            losses = torch.stack([mine.detach(), ref.detach()])
            dist.all_reduce(losses)
            results[f"{kind}-{kd}"] = {"loss": (losses / WORLD).tolist(), "ours": ours_grads,
                                       "theirs": theirs_grads}
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "results.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _full_batch_part(fe, tok, bert_dir, kind, kd, batch):
    """∂X/∂θ in one process on the W·B batch: X is the loss part FlagEmbedding computes over the
    gathered queries (its gather leaves 1/W of X's gradient): the whole InfoNCE / m3_kd_loss, the
    InfoNCE term of kl_div; for M3, L_dense at its weight 1/8 in (L + L')/2."""
    from embedkit.objectives.infonce import contrastive_loss, teacher_targets

    enc, _ = load_both(tok, bert_dir)
    module = InfoNCE(enc)
    q, p = enc(**batch["query"]), enc(**batch["passages"])
    scores = q @ p.T / 0.05
    teacher = teacher_targets(batch, kd, 1.0, q.shape[0], GROUP, q.dtype) if kd else None
    x = contrastive_loss(scores, GROUP, teacher=teacher, kd_loss_type=None if kd == "kl_div" else kd)
    if kind == "m3":
        x = x / 8
    return grads_of(module, x, _encoder_name)


@pytest.mark.slow
def test_cross_device_negatives_on_two_gloo_ranks_against_flagembedding(fe, tok, bert_dir, tmp_path):
    import torch.multiprocessing as mp

    tok_dir = tmp_path / "tok"
    tok.save_pretrained(tok_dir)
    mp.spawn(_rank_main, args=(_free_port(), str(tok_dir), bert_dir, str(tmp_path)), nprocs=WORLD, join=True)
    results = torch.load(tmp_path / "results.pt")
    full = _global_batch(tok)
    for kind, kd in CROSS_CASES:
        r = results[f"{kind}-{kd}"]
        mean_ours, mean_theirs = r["loss"]
        assert_close_scaled(torch.tensor(mean_ours), torch.tensor(mean_theirs), RTOL64, what=f"{kind} {kd} loss")
        part = _full_batch_part(fe, tok, bert_dir, kind, kd, full)
        scale = scale_of(r["ours"])
        for name, theirs in r["theirs"].items():
            expected = theirs + (1 - 1 / WORLD) * part.get(name, torch.zeros_like(theirs))
            assert_close_scaled(r["ours"][name], expected, RTOL64, scale=scale, what=f"{kind} {kd} {name}")
        # the gap is real: without it the gradients would differ
        assert any(float((r["ours"][n] - r["theirs"][n]).abs().max()) > 1e-6 * scale for n in part)
