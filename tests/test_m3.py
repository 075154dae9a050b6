"""BGE-M3: the three scores on worked cases, the loss and its switches, the heads' files, a short
training run, and the mteb search models of the retrieval modes."""

import functools
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from embedkit.models.m3_heads import (
    M3Heads,
    dense_scores,
    multivec_scores,
    sparse_scores,
    special_token_ids,
)
from embedkit.objectives.infonce import info_nce_loss
from embedkit.objectives.m3 import M3, m3_loss

from helpers import DATA, tiny_encoder

from _numerics import RTOL64, assert_close_scaled

PAD, UNK, CLS, SEP = 0, 1, 2, 3


def _identity_heads(dim: int) -> M3Heads:
    """Heads whose sparse weight is ReLU(h[0]) and whose ColBERT map is the identity."""
    heads = M3Heads(dim, special_ids=[PAD, UNK, CLS, SEP])
    with torch.no_grad():
        heads.sparse_linear.weight.zero_()
        heads.sparse_linear.weight[0, 0] = 1.0
        heads.sparse_linear.bias.zero_()
        heads.colbert_linear.weight.copy_(torch.eye(dim))
        heads.colbert_linear.bias.zero_()
    return heads


# ---------------------------------------------------------------------- scores, by hand

def test_sparse_weights_and_scores_worked_case():
    heads = _identity_heads(1)
    # q1: token 10 twice (0.5 then 0.9: the max 0.9 counts), 11 at 0.2; CLS/SEP carry large h.
    # q2: 12 at 0.4; UNK and PAD have large h but are zeroed.
    q_ids = torch.tensor([[CLS, 10, 11, 10, SEP], [CLS, 12, UNK, SEP, PAD]])
    q_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    q_h = torch.tensor([[5.0, 0.5, 0.2, 0.9, 7.0], [3.0, 0.4, 2.0, 1.0, 9.0]]).unsqueeze(-1)
    # p1: 10 at 0.3, 12 negative -> 0 by the ReLU, padding with h = 4.  p2: 11 (0.6 / 0.1), 12 at 0.8
    p_ids = torch.tensor([[CLS, 10, 12, SEP, PAD], [CLS, 11, 12, 11, SEP]])
    p_mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    p_h = torch.tensor([[1.0, 0.3, -0.5, 2.0, 4.0], [1.0, 0.6, 0.8, 0.1, 2.0]]).unsqueeze(-1)

    qw = heads.token_weights(q_h, q_ids, q_mask)
    pw = heads.token_weights(p_h, p_ids, p_mask)
    assert torch.allclose(qw, torch.tensor([[0, 0.5, 0.2, 0.9, 0], [0, 0.4, 0, 0, 0]]))
    assert torch.allclose(pw, torch.tensor([[0, 0.3, 0, 0, 0], [0, 0.6, 0.8, 0.1, 0]]))
    # q1·p1 = 0.9·0.3; q1·p2 = 0.2·0.6; q2·p1 = 0.4·0 ; q2·p2 = 0.4·0.8
    expected = torch.tensor([[0.27, 0.12], [0.0, 0.32]])
    assert torch.allclose(sparse_scores(qw, q_ids, pw, p_ids), expected, atol=1e-6)


def test_special_ids_come_from_the_tokenizer_not_spellings():
    tok = SimpleNamespace(cls_token_id=7, sep_token_id=8, eos_token_id=None, bos_token_id=7,
                          pad_token_id=9, unk_token_id=5, cls_token="<s>", sep_token="</s>")
    assert special_token_ids(tok) == [5, 7, 8, 9]


def test_multivec_worked_case_excludes_cls_and_padding():
    heads = _identity_heads(2)
    s2 = 1 / math.sqrt(2)
    # q1 tokens after CLS: e1, e2.  q2: (1,1)/√2 and one pad.  CLS (9,9) would match anything well.
    q_h = torch.tensor([[[9.0, 9.0], [1, 0], [0, 1]], [[9.0, 9.0], [1, 1], [5, 5]]])
    q_mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # p1 tokens: e1, (0.6, 0.8).  p2: (0, -1) and a pad, whose zeroed vector must not win the max.
    p_h = torch.tensor([[[5.0, 5.0], [1, 0], [3, 4]], [[5.0, 5.0], [0, -1], [7, 7]]])
    p_mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    qv, qm = heads.colbert_vectors(q_h, q_mask)
    pv, pm = heads.colbert_vectors(p_h, p_mask)
    assert qv.shape == (2, 2, 2) and torch.equal(qv[1, 1], torch.zeros(2))  # padding zeroed
    expected = torch.tensor([
        [(1 + 0.8) / 2, (0 + -1) / 2],         # q1: e1 -> 1 | 0 ;  e2 -> 0.8 | -1
        [0.6 * s2 + 0.8 * s2, -s2],           # q2: one real token; its pad is not in the mean
    ])
    assert torch.allclose(multivec_scores(qv, qm, pv, pm), expected, atol=1e-6)


