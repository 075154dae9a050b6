"""InfoNCE against sentence-transformers' MultipleNegativesRankingLoss and a worked case."""

import math

import pytest
import torch
import torch.nn.functional as F

from embedkit.objectives.infonce import info_nce_loss

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
