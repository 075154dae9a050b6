"""Matryoshka against sentence-transformers' MatryoshkaLoss (its real forward path, around MNRL and
CoSENT), one encoder pass per step whatever the dims, weights, the projection head, eval variants,
and the Hydra config."""

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from embedkit.models.build import init_encoder_from, load_encoder
from embedkit.models.vocab import build_char_vocab, save_tokenizer
from embedkit.objectives.cosent import CoSENT, CoSENTLoss, cosent_loss
from embedkit.objectives.infonce import InfoNCE, InfoNCELoss, info_nce_loss
from embedkit.objectives.matryoshka import Matryoshka, TruncatedEncoder, truncate

from _numerics import RTOL32, RTOL64, assert_close_scaled
from helpers import compose as _compose
from helpers import tiny_encoder

TEXTS = ["今天天气很好", "我们去公园散步吧", "人民日报一九九八年新年献词", "好", "embedding 模型 BGE",
         "北京是中国的首都", "上海在长江口"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return save_tokenizer(build_char_vocab(TEXTS), tmp_path_factory.mktemp("tok"))


_encoder = functools.partial(tiny_encoder, dropout=0.0)   # (tokenizer, **tiny_zh_encoder kwargs)


def _vectors(*shape, seed=0, dtype=torch.float64):
    """float64 by default: the loss tests compare equal computations (tests/_numerics.py)."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


class _FixedEncoder(nn.Module):
    """Stands in for the encoder where only the width matters (losses on given embeddings)."""

    def __init__(self, dim):
        super().__init__()
        self.dim = dim
        self.weight = nn.Parameter(torch.zeros(1))


class _ColumnModel(nn.Module):
    """Stands in for a SentenceTransformer in ST's losses: features {"emb": (B, D)} -> that embedding.

    Counts its forwards, so the test also sees ST embed each column once, not once per dim.
    """

    def __init__(self, dim):
        super().__init__()
        self.dim = dim
        self.calls = 0

    def forward(self, features):
        self.calls += 1
        return {"sentence_embedding": features["emb"]}

    def get_embedding_dimension(self):
        return self.dim

    # sentence-transformers 6.3's MatryoshkaLoss asks the model this (checking dims against it)
    def _get_untruncated_embedding_dimension(self):
        return self.dim


# ---------------------------------------------------------------- the loss against sentence-transformers


@pytest.mark.parametrize("group_size", [1, 3])
@pytest.mark.parametrize("weights", [None, [1.0, 0.5, 2.0, 0.25]])
def test_equals_sentence_transformers_matryoshka_around_mnrl(group_size, weights):
    from sentence_transformers.sentence_transformer.losses import (MatryoshkaLoss,
                                                                   MultipleNegativesRankingLoss)

    B, D, temperature = 6, 32, 0.05
    dims = [32, 16, 8, 4]
    q, p = _vectors(B, D, seed=1), _vectors(B * group_size, D, seed=2)   # raw, not normalised
    ours = Matryoshka(_FixedEncoder(D), functools.partial(InfoNCE, temperature=temperature),
                      dims=dims, weights=weights)
    loss = ours.loss_from_embeddings({"query": q, "passages": p}, batch=None)

    model = _ColumnModel(D)
    columns = [{"emb": q}] + [{"emb": p.view(B, group_size, D)[:, j]} for j in range(group_size)]
    theirs = MatryoshkaLoss(model, MultipleNegativesRankingLoss(model, scale=1 / temperature),
                            matryoshka_dims=dims, matryoshka_weights=weights)(columns, labels=None)
    assert loss.dtype == theirs.dtype == torch.float64
    assert_close_scaled(loss, theirs, RTOL64)
    assert model.calls == 1 + group_size          # ST's own caching: one forward per column


def test_equals_sentence_transformers_matryoshka_around_cosent():
    from sentence_transformers.sentence_transformer.losses import CoSENTLoss, MatryoshkaLoss

    B, D = 12, 24
    u, v = _vectors(B, D, seed=3), _vectors(B, D, seed=4)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 5, 3, 1, 0, 2, 4], dtype=torch.float32)
    dims, weights = [24, 12, 6], [1.0, 0.7, 0.3]
    ours = Matryoshka(_FixedEncoder(D), functools.partial(CoSENT, scale=20.0), dims=dims, weights=weights)
    loss = ours.loss_from_embeddings({"sentence1": u, "sentence2": v}, {"labels": labels})

    model = _ColumnModel(D)
    theirs = MatryoshkaLoss(model, CoSENTLoss(model, scale=20.0), dims, weights)(
        [{"emb": u}, {"emb": v}], labels)
    assert loss.dtype == theirs.dtype == torch.float64
    assert_close_scaled(loss, theirs, RTOL64)


def test_loss_is_the_weighted_sum_of_inner_losses_on_truncated_embeddings():
    B, D = 5, 16
    q, p = _vectors(B, D, seed=5), _vectors(2 * B, D, seed=6)
    dims, weights = [16, 8, 2], [0.5, 2.0, 3.0]
    mrl = Matryoshka(_FixedEncoder(D), functools.partial(InfoNCE, temperature=0.1),
                     dims=dims, weights=weights)
    loss = mrl.loss_from_embeddings({"query": q, "passages": p}, None)
    expected = sum(w * info_nce_loss(F.normalize(q[:, :d], dim=-1), F.normalize(p[:, :d], dim=-1), 0.1)
                   for d, w in zip(dims, weights))
    assert_close_scaled(loss, expected, RTOL64)
    # A zero weight removes that width entirely; default weights are all 1.
    only_8 = Matryoshka(_FixedEncoder(D), functools.partial(InfoNCE, temperature=0.1),
                        dims=dims, weights=[0.0, 1.0, 0.0])
    assert_close_scaled(only_8.loss_from_embeddings({"query": q, "passages": p}, None),
                        info_nce_loss(truncate(q, 8), truncate(p, 8), 0.1), RTOL64)
    assert Matryoshka(_FixedEncoder(D), functools.partial(InfoNCE), dims=dims).loss.weights == [1.0] * 3


def test_gradients_of_every_width_reach_the_full_embedding():
    u = _vectors(6, 8, seed=7).requires_grad_()
    v = _vectors(6, 8, seed=8)
    labels = torch.arange(6.0)
    mrl = Matryoshka(_FixedEncoder(8), functools.partial(CoSENT), dims=[8, 4])
    mrl.loss_from_embeddings({"sentence1": u, "sentence2": v}, {"labels": labels}).backward()
    u2 = u.detach().clone().requires_grad_()
    (cosent_loss(u2, v, labels) + cosent_loss(truncate(u2, 4), truncate(v, 4), labels)).backward()
    assert_close_scaled(u.grad, u2.grad, RTOL64)
    assert u.grad[:, 4:].abs().sum() > 0 and u.grad[:, :4].abs().sum() > 0


def test_truncate_keys_leave_other_tensors_alone():
    mrl = Matryoshka(_FixedEncoder(8), functools.partial(InfoNCE), dims=[4], truncate_keys=["query"])
    emb = {"query": _vectors(2, 8), "weights": _vectors(2, 8, seed=1)}
    out = mrl.loss.truncated(emb, 4)
    assert out["query"].shape == (2, 4) and out["weights"] is emb["weights"]


# ---------------------------------------------------------------- one encoder pass per step


def _contrastive_batch(tokenizer, queries, passages):
    def tok(texts):
        enc = tokenizer(texts, padding=True, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    return {"query": tok(queries), "passages": tok(passages)}


@pytest.mark.parametrize("dims", [[32], [32, 16], [32, 16, 8, 4]])
def test_encoder_runs_once_per_step_whatever_the_number_of_dims(tokenizer, dims):
    encoder = _encoder(tokenizer)
    calls = {"encoder": 0, "backbone": 0}
    encoder.register_forward_hook(lambda *_: calls.__setitem__("encoder", calls["encoder"] + 1))
    encoder.backbone.register_forward_hook(lambda *_: calls.__setitem__("backbone", calls["backbone"] + 1))
    mrl = Matryoshka(encoder, functools.partial(InfoNCE, temperature=0.05), dims=dims)
    batch = _contrastive_batch(tokenizer, TEXTS[:3], TEXTS[3:6])
    loss = mrl.training_step(batch, 0)
    # InfoNCE embeds queries and passages: two passes, the same as without Matryoshka.
    assert calls == {"encoder": 2, "backbone": 2}
    loss.backward()
    assert all(p.grad is not None for p in encoder.backbone.encoder.parameters())


def test_the_inner_loss_trains_the_same_encoder_and_lends_its_optimiser_settings(tokenizer):
    import pytorch_lightning as pl

    encoder = _encoder(tokenizer)
    adamw = functools.partial(torch.optim.AdamW, weight_decay=0.05)
    mrl = Matryoshka(encoder, functools.partial(InfoNCE, lr=1e-4, optimizer=adamw, warmup_ratio=0.2),
                     dims=[32, 16])
    # The wrapper composes the inner loss part: no nested LightningModule, one encoder.
    assert isinstance(mrl.loss.inner, InfoNCELoss) and mrl.encoder is encoder
    assert [m for m in mrl.modules() if isinstance(m, pl.LightningModule)] == [mrl]
    # Settings the wrapper leaves unset are the inner objective's; ones it sets must agree.
    assert (mrl.lr, mrl.optimizer_factory.keywords["weight_decay"], mrl.warmup_ratio) == (1e-4, 0.05, 0.2)
    with pytest.raises(ValueError, match=r"inner\.lr=0\.0001 differs from the wrapper's lr=0\.003"):
        Matryoshka(encoder, functools.partial(InfoNCE, lr=1e-4), dims=[32], lr=3e-3)
    assert Matryoshka(encoder, functools.partial(InfoNCE, lr=1e-4), dims=[32], lr=1e-4).lr == 1e-4
    # Parameters are not listed twice although the encoder is reachable through both parts.
    assert len(list(mrl.parameters())) == len(list(encoder.parameters()))
    with pytest.raises(TypeError, match="built InfoNCE"):
        Matryoshka(encoder, InfoNCE(_encoder(tokenizer)), dims=[16])


def test_rejects_bad_dims_and_weights(tokenizer):
    encoder = _encoder(tokenizer)
    inner = functools.partial(InfoNCE)
    with pytest.raises(ValueError, match="exceed"):
        Matryoshka(encoder, inner, dims=[16, 64])
    with pytest.raises(ValueError, match="weights"):
        Matryoshka(encoder, inner, dims=[16, 32], weights=[1.0])
    with pytest.raises(ValueError, match="> 0"):
        Matryoshka(encoder, inner, dims=[0, 32])
    with pytest.raises(ValueError, match="repeat"):
        Matryoshka(encoder, inner, dims=[16, 16])
    with pytest.raises(ValueError, match="temperature"):
        Matryoshka(encoder, InfoNCELoss(temperature=0.02), dims=[32], temperature=0.05)


def test_other_settings_reach_the_inner_objective(tokenizer):
    encoder = _encoder(tokenizer)
    inner = functools.partial(InfoNCE, temperature=0.02)
    mrl = Matryoshka(encoder, inner, dims=[32], temperature=0.05)
    assert mrl.loss.inner.temperature == 0.05
    assert Matryoshka(encoder, inner, dims=[32]).loss.inner.temperature == 0.02


def test_training_with_lightning_logs_every_width_and_the_inner_diagnostics(tokenizer):
    import pytorch_lightning as pl

    from embedkit.data.contrastive import ContrastiveDataModule

    rows = [{"query": t, "pos": [t[::-1] + "。"], "neg": []} for t in TEXTS]
    dm = ContrastiveDataModule([lambda: rows], batch_size=4, seed=0)
    dm.attach_tokenizer(tokenizer)
    mrl = Matryoshka(_encoder(tokenizer), functools.partial(InfoNCE, temperature=0.05, lr=1e-3),
                     dims=[8, 32])
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(mrl, datamodule=dm)
    logged = set(trainer.callback_metrics)
    assert {"train/loss", "train/loss_dim8", "train/loss_dim32", "train/pos_score"} <= logged


# ---------------------------------------------------------------- projection head


def test_projection_head_widens_the_output_and_survives_save_and_load(tokenizer, tmp_path):
    encoder = _encoder(tokenizer, projection_dim=48).eval()
    assert encoder.dim == 48
    emb = encoder.encode(TEXTS)
    assert emb.shape == (len(TEXTS), 48)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)   # float32: ≤ 48·eps32 = 6e-6
    with torch.no_grad():
        encoder.projection.weight.mul_(3.0)            # make sure trained weights, not init, come back
    emb = encoder.encode(TEXTS)

    encoder.save_pretrained(tmp_path / "model")
    assert (tmp_path / "model" / "projection.safetensors").exists()
    again = load_encoder(tmp_path / "model")
    assert again.dim == 48 and again.projection_dim == 48
    assert np.allclose(again.encode(TEXTS), emb, atol=1e-6)

    # A later stage built with the same projection picks it up with the backbone.
    fresh = init_encoder_from(_encoder(tokenizer, projection_dim=48).eval(), tmp_path / "model")
    assert np.allclose(fresh.encode(TEXTS), emb, atol=1e-6)
    with pytest.raises(ValueError, match="projection"):
        init_encoder_from(_encoder(tokenizer), tmp_path / "model")

    # Matryoshka may now use widths beyond the backbone's 32.
    mrl = Matryoshka(encoder, functools.partial(InfoNCE), dims=[16, 32, 48])
    assert [t["encoder"].dim for t in mrl.eval_targets().values()] == [16, 32, 48]


def test_without_projection_nothing_extra_is_saved(tokenizer, tmp_path):
    encoder = _encoder(tokenizer)
    assert encoder.projection is None and encoder.dim == 32
    encoder.save_pretrained(tmp_path / "plain")
    assert not (tmp_path / "plain" / "projection.safetensors").exists()
    assert load_encoder(tmp_path / "plain").projection is None


# ---------------------------------------------------------------- evaluation variants


def test_eval_targets_give_one_truncated_unit_norm_encoder_per_dim(tokenizer):
    encoder = _encoder(tokenizer).eval()
    mrl = Matryoshka(encoder, functools.partial(InfoNCE), dims=[8, 16, 32])
    targets = mrl.eval_targets()
    assert list(targets) == ["dim=8", "dim=16", "dim=32"]
    full = encoder.encode(TEXTS)
    encodes = []
    original = encoder.encode
    encoder.encode = lambda texts, **kw: (encodes.append(len(texts)), original(texts, **kw))[1]
    try:
        for label, kwargs in targets.items():
            d = int(label.split("=")[1])
            view = kwargs["encoder"]
            assert set(kwargs) == {"encoder"} and view.dim == d
            out = view.encode(TEXTS, batch_size=3, show_progress=False, desc="STSB texts")
            assert out.shape == (len(TEXTS), d) and out.dtype == np.float32
            assert np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
            expected = full[:, :d] / np.linalg.norm(full[:, :d], axis=1, keepdims=True)
            assert_close_scaled(out, expected, RTOL32)
    finally:
        encoder.encode = original
    # The views share full-width embeddings: the texts were encoded once for all three widths.
    assert encodes == [len(TEXTS)]


def test_truncated_encoder_passes_progress_arguments_through(tokenizer):
    import inspect

    seen = {}

    class Recorder(nn.Module):
        dim = 32

        def encode(self, texts, batch_size=128, max_length=None, show_progress=False, desc="encode"):
            seen.update(batch_size=batch_size, show_progress=show_progress, desc=desc)
            return np.ones((len(texts), 32), dtype=np.float32)

    view = TruncatedEncoder(Recorder(), 4)
    # embedkit.eval.encoder.MtebEncoder passes progress arguments when `encode` names them.
    assert {"show_progress", "desc"} <= set(inspect.signature(view.encode).parameters)
    out = view.encode(["a", "b"], batch_size=7, show_progress=True, desc="CMRC queries")
    assert seen == {"batch_size": 7, "show_progress": True, "desc": "CMRC queries"}
    assert np.allclose(out, 0.5)                      # four ones, re-normalised
    assert view.encode([]).shape == (0, 4)


# ---------------------------------------------------------------- config


def test_config_builds_the_inner_objective_around_the_same_encoder(tokenizer):
    from hydra.utils import instantiate

    encoder = _encoder(tokenizer)
    cfg = _compose(["objective=matryoshka", "objective.dims=[8,16,32]", "data.train_group_size=2"])
    assert "train_group_size" not in cfg.objective.inner   # the data owns the group size
    mrl = instantiate(cfg.objective, encoder=encoder)
    assert isinstance(mrl.loss.inner, InfoNCELoss) and mrl.encoder is encoder
    assert mrl.loss.dims == [8, 16, 32]

    cfg = _compose(["objective=matryoshka", "objective@objective.inner=cosent", "data=sts_pairs",
                    "objective.dims=[16,32]"])
    mrl = instantiate(cfg.objective, encoder=encoder)
    assert isinstance(mrl.loss.inner, CoSENTLoss) and mrl.encoder is encoder


def test_mrl_experiment_matches_conan_scaled_down():
    cfg = _compose(["+experiment=mrl_dims"])
    dims, width = list(cfg.objective.dims), cfg.model.encoder.projection_dim
    assert max(dims) == width and width > cfg.model.encoder.hidden_size
    paper = _compose(["+experiment=mrl_dims", "scale=paper"])
    assert list(paper.objective.dims) == [256, 512, 768, 1024, 1536, 1792]
    assert paper.model.encoder.projection_dim == 1792


def test_paper_scale_settings_reach_the_inner_objective():
    from hydra.utils import instantiate

    cfg = _compose(["+experiment=mrl_dims", "scale=paper"])
    mrl = instantiate(cfg.objective, encoder=_FixedEncoder(1792))
    assert mrl.loss.inner.temperature == cfg.objective.temperature  # scale=paper's, not infonce.yaml's
    assert mrl.lr == cfg.objective.lr and mrl.lr <= 3e-5