def test_dense_scores_are_inner_products():
    # float64: two kernels for one product; an entry near 0 is rounded at the scale of its terms.
    q = F.normalize(torch.randn(3, 8, dtype=torch.float64), dim=-1)
    p = F.normalize(torch.randn(5, 8, dtype=torch.float64), dim=-1)
    assert_close_scaled(dense_scores(q, p), torch.einsum("bd,nd->bn", q, p), RTOL64, scale=1.0)


def test_sparse_scores_match_a_vocabulary_sized_reference():
    g = torch.Generator().manual_seed(0)
    q_ids, p_ids = torch.randint(0, 12, (3, 6), generator=g), torch.randint(0, 12, (8, 7), generator=g)
    # float64: scatter-max and sum against a dense matmul, two summation orders.
    qw = torch.rand(3, 6, generator=g, dtype=torch.float64)
    pw = torch.rand(8, 7, generator=g, dtype=torch.float64)
    dense_q = torch.zeros(3, 12, dtype=torch.float64)
    dense_p = torch.zeros(8, 12, dtype=torch.float64)
    for r in range(3):
        for t, w in zip(q_ids[r].tolist(), qw[r].tolist()):
            dense_q[r, t] = max(dense_q[r, t].item(), w)
    for r in range(8):
        for t, w in zip(p_ids[r].tolist(), pw[r].tolist()):
            dense_p[r, t] = max(dense_p[r, t].item(), w)
    assert_close_scaled(sparse_scores(qw, q_ids, pw, p_ids), dense_q @ dense_p.T, RTOL64)


# ---------------------------------------------------------------------- the loss

def _ce(s, target):
    """Cross-entropy written out: −mean_i (s_i,t − log Σ_j exp s_ij)."""
    rows = torch.arange(s.shape[0])
    return -(s[rows, target] - torch.log(torch.exp(s).sum(-1))).mean()


def test_loss_worked_case_by_hand():
    # one query, group of 2 (positive first), τ = 1; float64 on exact inputs: a few roundings of
    # a handful of log-sum-exps, so rel 1e-12.
    f64 = dict(dtype=torch.float64)
    scores = {"dense": torch.tensor([[1.0, 0.0]], **f64), "sparse": torch.tensor([[0.0, 0.0]], **f64),
              "multivec": torch.tensor([[0.0, 1.0]], **f64)}
    loss, terms = m3_loss(scores, group_size=2, temperature=1.0)
    l1e = math.log(1 + math.e)
    # s_inter = [1 + 0 + 0, 0 + 0 + 1] -> InfoNCE log 2, and the teacher is (1/2, 1/2)
    main = ((l1e - 1) + math.log(2) + 0.1 * math.log(2) + l1e) / 4
    distill = (2 * (l1e - 0.5) + 0.1 * math.log(2)) / 3
    assert terms["inter"].item() == pytest.approx(math.log(2), rel=1e-12)
    assert terms["distill_dense"].item() == pytest.approx(l1e - 0.5, rel=1e-12)
    assert terms["main"].item() == pytest.approx(main, rel=1e-12)
    assert terms["distill"].item() == pytest.approx(distill, rel=1e-12)
    assert loss.item() == pytest.approx((main + distill) / 2, rel=1e-12)


def _random_scores(B=3, G=4, seed=0, grad=False):
    """float64: the loss tests compare the loss with a recomputation (tests/_numerics.py)."""
    g = torch.Generator().manual_seed(seed)
    f64 = dict(generator=g, dtype=torch.float64)
    out = {"dense": torch.rand(B, B * G, **f64) * 2 - 1,
           "sparse": torch.rand(B, B * G, **f64) * 0.5,
           "multivec": torch.rand(B, B * G, **f64) * 2 - 1}
    return {k: v.requires_grad_(grad) for k, v in out.items()}


def test_total_loss_composition_against_a_recomputation():
    B, G, tau = 3, 4, 0.02
    s = _random_scores(B, G)
    loss, terms = m3_loss(s, G, tau)
    t = torch.arange(B) * G
    d, x, m = s["dense"] / tau, s["sparse"] / tau, s["multivec"] / tau
    inter = 1 * d + 0.3 * x + 1 * m
    L = (_ce(d, t) + _ce(inter, t) + 0.1 * _ce(x, t) + _ce(m, t)) / 4
    teacher = torch.exp(inter) / torch.exp(inter).sum(-1, keepdim=True)

    def kd(sx):
        return -(teacher * (sx - torch.log(torch.exp(sx).sum(-1, keepdim=True)))).sum(-1).mean()

    L_prime = (kd(d) + 0.1 * kd(x) + kd(m)) / 3
    assert_close_scaled(loss, (L + L_prime) / 2, RTOL64)


