"""InfoNCE against sentence-transformers' MultipleNegativesRankingLoss and a worked case; the
teacher-score distillation losses (kd_loss_type kl_div, m3_kd_loss) on worked cases by hand and
against an index-based recomputation (FlagEmbedding's own code: tests/test_peer_flagembedding.py)."""

import math

import pytest
import torch
import torch.nn.functional as F

from embedkit.objectives.infonce import InfoNCELoss, contrastive_loss, info_nce_loss

from _numerics import RTOL64, assert_close_scaled


def _unit(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=dtype), dim=-1)


@pytest.mark.parametrize("group_size", [1, 2, 4])
@pytest.mark.parametrize("temperature", [0.02, 0.05])
def test_equals_sentence_transformers_mnrl(group_size, temperature):
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    # Equal by construction: compared in float64 (tests/_numerics.py).
    B, D = 6, 16
    q = _unit(B, D, seed=1, dtype=torch.float64)
    p = _unit(B * group_size, D, seed=2, dtype=torch.float64)
    ours = info_nce_loss(q, p, temperature)
    # ST reads columns: anchor, positive, negative_1..n, each (B, D).
    columns = [q] + [p.view(B, group_size, D)[:, j] for j in range(group_size)]
    ref = MultipleNegativesRankingLoss(model=None, scale=1.0 / temperature)
    theirs = ref.compute_loss_from_embeddings(columns, labels=None)
    assert ours.dtype == theirs.dtype == torch.float64
    assert_close_scaled(ours, theirs, RTOL64)


def test_worked_case_two_queries_one_hard_negative():
    # q1 = p1 = e1; q2 = p2 = e2; negatives n1 = e2, n2 = e1. τ = 0.5.
    e1, e2 = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    q = torch.stack([e1, e2])
    p = torch.stack([e1, e2, e2, e1])  # row i*G is the positive: [p1, n1, p2, n2]
    # Row 1 scores /τ: [2, 0, 0, 2] -> target col 0; row 2: [0, 2, 2, 0] -> target col 2.
    expected = -math.log(math.exp(2) / (2 * math.exp(2) + 2))
    # float64 on exact inputs: a log-sum-exp of 4 terms, rounded to a few eps64.
    assert info_nce_loss(q, p, 0.5).item() == pytest.approx(expected, rel=1e-12)


def test_gradient_pulls_positive_closer():
    q = _unit(4, 8, seed=3).requires_grad_()
    p = _unit(8, 8, seed=4)
    info_nce_loss(q, p, 0.05).backward()
    step = F.normalize(q - 0.1 * q.grad, dim=-1)
    before = (q.detach() * p[::2]).sum(-1)
    after = (step * p[::2]).sum(-1)
    assert (after > before).all()


def test_rejects_passages_that_do_not_form_groups():
    with pytest.raises(ValueError, match="groups"):
        info_nce_loss(_unit(3, 4), _unit(4, 4), 0.02)


# ---------------------------------------------------------------------- teacher-score distillation

def _lse(xs):
    return math.log(sum(math.exp(x) for x in xs))


def test_kl_div_worked_case_by_hand():
    # B = 2, G = 2, scores already /τ; teacher (1/4, 3/4) and (1/2, 1/2). Row i's group: 2i, 2i+1.
    s = torch.tensor([[1.0, 0.0, 2.0, 0.5], [0.0, 1.0, 3.0, 1.0]], dtype=torch.float64)
    t = torch.tensor([[0.25, 0.75], [0.5, 0.5]], dtype=torch.float64)
    row0 = -(0.25 * (1.0 - _lse([1.0, 0.0])) + 0.75 * (0.0 - _lse([1.0, 0.0])))
    row1 = -(0.5 * (3.0 - _lse([3.0, 1.0])) + 0.5 * (1.0 - _lse([3.0, 1.0])))
    nce0 = -(1.0 - _lse([1.0, 0.0, 2.0, 0.5]))
    nce1 = -(3.0 - _lse([0.0, 1.0, 3.0, 1.0]))
    expected = (row0 + nce0 + row1 + nce1) / 2
    got = contrastive_loss(s, 2, teacher=t, kd_loss_type="kl_div")
    # float64 on exact inputs: a handful of log-sum-exps, rel 1e-12
    assert got.item() == pytest.approx(expected, rel=1e-12)
    assert contrastive_loss(s, 2, teacher=t, kd_loss_type="kl_div", reduction="sum").item() == \
        pytest.approx(2 * expected, rel=1e-12)


def test_m3_kd_loss_worked_case_by_hand():
    # B = 2, G = 2: member 0 against the whole row, member 1 against the row without member 0.
    s = torch.tensor([[1.0, 0.0, 2.0, 0.5], [0.0, 1.0, 3.0, 1.0]], dtype=torch.float64)
    t = torch.tensor([[0.25, 0.75], [0.5, 0.5]], dtype=torch.float64)
    row0 = 0.25 * -(1.0 - _lse([1.0, 0.0, 2.0, 0.5])) + 0.75 * -(0.0 - _lse([0.0, 2.0, 0.5]))
    row1 = 0.5 * -(3.0 - _lse([0.0, 1.0, 3.0, 1.0])) + 0.5 * -(1.0 - _lse([0.0, 1.0, 1.0]))
    got = contrastive_loss(s, 2, teacher=t, kd_loss_type="m3_kd_loss")
    assert got.item() == pytest.approx((row0 + row1) / 2, rel=1e-12)


