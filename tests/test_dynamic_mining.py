"""Dynamic hard-negative mining (Conan): the refresh rule, the windows, the state, one real fit."""

import warnings

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from embedkit.data.contrastive import ContrastiveDataModule
from embedkit.mining.dynamic import DynamicHardNegatives, should_refresh, window
from embedkit.models.build import tiny_zh_encoder
from embedkit.models.vocab import build_char_vocab, save_tokenizer
from embedkit.objectives.infonce import InfoNCE


def test_the_rule_fires_exactly_when_both_conditions_hold():
    # worked cases with ratio 1.15 and |s| < 0.8 (Conan):
    s0 = [0.50, 0.50, 0.95, 0.95, -0.10, 0.50, np.nan, 0.50]
    s = [0.43, 0.44, 0.81, 0.79, -0.20, np.nan, 0.10, -0.85]
    # 0.4945<0.5 yes | 0.506 no | 0.9315<0.95 but |0.81|>=0.8 no | 0.9085<0.95 and 0.79 yes |
    # -0.23<-0.1 yes | not re-scored | no s0 | -0.9775<0.5 but |-0.85|>=0.8 no
    assert should_refresh(s0, s).tolist() == [True, False, False, True, True, False, False, False]
    assert should_refresh([0.5], [0.44], ratio=1.1).tolist() == [True]      # 0.484 < 0.5


def test_the_ith_replacement_takes_ranks_i_minus_1_times_n_plus_10_to_i_times_n_plus_10():
    ranking = list(range(100, 150))
    assert window(ranking, 1, 3) == [110, 111, 112]
    assert window(ranking, 2, 3) == [113, 114, 115]
    assert window(ranking, 4, 7) == [131, 132, 133, 134, 135, 136, 137]   # ranks 31..38
    assert window(ranking, 6, 7) is None                                  # needs ranks up to 52


ROWS = [{"query": f"问题{i}号", "pos": [f"答案{i}号段落"], "neg": [f"旧负例{i}甲", f"旧负例{i}乙"],
         "candidates": [f"候选{i}第{r}名" for r in range(20)]} for i in range(6)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [t for r in ROWS for t in (r["query"], *r["pos"], *r["neg"], *r["candidates"])]
    return save_tokenizer(build_char_vocab(texts), tmp_path_factory.mktemp("tok"))


def _data(tokenizer, batch_size=2):
    dm = ContrastiveDataModule([lambda: [dict(r) for r in ROWS]], batch_size=batch_size,
                               train_group_size=3, seed=0)
    dm.attach_tokenizer(tokenizer)
    dm.setup()
    return dm


def _texts(dm, ids):
    return [dm.passage_texts[j] for j in ids]


def test_a_check_refreshes_the_samples_that_fire_and_the_state_round_trips(tokenizer):
    dm = _data(tokenizer)
    cb = DynamicHardNegatives(check_every=1, rescore=0)
    cb.attach(dm.dataset)
    cb.observe([0, 1, 2], [0.50, 0.50, 0.50], step=1)        # s0
    cb.observe([0, 1, 2], [0.40, 0.45, 0.85], step=2)        # s: fires for 0 only (0.46 < 0.5)
    assert cb.check(step=2) == 1
    assert _texts(dm, dm.dataset.neg[0]) == ["候选0第10名", "候选0第11名"]   # n = 2: ranks 10, 11
    assert _texts(dm, dm.dataset.neg[1]) == ["旧负例1甲", "旧负例1乙"]
    assert np.isnan(cb.initial[0]) and cb.initial[1] == 0.5
    # the new negatives get their own s0, then a second refresh takes ranks 12, 13
    cb.observe([0], [0.6], step=3)
    cb.observe([0], [0.3], step=4)
    cb.check(step=4)
    assert _texts(dm, dm.dataset.neg[0]) == ["候选0第12名", "候选0第13名"]
    assert cb.refreshed_total == 2 and cb.window_index.tolist() == [2, 0, 0, 0, 0, 0]

    # a restored callback puts the same windows into fresh data and continues from the same s0
    state = cb.state_dict()
    fresh_dm, fresh = _data(tokenizer), DynamicHardNegatives(check_every=1, rescore=0)
    fresh.load_state_dict(state)
    fresh.attach(fresh_dm.dataset)
    assert [fresh_dm.dataset.neg[i] for i in range(6)] == [dm.dataset.neg[i] for i in range(6)]
    assert np.array_equal(fresh.initial, cb.initial, equal_nan=True)
    assert fresh.refreshed_total == 2
    # torch.save / weights_only load, as Lightning checkpoints are read here
    buf = __import__("io").BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True)["window_index"].tolist() == [2, 0, 0, 0, 0, 0]