def test_self_distill_off_gives_L_only():
    s = _random_scores()
    off, terms = m3_loss(s, 4, 0.02, self_distill=False)
    on, _ = m3_loss(s, 4, 0.02, self_distill=True)
    assert "distill" not in terms and torch.allclose(off, terms["main"])
    assert not torch.allclose(off, on)


def test_head_subsets():
    s = _random_scores()
    t, tau = torch.arange(3) * 4, 0.02
    two = {k: s[k] for k in ("dense", "sparse")}
    loss, _ = m3_loss(two, 4, tau, self_distill=False)
    inter = (s["dense"] + 0.3 * s["sparse"]) / tau
    expected = (_ce(s["dense"] / tau, t) + _ce(inter, t) + 0.1 * _ce(s["sparse"] / tau, t)) / 3
    assert_close_scaled(loss, expected, RTOL64)
    # one head: plain InfoNCE, whatever the self_distill switch says
    q = F.normalize(torch.randn(3, 8, dtype=torch.float64), dim=-1)
    p = F.normalize(torch.randn(12, 8, dtype=torch.float64), dim=-1)
    single, terms = m3_loss({"dense": q @ p.T}, 4, tau, self_distill=True)
    assert_close_scaled(single, info_nce_loss(q, p, tau), RTOL64)
    assert "distill" not in terms


def test_teacher_is_stop_grad():
    B, G, tau = 3, 4, 0.05
    s = _random_scores(B, G, seed=1, grad=True)
    _, terms = m3_loss(s, G, tau)
    # dL'/ds_x = λ_x/3 · (softmax(s_x/τ) − p*) / (τ·B) holds only if p* carries no gradient
    inter = (s["dense"] + 0.3 * s["sparse"] + s["multivec"]).detach() / tau
    teacher = torch.softmax(inter, -1)
    for head, lam in (("dense", 1.0), ("sparse", 0.1), ("multivec", 1.0)):
        (grad,) = torch.autograd.grad(terms["distill"], s[head], retain_graph=True)
        expected = lam / 3 * (torch.softmax(s[head].detach() / tau, -1) - teacher) / (tau * B)
        assert_close_scaled(grad, expected, RTOL64, what=head)


def _listwise_by_index(s, t, G):
    """m3_kd_loss by removing columns: mean_i Σ_k t_ik · (lse(row i without members < k) − s_i,iG+k)."""
    total = 0.0
    for i in range(s.shape[0]):
        for k in range(G):
            keep = [j for j in range(s.shape[1]) if not i * G <= j < i * G + k]
            total = total + t[i, k] * (torch.logsumexp(s[i, keep], 0) - s[i, i * G + k])
    return total / s.shape[0]


def _group_kl_plus_infonce(s, t, G):
    rows = torch.arange(s.shape[0])
    own = torch.stack([s[i, i * G:(i + 1) * G] for i in range(s.shape[0])])
    return -(t * torch.log_softmax(own, -1)).sum(-1).mean() + _ce(s, rows * G)


@pytest.mark.parametrize("kd, head_loss", [("m3_kd_loss", _listwise_by_index), ("kl_div", _group_kl_plus_infonce)])
def test_teacher_distillation_replaces_every_heads_infonce(kd, head_loss):
    # FlagEmbedding's M3 passes the teacher targets to the dense, sparse, multi-vector and
    # ensemble losses alike; self-distillation keeps s_inter as its teacher.
    B, G, tau = 3, 4, 0.02
    s = _random_scores(B, G, seed=2)
    t = torch.softmax(torch.randn(B, G, generator=torch.Generator().manual_seed(3), dtype=torch.float64), -1)
    loss, terms = m3_loss(s, G, tau, teacher=t, kd_loss_type=kd)
    d, x, m = s["dense"] / tau, s["sparse"] / tau, s["multivec"] / tau
    inter = d + 0.3 * x + m
    L = (head_loss(d, t, G) + head_loss(inter, t, G) + 0.1 * head_loss(x, t, G) + head_loss(m, t, G)) / 4
    teacher = torch.softmax(inter, -1)

    def sd(sx):
        return -(teacher * torch.log_softmax(sx, -1)).sum(-1).mean()

    assert_close_scaled(terms["main"], L, RTOL64)
    assert_close_scaled(loss, (L + (sd(d) + 0.1 * sd(x) + sd(m)) / 3) / 2, RTOL64)