def _m3_kd_by_index(s, t, G, offset=0):
    """m3_kd_loss by removing columns (no masking): mean_i Σ_k t_ik · (lse(kept_ik) − s_i,c+k)."""
    total = 0.0
    for i in range(s.shape[0]):
        c = (offset + i) * G
        for k in range(G):
            keep = [j for j in range(s.shape[1]) if not c <= j < c + k]
            total = total + t[i, k] * (torch.logsumexp(s[i, keep], 0) - s[i, c + k])
    return total / s.shape[0]


def _kl_div_by_index(s, t, G, offset=0):
    total = 0.0
    for i in range(s.shape[0]):
        c = (offset + i) * G
        own = s[i, c:c + G]
        total = total - (t[i] * (own - torch.logsumexp(own, 0))).sum() + torch.logsumexp(s[i], 0) - s[i, c]
    return total / s.shape[0]


@pytest.mark.parametrize("kd, ref", [("kl_div", _kl_div_by_index), ("m3_kd_loss", _m3_kd_by_index)])
@pytest.mark.parametrize("G, offset", [(1, 0), (4, 0), (3, 2)])
def test_kd_losses_and_gradients_against_an_index_recomputation(kd, ref, G, offset):
    B = 3
    g = torch.Generator().manual_seed(G + offset)
    s = (torch.randn(B, (B + offset + 1) * G, generator=g, dtype=torch.float64) * 3).requires_grad_()
    t = torch.softmax(torch.randn(B, G, generator=g, dtype=torch.float64), -1)
    ours = contrastive_loss(s, G, query_offset=offset, teacher=t, kd_loss_type=kd)
    theirs = ref(s, t, G, offset)
    assert_close_scaled(ours, theirs, RTOL64)
    (g1,) = torch.autograd.grad(ours, s)
    (g2,) = torch.autograd.grad(theirs, s)
    assert_close_scaled(g1, g2, RTOL64)


def test_m3_kd_loss_with_one_hot_teacher_on_the_positive_is_infonce():
    s = torch.randn(4, 12, dtype=torch.float64)
    t = torch.zeros(4, 3, dtype=torch.float64)
    t[:, 0] = 1
    assert_close_scaled(contrastive_loss(s, 3, teacher=t, kd_loss_type="m3_kd_loss"),
                        F.cross_entropy(s, torch.arange(4) * 3), RTOL64)


def _kd_embeddings(B=4, G=3, D=16):
    q, p = _unit(B, D, seed=5, dtype=torch.float64), _unit(B * G, D, seed=6, dtype=torch.float64)
    scores = torch.randn(B, G, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 2
    return {"query": q, "passages": p}, {"teacher_scores": scores}


@pytest.mark.parametrize("kd", ["kl_div", "m3_kd_loss"])
@pytest.mark.parametrize("teacher_temperature", [1.0, 0.5])
def test_the_loss_module_distils_softmax_of_teacher_over_temperature(kd, teacher_temperature):
    emb, batch = _kd_embeddings()
    loss = InfoNCELoss(temperature=0.05, kd_loss_type=kd, teacher_temperature=teacher_temperature)
    teacher = torch.softmax(batch["teacher_scores"] / teacher_temperature, -1)
    ref = {"kl_div": _kl_div_by_index, "m3_kd_loss": _m3_kd_by_index}[kd]
    expected = ref(emb["query"] @ emb["passages"].T / 0.05, teacher, 3)
    assert_close_scaled(loss(emb, batch), expected, RTOL64)


@pytest.mark.parametrize("kd", ["kl_div", "m3_kd_loss"])
def test_kd_gradcache_blocks_equal_the_whole_loss(kd):
    emb, batch = _kd_embeddings(B=5)
    loss = InfoNCELoss(temperature=0.05, kd_loss_type=kd)
    leaves = {k: v.clone().requires_grad_() for k, v in emb.items()}
    whole = loss(leaves, batch)
    whole.backward()
    blocked, grads = loss.loss_and_grads(emb, batch, scale=1.0, rows=2)
    assert_close_scaled(blocked, whole, RTOL64)
    for k in leaves:
        assert_close_scaled(grads[k], leaves[k].grad, RTOL64, what=k)


def test_kd_off_ignores_the_teacher_scores_and_on_needs_them():
    emb, batch = _kd_embeddings()
    plain = InfoNCELoss(temperature=0.05)
    assert torch.equal(plain(emb, batch), info_nce_loss(emb["query"], emb["passages"], 0.05))
    with pytest.raises(ValueError, match=r"objective.kd_loss_type=kl_div distils from teacher scores.*pos_scores"):
        InfoNCELoss(kd_loss_type="kl_div")(emb, {})
    with pytest.raises(ValueError, match=r"teacher_scores has shape \(4, 2\).*\(4, 3\)"):
        InfoNCELoss(kd_loss_type="m3_kd_loss")(emb, {"teacher_scores": torch.zeros(4, 2)})
    with pytest.raises(ValueError, match=r"objective.kd_loss_type must be null .* got 'kl'"):
        InfoNCELoss(kd_loss_type="kl")
    with pytest.raises(ValueError, match="teacher_temperature must be > 0"):
        InfoNCELoss(kd_loss_type="kl_div", teacher_temperature=0)
