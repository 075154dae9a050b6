"""CoSENT against sentence-transformers' CoSENTLoss, worked cases, label invariances; the STS data
module (padding, determinism); a short training run that lowers the loss."""

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from embedkit.data.sts import StsDataModule, sts_jsonl
from embedkit.models.build import tiny_zh_encoder
from embedkit.models.vocab import build_char_vocab, save_tokenizer
from embedkit.objectives.cosent import CoSENT, cosent_loss

from _numerics import RTOL64, assert_close_scaled, scale_of

DATA = Path(os.environ.get("EMBEDKIT_DATA_DIR",
                           Path(__file__).resolve().parents[1].parent / "shared" / "data" / "zh-mini"))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _vectors(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _pairs_with_cosines(cosines):
    """u_i = e1 and v_i at angle acos(c_i) from it, so cos(u_i, v_i) = c_i exactly."""
    c = torch.tensor(cosines, dtype=torch.float64)
    u = torch.stack([torch.ones_like(c), torch.zeros_like(c)], dim=1)
    v = torch.stack([c, torch.sqrt(1 - c ** 2)], dim=1)
    return u, v


# ---------------------------------------------------------------- the loss


@pytest.mark.parametrize("scale", [20.0, 5.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_sentence_transformers_cosent(scale, seed):
    from sentence_transformers.sentence_transformer.losses import CoSENTLoss

    # Equal by construction: compared in float64 (tests/_numerics.py).
    B, D = 16, 24
    u = _vectors(B, D, seed=seed, dtype=torch.float64)
    v = _vectors(B, D, seed=seed + 100, dtype=torch.float64)
    # Integer STS-like scores: plenty of ties.
    labels = torch.randint(0, 6, (B,), generator=torch.Generator().manual_seed(seed)).float()
    ours = cosent_loss(u, v, labels, scale=scale)
    theirs = CoSENTLoss(model=None, scale=scale).compute_loss_from_embeddings([u, v], labels)
    assert ours.dtype == theirs.dtype == torch.float64
    assert_close_scaled(ours, theirs, RTOL64)


def test_gradients_equal_sentence_transformers():
    from sentence_transformers.sentence_transformer.losses import CoSENTLoss

    u1 = _vectors(10, 8, seed=3, dtype=torch.float64).requires_grad_()
    v1 = _vectors(10, 8, seed=4, dtype=torch.float64).requires_grad_()
    u2, v2 = u1.detach().clone().requires_grad_(), v1.detach().clone().requires_grad_()
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 5, 3, 1, 0], dtype=torch.float32)
    cosent_loss(u1, v1, labels).backward()
    CoSENTLoss(model=None).compute_loss_from_embeddings([u2, v2], labels).backward()
    scale = scale_of(u2.grad, v2.grad)
    assert_close_scaled(u1.grad, u2.grad, RTOL64, scale=scale, what="u")
    assert_close_scaled(v1.grad, v2.grad, RTOL64, scale=scale, what="v")


def test_worked_case_by_hand():
    # Three pairs, gold order 0 > 1 > 2, model cosines 0.5, 0.8, 0.0, λ = 20.
    # Ordered comparisons (i above k) and their terms exp(λ(cos_k − cos_i)):
    #   (0, 1): exp(20·0.3) = e^6   (mis-ordered: pair 1 scores above pair 0)
    #   (0, 2): exp(20·(−0.5)) = e^−10
    #   (1, 2): exp(20·(−0.8)) = e^−16
    # float64 (_pairs_with_cosines): rounding ~1e-15, so rel 1e-12 sees even the e^−16 term,
    # which moves the loss by 5e-11 relative (at rel 1e-6 it could be missing).
    u, v = _pairs_with_cosines([0.5, 0.8, 0.0])
    expected = math.log(1 + math.exp(6) + math.exp(-10) + math.exp(-16))
    loss = cosent_loss(u, v, torch.tensor([2.0, 1.0, 0.0]), scale=20.0)
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_ties_contribute_nothing():
    u, v = _pairs_with_cosines([0.5, 0.8, 0.0])
    # All labels equal: no ordered comparison at all, log(1) = 0 and no gradient.
    flat = cosent_loss(u, v, torch.tensor([3.0, 3.0, 3.0]))
    assert flat.item() == 0.0
    # Pairs 0 and 1 tie: only (0, 2) and (1, 2) count, whatever the tied pairs' own order.
    labels = torch.tensor([1.0, 1.0, 0.0])
    tied = cosent_loss(*_pairs_with_cosines([0.5, 0.8, 0.45]), labels, scale=20.0)
    # float64, as in the worked case: rel 1e-12 (the e^−7 term is 4e-7 of the `ordered` loss).
    assert tied.item() == pytest.approx(math.log(1 + math.exp(-1) + math.exp(-7)), rel=1e-12)
    swapped = cosent_loss(*_pairs_with_cosines([0.8, 0.5, 0.45]), labels, scale=20.0)
    assert swapped.item() == pytest.approx(tied.item(), rel=1e-12)
    # The same cosines with 0 above 1 add the (0, 1) term e^{20·0.3} = e^6.
    ordered = cosent_loss(*_pairs_with_cosines([0.5, 0.8, 0.45]), torch.tensor([2.0, 1.0, 0.0]))
    assert ordered.item() == pytest.approx(math.log(1 + math.exp(6) + math.exp(-1) + math.exp(-7)), rel=1e-12)


def test_invariant_to_monotone_label_rescaling():
    u, v = _vectors(12, 16, seed=5), _vectors(12, 16, seed=6)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 2.5, 1, 4, 0.5, 3, 5])
    base = cosent_loss(u, v, labels)
    for transform in (lambda y: y / 5, lambda y: 3 * y - 7, lambda y: y ** 3, torch.exp,
                      lambda y: torch.sigmoid(y - 2)):
        # Labels only choose the mask: the same kernels on the same scores and mask, bitwise.
        assert torch.equal(cosent_loss(u, v, transform(labels)), base)
    # A decreasing map reverses the order and changes the loss.
    assert not torch.allclose(cosent_loss(u, v, -labels), base)