# ---------------------------------------------------------------------- the module

@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from embedkit.models.vocab import build_char_vocab, save_tokenizer

    rows = [json.loads(line) for line in (DATA / "train" / "cmrc_pairs.jsonl").open(encoding="utf-8")]
    texts = [t for r in rows for t in (r["query"], *r["pos"], *r.get("neg", ()))]
    for name in ("CMRCRetrieval",):
        for f in ("corpus.jsonl", "queries.jsonl"):
            texts += [json.loads(line)["text"] for line in (DATA / "eval" / name / f).open(encoding="utf-8")]
    return save_tokenizer(build_char_vocab(texts), tmp_path_factory.mktemp("m3tok"))


_encoder = functools.partial(tiny_encoder, max_length=64, dropout=0.0)   # (tok, seed=0, pooling=...)


def _batch(tok, queries, passages):
    q = tok(queries, padding=True, return_tensors="pt")
    p = tok(passages, padding=True, return_tensors="pt")
    return {"query": {"input_ids": q["input_ids"], "attention_mask": q["attention_mask"]},
            "passages": {"input_ids": p["input_ids"], "attention_mask": p["attention_mask"]}}


def test_embed_matches_the_encoder_and_heads(tok):
    m = M3(_encoder(tok))
    batch = _batch(tok, ["今天天气", "北京"], ["今天天气很好", "公园", "北京是首都", "中国"])
    emb = m.embed(batch)
    assert torch.allclose(emb["query"], m.encoder(**batch["query"]), atol=1e-6)
    assert emb["passages_colbert"].shape[1] == batch["passages"]["input_ids"].shape[1] - 1
    specials = torch.isin(batch["query"]["input_ids"], torch.tensor(special_token_ids(tok)))
    assert (emb["query_sparse"][specials] == 0).all()
    loss = m.loss_from_embeddings(emb, batch)
    loss.backward()
    assert m.loss.heads.sparse_linear.weight.grad is not None and m.loss.heads.colbert_linear.weight.grad is not None


def test_head_subset_builds_only_those_heads_and_variants(tok):
    m = M3(_encoder(tok), heads=["sparse", "dense"])
    assert m.loss.heads.colbert_linear is None and m.loss.heads.sparse_linear is not None
    emb = m.embed(_batch(tok, ["今天"], ["今天天气", "北京"]))
    assert not any("colbert" in k for k in emb)
    assert list(m.eval_targets()) == ["", "sparse", "dense+sparse"]
    with pytest.raises(ValueError, match="subset"):
        M3(_encoder(tok), heads=["dense", "bm25"])