def test_a_ranking_too_short_for_the_next_window_is_counted_not_applied(tokenizer):
    dm = _data(tokenizer)
    cb = DynamicHardNegatives(check_every=1, rescore=0, offset=19)   # ranks 19..20 of 20: too short
    cb.attach(dm.dataset)
    cb.observe([3], [0.5], step=1)
    cb.observe([3], [0.1], step=2)
    assert cb.check(step=2) == 0 and cb.exhausted == 1
    assert _texts(dm, dm.dataset.neg[3]) == ["旧负例3甲", "旧负例3乙"]


def _fit(module, dm, cb, max_steps: int) -> None:
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, max_epochs=3, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[cb])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=dm)


def test_training_tracks_scores_from_its_own_steps_and_rescoring_costs_one_batch(tokenizer):
    torch.manual_seed(0)
    dm = _data(tokenizer)
    encoder = tiny_zh_encoder(tokenizer, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    module = InfoNCE(encoder, lr=1e-3, warmup_ratio=0.0)
    cb = DynamicHardNegatives(check_every=2, rescore=2, max_abs=0.0)   # |s| < 0 never holds
    _fit(module, dm, cb, max_steps=6)
    summary = cb.summary()
    assert len(summary["curve"]) == 6 and [c["step"] for c in summary["checks"]] == [2, 4, 6]
    assert all(c["rescored"] <= 2 for c in summary["checks"]) and summary["checks"][0]["rescored"] == 2
    assert not np.isnan(cb.initial).any()                     # 6 samples x 2 epochs: all seen
    assert summary["refreshed_total"] == 0
    # the step's logged negative score is the batch mean of q·n over the group's negatives
    q, p = module.last_embeddings["query"].detach(), module.last_embeddings["passages"].detach()
    neg = (q.unsqueeze(1) * p.view(2, 3, -1)[:, 1:]).sum(-1).mean()
    # Same float32 dot products, means taken in another order: |score| ≤ 1, a few roundings.
    assert summary["curve"][-1]["neg_score"] == pytest.approx(float(neg), abs=1e-6)


def test_dhnm_refuses_in_batch_only_training(tokenizer):
    dm = ContrastiveDataModule([lambda: ROWS], batch_size=2, train_group_size=1)
    dm.attach_tokenizer(tokenizer)
    dm.setup()
    with pytest.raises(ValueError, match="train_group_size"):
        DynamicHardNegatives().attach(dm.dataset)


def test_checks_run_on_steps_that_trained_another_task(tokenizer):
    from types import SimpleNamespace

    dm = _data(tokenizer)
    cb = DynamicHardNegatives(check_every=5, rescore=0, task="retrieval")
    cb.attach(dm.dataset)
    cb.observe([1], [0.5], step=1)
    cb.observe([1], [0.3], step=2)
    logged = {}
    module = SimpleNamespace(last_embeddings={"sts": {}}, log=lambda k, v, **kw: logged.update({k: v}))
    cb.on_train_batch_end(SimpleNamespace(global_step=5, current_epoch=0), module, None,
                          {"sts": {}}, 4)
    assert cb.window_index[1] == 1 and logged["dhnm/refreshed"] == 1.0 and not cb.curve


def test_gradcache_steps_are_tracked_as_the_plain_steps_are(tokenizer):
    """Under GradCache the step embeds in chunks without grad; it must still leave its embeddings
    for the callback (`last_embeddings`), or DHNM records nothing. Without dropout both runs see
    the same embeddings up to float32 rounding of the chunked forward, so they record the same s0."""
    runs = {}
    for grad_cache in (None, {"mini_batch": 2}):
        torch.manual_seed(0)
        dm = _data(tokenizer)
        encoder = tiny_zh_encoder(tokenizer, hidden_size=32, num_layers=1, num_heads=2,
                                  intermediate_size=64, dropout=0.0)
        module = InfoNCE(encoder, lr=1e-3, warmup_ratio=0.0, grad_cache=grad_cache)
        cb = DynamicHardNegatives(check_every=2, rescore=0, max_abs=0.0)
        _fit(module, dm, cb, max_steps=3)
        runs[grad_cache is not None] = cb
    plain, cached = runs[False], runs[True]
    assert len(cached.curve) == len(plain.curve) == 3
    assert not np.isnan(cached.initial).any()                  # 3 batches of 2: all 6 samples seen
    # float32 embeddings of unit norm, the same rows in chunks of 2: a few roundings apart
    np.testing.assert_allclose(cached.initial, plain.initial, rtol=0, atol=1e-5)
    np.testing.assert_allclose([c[2] for c in cached.curve], [c[2] for c in plain.curve], rtol=0, atol=1e-5)