def test_scale_invariant_cosine_and_dtype():
    u, v = _vectors(8, 16, seed=7, dtype=torch.float64), _vectors(8, 16, seed=8, dtype=torch.float64)
    labels = torch.arange(8.0)
    base = cosent_loss(u, v, labels)
    assert_close_scaled(cosent_loss(3 * u, 0.1 * v, labels), base, RTOL64)   # cosine, not dot (float64)
    assert cosent_loss(u.half(), v.half(), labels).dtype == torch.float32


def test_perfect_order_scores_low_reversed_scores_high():
    labels = torch.tensor([3.0, 2.0, 1.0, 0.0])
    good = cosent_loss(*_pairs_with_cosines([0.9, 0.6, 0.3, 0.0]), labels)
    bad = cosent_loss(*_pairs_with_cosines([0.0, 0.3, 0.6, 0.9]), labels)
    assert good.item() < 0.01 < 10 < bad.item()


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="one label per pair"):
        cosent_loss(_vectors(4, 8), _vectors(4, 8), torch.zeros(3))
    with pytest.raises(ValueError, match="batch, dim"):
        cosent_loss(_vectors(4, 8), _vectors(4, 6), torch.zeros(4))


# ---------------------------------------------------------------- data

ROWS = [{"sentence1": f"第{i}个句子说天气" + "很" * (i % 7) + "好",
         "sentence2": f"第{i}句讲天气" + "不" * (i % 3) + "好",
         "score": float(i % 6)} for i in range(50)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [t for r in ROWS for t in (r["sentence1"], r["sentence2"])]
    if (DATA / "train" / "stsb_pairs.jsonl").exists():
        texts += [t for r in sts_jsonl(str(DATA), "train/stsb_pairs.jsonl", max_rows=256)
                  for t in (r["sentence1"], r["sentence2"])]
    return save_tokenizer(build_char_vocab(texts), tmp_path_factory.mktemp("tok"))


def _module(tokenizer, rows=ROWS, **kw):
    dm = StsDataModule([lambda: rows], **{"batch_size": 8, "seed": 3, **kw})
    dm.attach_tokenizer(tokenizer)
    dm.setup()
    return dm


def _decode(tokenizer, ids, mask):
    return tokenizer.decode(ids[mask.bool()], skip_special_tokens=True).replace(" ", "")


def test_batches_hold_scored_pairs_padded_to_their_longest_row(tokenizer):
    dm = _module(tokenizer)
    batches = list(dm.train_dataloader())
    assert len(batches) == len(ROWS) // 8                  # the incomplete last batch is dropped
    by_first = {r["sentence1"]: r for r in ROWS}
    for batch in batches:
        assert batch["labels"].dtype == torch.float32 and batch["labels"].shape == (8,)
        for side in ("sentence1", "sentence2"):
            mask = batch[side]["attention_mask"]
            assert mask.sum(1).max() == mask.shape[1]      # dynamic padding: no all-pad column
        for i in range(8):
            row = by_first[_decode(tokenizer, batch["sentence1"]["input_ids"][i],
                                   batch["sentence1"]["attention_mask"][i])]
            assert _decode(tokenizer, batch["sentence2"]["input_ids"][i],
                           batch["sentence2"]["attention_mask"][i]) == row["sentence2"]
            assert batch["labels"][i].item() == row["score"]


def test_batches_are_a_function_of_seed_and_epoch(tokenizer):
    def order(dm, epoch):
        sampler = dm.batch_sampler()
        sampler.set_epoch(epoch)
        return [tuple(i for i, _ in b) for b in sampler]

    a, b, c = _module(tokenizer), _module(tokenizer), _module(tokenizer, seed=4)
    assert order(a, 0) == order(b, 0)
    assert order(a, 0) != order(a, 1)
    assert order(a, 0) != order(c, 0)


def test_rejects_batches_that_cannot_rank():
    with pytest.raises(ValueError, match="batch_size"):
        StsDataModule([lambda: ROWS], batch_size=1)


@pytest.mark.skipif(not (DATA / "train" / "stsb_pairs.jsonl").exists(), reason="zh-mini bundle not found")
def test_reads_the_zh_mini_sts_file():
    rows = sts_jsonl(str(DATA), "train/stsb_pairs.jsonl", score_range=[0, 5])
    assert len(rows) > 1000
    assert all(isinstance(r["score"], float) and 0 <= r["score"] <= 5 for r in rows)


# ---------------------------------------------------------------- training


@pytest.mark.skipif(not (DATA / "train" / "stsb_pairs.jsonl").exists(), reason="zh-mini bundle not found")
def test_short_training_run_lowers_the_loss(tokenizer):
    import pytorch_lightning as pl

    rows = sts_jsonl(str(DATA), "train/stsb_pairs.jsonl", max_rows=64)
    dm = _module(tokenizer, rows=rows, batch_size=16, max_len=64)
    torch.manual_seed(0)
    # Mean pooling: a fresh model's CLS vectors are nearly identical for every text, which makes
    # the first steps of any ranking loss slow and noisy.
    encoder = tiny_zh_encoder(tokenizer, hidden_size=32, num_layers=1, num_heads=2,
                              intermediate_size=64, dropout=0.0, pooling="mean")
    module = CoSENT(encoder, lr=3e-3, warmup_ratio=0.0)
    batches = list(dm.train_dataloader())

    def mean_loss():
        module.eval()
        with torch.no_grad():
            return float(np.mean([module.loss_from_embeddings(module.embed(b), b).item() for b in batches]))

    before = mean_loss()
    trainer = pl.Trainer(max_steps=30, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=dm)
    after = mean_loss()
    assert trainer.global_step == 30
    assert after < 0.8 * before, (before, after)
    assert "train/spearman" in trainer.callback_metrics