def test_heads_save_and_load(tok, tmp_path):
    m = M3(_encoder(tok))
    m.save_extras(tmp_path)
    loaded = M3Heads.from_pretrained(tmp_path)
    for (k, a), (k2, b) in zip(m.loss.heads.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert loaded.special_ids.tolist() == special_token_ids(tok)
    fresh = M3(_encoder(tok), heads_init_from=str(tmp_path))
    assert torch.equal(fresh.loss.heads.sparse_linear.weight, m.loss.heads.sparse_linear.weight)
    assert not M3Heads(32).load_weights(tmp_path / "nothing")  # absent files: fresh heads


def test_sparse_weights_use_token_strings(tok):
    m = M3(_encoder(tok))
    (weights,) = m.loss.sparse_weights(m.encoder, ["天气天气很好"])
    assert set(weights) <= {"天", "气", "很", "好"} and weights
    assert all(w > 0 for w in weights.values())
    assert not set(weights) & {tok.cls_token, tok.sep_token, tok.pad_token, tok.unk_token}


def test_short_run_lowers_the_loss(tok):
    import pytorch_lightning as pl

    from embedkit.data.contrastive import ContrastiveDataModule

    rows = [json.loads(line) for line in (DATA / "train" / "cmrc_pairs.jsonl").open(encoding="utf-8")][:64]
    rows = [{"query": r["query"], "pos": r["pos"], "neg": r.get("neg") or []} for r in rows]
    data = ContrastiveDataModule([lambda: rows], batch_size=8, train_group_size=2, passage_max_len=32)
    data.attach_tokenizer(tok)
    m = M3(_encoder(tok), lr=1e-3, warmup_ratio=0.0)
    data.setup()
    fixed = next(iter(data.train_dataloader()))

    def loss_now():
        with torch.no_grad():
            return m.loss_from_embeddings(m.embed(fixed), fixed).item()

    before = loss_now()
    trainer = pl.Trainer(max_steps=30, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, max_epochs=30)
    trainer.fit(m, datamodule=data)
    assert trainer.global_step == 30
    assert loss_now() < 0.8 * before
    assert "train/loss_inter" in trainer.callback_metrics and "train/distill" in trainer.callback_metrics


# ---------------------------------------------------------------------- mteb search models

@pytest.fixture(scope="module")
def cmrc_tasks():
    from embedkit.eval.tasks import load_local_tasks

    return load_local_tasks(DATA / "eval", names=["CMRCRetrieval", "CMRCReranking"], max_rows=30)


def _search(m, weights, instruction=None):
    from embedkit.eval.m3_search import M3Search

    return M3Search(m.loss.representer(m.encoder), weights, model_name="embedkit/test-m3", revision="t1",
                    query_instruction=instruction)


def _run(model, task, top_k=1000):
    split = task.dataset["default"]["test"]
    kw = dict(task_metadata=task.metadata, hf_split="test", hf_subset="default",
              encode_kwargs={"batch_size": 16})
    model.index(split["corpus"], **kw)
    return model.search(split["queries"], top_k=top_k, top_ranked=split["top_ranked"], **kw), split


def test_search_returns_mteb_results_and_respects_top_ranked(tok, cmrc_tasks):
    m = M3(_encoder(tok))
    retrieval, reranking = cmrc_tasks
    results, split = _run(_search(m, (0.4, 0.2, 0.4)), retrieval, top_k=5)
    assert set(results) == set(split["queries"]["id"])
    corpus_ids = set(split["corpus"]["id"])
    for docs in results.values():
        assert len(docs) == 5 and set(docs) <= corpus_ids
        assert all(isinstance(v, float) for v in docs.values())
    results, split = _run(_search(m, (0.0, 1.0, 0.0)), reranking)
    for qid, docs in results.items():
        assert set(docs) == set(split["top_ranked"][qid])


def test_hybrid_1_0_0_equals_dense_ranking(tok, cmrc_tasks, tmp_path):
    from embedkit.eval.cmteb import evaluate_tasks
    from embedkit.eval.encoder import MtebEncoder

    # mean pooling: an untrained CLS vector barely depends on the text, so its ranking is all ties
    m = M3(_encoder(tok, pooling="mean"))
    retrieval = cmrc_tasks[0]
    instruction = "为这个句子生成表示以用于检索相关文章："
    results, split = _run(_search(m, (1.0, 0.0, 0.0), instruction), retrieval, top_k=10)
    q = m.encoder.encode([instruction + t for t in split["queries"]["text"]])
    d = m.encoder.encode(list(split["corpus"]["text"]))
    ids = list(split["corpus"]["id"])
    for row, qid in enumerate(split["queries"]["id"]):
        dense = d @ q[row]
        ranked = sorted(results[qid], key=results[qid].get, reverse=True)
        # float32 unit vectors, two kernels (torch, numpy): dots of 32 terms agree to
        # ≤ 32·eps32 = 4e-6. Documents closer than that may come in either order (adjacent top
        # scores here are ~6e-6 apart), so the ranking is checked up to such ties.
        tol = 1e-5
        got = [dense[ids.index(i)] for i in ranked]
        assert np.allclose([results[qid][i] for i in ranked], got, rtol=0, atol=tol)
        assert len(ranked) == 10 and all(a >= b - tol for a, b in zip(got, got[1:]))
        left_out = [dense[j] for j, i in enumerate(ids) if i not in results[qid]]
        assert max(left_out) <= min(got) + tol, "a better-scoring document was left out"
    # and mteb scores both the same way
    dense = evaluate_tasks(MtebEncoder(m.encoder, "embedkit/test-m3", "dense",
                                       query_instruction=instruction), [retrieval],
                           tmp_path / "dense", batch_size=16, show_progress=False)
    hybrid = evaluate_tasks(_search(m, (1.0, 0.0, 0.0), instruction), [retrieval],
                            tmp_path / "hybrid", batch_size=16, show_progress=False)
    assert hybrid["tasks"]["CMRCRetrieval"] == pytest.approx(dense["tasks"]["CMRCRetrieval"], abs=1e-3)


def test_eval_targets_variants_and_sparse_dump(tok, cmrc_tasks, tmp_path):
    from embedkit.eval.cmteb import evaluate_tasks

    m = M3(_encoder(tok))
    m.loss.save_heads(tmp_path / "model")
    targets = m.eval_targets()
    assert list(targets) == ["", "sparse", "multivec", "dense+sparse", "all"]
    assert targets[""] == {"encoder": m.encoder}
    metas = set()
    for label in ("sparse", "multivec", "dense+sparse", "all"):
        target = targets[label]
        assert target["task_types"] == ["Retrieval", "Reranking"]
        meta = target["mteb_model"].mteb_model_meta
        assert meta.name == "embedkit/m3" and meta.revision.endswith(label)
        metas.add(meta.revision)
    assert len(metas) == 4
    res = evaluate_tasks(targets["all"]["mteb_model"], list(cmrc_tasks), tmp_path / "all",
                         batch_size=16, show_progress=False)
    assert set(res["tasks"]) == {"CMRCRetrieval", "CMRCReranking"}
    res = evaluate_tasks(targets["sparse"]["mteb_model"], list(cmrc_tasks), tmp_path / "sparse",
                         batch_size=16, show_progress=False)
    dump = json.loads((tmp_path / "sparse_weights.json").read_text(encoding="utf-8"))
    example = dump["CMRCRetrieval"]["documents"][0]
    assert example["weights"] and all(isinstance(k, str) for k in example["weights"])
    assert "queries" in dump["CMRCReranking"]


# ---------------------------------------------------------------- heads from a previous stage

def test_heads_init_loads_the_saved_heads_and_starts_the_missing_ones_fresh(tok, tmp_path):
    dense_only = M3(_encoder(tok), heads=["dense"])
    dense_only.save_extras(tmp_path / "dense")
    torch.manual_seed(7)
    fresh = M3(_encoder(tok, seed=3)).loss.heads.state_dict()
    torch.manual_seed(7)
    after_dense = M3(_encoder(tok, seed=3), heads_init_from=str(tmp_path / "dense")).loss.heads
    for k, v in after_dense.state_dict().items():   # nothing to load: both heads fresh, cleanly
        assert torch.equal(v, fresh[k]), k
    # a folder with only the sparse head: it loads, the multi-vector head starts fresh
    sparse_only = M3(_encoder(tok), heads=["dense", "sparse"])
    with torch.no_grad():
        sparse_only.loss.heads.sparse_linear.weight.fill_(0.5)
    sparse_only.save_extras(tmp_path / "sparse")
    torch.manual_seed(7)
    mixed = M3(_encoder(tok, seed=3), heads_init_from=str(tmp_path / "sparse")).loss.heads
    assert (mixed.sparse_linear.weight == 0.5).all()
    assert torch.equal(mixed.colbert_linear.weight, fresh["colbert_linear.weight"])
    M3(_encoder(tok), colbert_dim=8).save_extras(tmp_path / "narrow")
    with pytest.raises(ValueError, match="colbert_linear is \\(8, 32\\).*colbert_dim"):
        M3(_encoder(tok), heads_init_from=str(tmp_path / "narrow"))


# ---------------------------------------------------------------- weight presets

# The numbers as the sources write them (embedkit/objectives/m3.py module docstring):
# (ensemble w, loss λ, dense+sparse, all), each per (dense, sparse, multivec).
DOCUMENTED = {
    # FlagEmbedding modeling.py (ensemble_score, the /4 and /3 sums); research/C_MTEB/MKQA scripts
    "official": ((1, 0.3, 1), (1, 0.1, 1), (1, 0.3, 0), (1, 0.3, 1)),
    # ACL Findings 2024 §3.3 (w1..w3, λ1..λ3) and §4.1-4.2 (MIRACL / MKQA hybrids)
    "paper": ((1, 0.3, 1), (1, 0.1, 1), (1, 0.3, 0), (1, 0.3, 1)),
    # first preprint: plain sums (§3.2, Eq. 2 and 4, §4.1 footnotes 7-8)
    "preprint": ((1, 1, 1), (1, 1, 1), (1, 1, 0), (1, 1, 1)),
}


def _as_weights(triple):
    return dict(zip(("dense", "sparse", "multivec"), (float(x) for x in triple)))


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_weight_presets_resolve_to_the_documented_numbers(tok, name):
    from hydra.utils import instantiate

    from helpers import compose

    w, lam, dense_sparse, both = DOCUMENTED[name]
    variants = {"sparse": (0.0, 1.0, 0.0), "multivec": (0.0, 0.0, 1.0),
                "dense+sparse": tuple(map(float, dense_sparse)), "all": tuple(map(float, both))}
    built = M3(_encoder(tok), weights_from=name).loss
    # the yaml (its own table, interpolated into the three keys) builds the same numbers
    cfg = compose(["objective=m3", f"objective.weights_from={name}"])
    from_yaml = instantiate(cfg.objective, encoder=_encoder(tok)).loss
    for loss in (built, from_yaml):
        assert loss.ensemble_weights == _as_weights(w)
        assert loss.loss_weights == _as_weights(lam)
        assert loss.eval_variants == variants


def test_the_yaml_presets_are_the_module_table_and_official_is_the_default(tok):
    from omegaconf import OmegaConf

    from embedkit.objectives.m3 import WEIGHT_PRESETS
    from helpers import compose

    cfg = compose(["objective=m3"])
    assert cfg.objective.weights_from == "official"
    table = OmegaConf.to_container(cfg.objective.weight_presets, resolve=True)
    as_lists = {name: {**p, "eval_variants": {k: list(v) for k, v in p["eval_variants"].items()}}
                for name, p in WEIGHT_PRESETS.items()}
    assert table == as_lists
    plain = M3(_encoder(tok)).loss
    assert plain.weights_from == "official" and plain.eval_variants["all"] == (1.0, 0.3, 1.0)


def test_explicit_weights_override_the_preset(tok):
    loss = M3(_encoder(tok), weights_from="preprint", loss_weights={"sparse": 0.5},
              eval_variants={"all": [0.4, 0.2, 0.4]}).loss
    assert loss.loss_weights == {"dense": 1.0, "sparse": 0.5, "multivec": 1.0}   # merged per head
    assert loss.ensemble_weights == {"dense": 1.0, "sparse": 1.0, "multivec": 1.0}
    assert loss.eval_variants == {"all": (0.4, 0.2, 0.4)}                        # the set replaced
    with pytest.raises(ValueError, match="weights_from='pape'.*official"):
        M3(_encoder(tok), weights_from="pape")
    with pytest.raises(ValueError, match="lacks \\['eval_variants'\\]"):
        M3(_encoder(tok), weights_from="mine",
           weight_presets={"mine": {"ensemble_weights": {}, "loss_weights": {}}})


def test_preprint_preset_trains_the_plain_sums(tok):
    # The module's loss under weights_from=preprint against the preprint's formulas written out:
    # s_inter = s_d + s_l + s_m, L = (L_d + L_inter + L_l + L_m)/4, L' = (L'_d + L'_l + L'_m)/3.
    m = M3(_encoder(tok), weights_from="preprint")
    batch = _batch(tok, ["今天天气", "北京"], ["今天天气很好", "公园", "北京是首都", "中国"])
    with torch.no_grad():
        emb = m.embed(batch)
        loss = m.loss_from_embeddings(emb, batch)
        s = {k: v.double() / 0.02 for k, v in m.loss.scores(emb).items()}
    t = torch.arange(2) * 2
    d, x, mv = s["dense"], s["sparse"], s["multivec"]
    inter = d + x + mv
    teacher = torch.exp(inter) / torch.exp(inter).sum(-1, keepdim=True)

    def kd(sx):
        return -(teacher * (sx - torch.log(torch.exp(sx).sum(-1, keepdim=True)))).sum(-1).mean()

    L = (_ce(d, t) + _ce(inter, t) + _ce(x, t) + _ce(mv, t)) / 4
    expected = (L + (kd(d) + kd(x) + kd(mv)) / 3) / 2
    # float32 scores / 0.02 through a few log-sum-exps: rel 1e-5
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    with torch.no_grad():
        official = M3(_encoder(tok)).loss_from_embeddings(emb, batch)
    assert official.item() != pytest.approx(expected.item(), rel=1e-3)   # the preset matters here


# ---------------------------------------------------------------- fix_encoder and the warm-up chain

def _fit(module, steps=2, batch_size=8):
    import pytorch_lightning as pl

    from embedkit.data.contrastive import ContrastiveDataModule

    rows = [json.loads(line) for line in (DATA / "train" / "cmrc_pairs.jsonl").open(encoding="utf-8")][:32]
    rows = [{"query": r["query"], "pos": r["pos"], "neg": r.get("neg") or []} for r in rows]
    data = ContrastiveDataModule([lambda: rows], batch_size=batch_size, train_group_size=2,
                                 passage_max_len=32)
    data.attach_tokenizer(module.encoder.tokenizer)
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=data)
    return trainer


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("fix", [True, False])
def test_fix_encoder_steps_only_the_heads(tok, fix):
    m = M3(_encoder(tok), fix_encoder=fix, lr=1e-2, warmup_ratio=0.0)
    enc0, heads0 = _state(m.encoder), _state(m.loss.heads)
    trainer = _fit(m)
    assert trainer.global_step == 2
    enc_same = all(torch.equal(enc0[k], v) for k, v in m.encoder.state_dict().items())
    heads_moved = all(not torch.equal(heads0[k], v) for k, v in m.loss.heads.state_dict().items())
    assert heads_moved
    assert enc_same == fix   # the control run (fix=False) moves the encoder with the same steps
    if fix:
        optimised = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
        assert optimised == {id(p) for p in m.loss.heads.parameters()}


def test_fix_encoder_needs_a_head_to_train(tok):
    with pytest.raises(ValueError, match="fix_encoder=True.*heads=\\['dense'\\]"):
        M3(_encoder(tok), heads=["dense"], fix_encoder=True)


def test_warmup_chain_dense_then_heads_then_unified(tok, tmp_path):
    """The stages of the heads warm-up through the recipe's own train_stage / build_stage, each
    initialised from the previous stage's model folder (model.init_from -> heads_init_from)."""
    from omegaconf import OmegaConf, open_dict
    from safetensors.torch import load_file

    from embedkit.recipes.train_eval import Examples, build_stage, train_stage
    from helpers import compose, resolve

    cfg = compose(["+experiment=m3_ablation_selfdistill", "debug=smoke", "~logger", "trainer=cpu",
                   "data.max_examples=48", "data.batch_size=8", "trainer.max_steps=2"],
                  return_hydra_config=True)
    resolve(cfg, str(tmp_path / "hydra"))   # sets the Hydra config the paths interpolate
    # unresolved, as the recipe's stage configs: heads_init_from follows each stage's init_from
    base = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    examples, texts = Examples().get(base.data)   # texts: a callable streaming them
    from embedkit.models.vocab import build_char_vocab, save_tokenizer

    tokenizer = save_tokenizer(build_char_vocab(texts()), tmp_path / "tok")

    def stage(overrides, init_from):
        s = base.copy()
        with open_dict(s):
            for k, v in overrides.items():
                OmegaConf.update(s, f"objective.{k}", v, merge=False)
            s.model.init_from = init_from
        return s

    dense_cfg = stage({"heads": ["dense"]}, None)
    train_stage(dense_cfg, "dense", tokenizer, examples, tmp_path / "dense")
    dense_dir = tmp_path / "dense" / "model"
    assert not M3Heads.from_pretrained(dense_dir).has_sparse   # the dense stage saved no head

    heads_cfg = stage({"fix_encoder": True, "self_distill": False}, str(dense_dir))
    torch.manual_seed(11)
    start = build_stage(heads_cfg, tokenizer).loss.heads.state_dict()
    torch.manual_seed(11)
    unloaded = build_stage(stage({}, None), tokenizer).loss.heads.state_dict()
    assert all(torch.equal(v, unloaded[k]) for k, v in start.items())   # fresh heads, no error
    train_stage(heads_cfg, "heads", tokenizer, examples, tmp_path / "heads")
    heads_dir = tmp_path / "heads" / "model"
    before, after = load_file(str(dense_dir / "model.safetensors")), load_file(str(heads_dir / "model.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    warmed = load_file(str(heads_dir / "m3_heads.safetensors"))
    assert set(warmed) == set(start) and any(not torch.equal(warmed[k], start[k]) for k in start)

    unified_cfg = stage({"self_distill": True}, str(heads_dir))
    loaded = build_stage(unified_cfg, tokenizer).loss.heads.state_dict()
    assert all(torch.equal(loaded[k], warmed[k]) for k in warmed)   # the warmed heads, exactly
    done = train_stage(unified_cfg, "unified", tokenizer, examples, tmp_path / "unified")
    assert done["record"]["steps"] == 2 and "train/distill" in done["module"].trainer.callback_metrics
    final = load_file(str(tmp_path / "unified" / "model" / "m3_heads.safetensors"))
    assert any(not torch.equal(final[k], warmed[k]) for k in warmed)
    assert any(not torch.equal(v, after[k])
               for k, v in load_file(str(tmp_path / "unified" / "model" / "model.safetensors")).items())


def test_kd_setting_needs_teacher_scores_in_the_batch(tok):
    m = M3(_encoder(tok), kd_loss_type="m3_kd_loss")
    batch = _batch(tok, ["上海在哪里", "熊猫吃什么"], ["上海在长江口", "熊猫吃竹子", "长江很长", "茶叶"])
    emb = m.embed(batch)
    with pytest.raises(ValueError, match=r"objective.kd_loss_type=m3_kd_loss distils from teacher scores"):
        m.loss_from_embeddings(emb, batch)
    scores = torch.tensor([[2.0, -1.0], [0.5, 0.0]], dtype=torch.float64)
    kd = m.loss_from_embeddings(emb, {**batch, "teacher_scores": scores})
    plain = M3(_encoder(tok))
    assert not torch.allclose(kd, plain.loss_from_embeddings(plain.embed(batch), batch))
    with pytest.raises(ValueError, match="objective.kd_loss_type must be null"):
        M3(_encoder(tok), kd_loss_type="listwise")
