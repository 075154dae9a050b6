"""Dynamic hard-negative mining (Conan): the refresh rule, the windows, mining rounds with the
current weights, s0 at assignment, the checkpointed state, real fits."""

import io
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


# Texts of random characters: a tiny random model then scores them far apart (no near-ties that
# float rounding could reorder between the callback's batches and the test's own encoding).
_CHARS = ("天地人和山水风云花草日月星辰春夏秋冬"
          "东南西北金木火土江河湖海书画诗词琴棋红黄蓝白黑青")


def _text(rng, length=8):
    return "".join(rng.choice(list(_CHARS), size=length))


def _rows(count=6, depth=20, seed=0):
    rng = np.random.default_rng(seed)
    return [{"query": _text(rng), "pos": [_text(rng)], "neg": [_text(rng), _text(rng)],
             "candidates": [_text(rng) for _ in range(depth)]} for _ in range(count)]


ROWS = _rows()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [t for r in ROWS for t in (r["query"], *r["pos"], *r["neg"], *r["candidates"])]
    return save_tokenizer(build_char_vocab(texts), tmp_path_factory.mktemp("tok"))


def _data(tokenizer, batch_size=2, rows=ROWS):
    dm = ContrastiveDataModule([lambda: [dict(r) for r in rows]], batch_size=batch_size,
                               train_group_size=3, seed=0)
    dm.attach_tokenizer(tokenizer)
    dm.setup()
    return dm


def _encoder(tokenizer, seed=0):
    """A tiny BERT without dropout (train and eval mode score alike). BERT's init (std 0.02) maps
    every text to nearly one CLS vector (cosines within 1e-5 of each other); std 0.3 spreads them
    (cosines −0.1 .. 0.9), so a ranking does not hang on float rounding."""
    torch.manual_seed(seed)
    encoder = tiny_zh_encoder(tokenizer, hidden_size=32, num_layers=1, num_heads=2,
                              intermediate_size=64, dropout=0.0)
    with torch.no_grad():
        for m in encoder.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
                m.weight.normal_(0.0, 0.3)
    return encoder


def _attach(cb, dm, encoder):
    cb.attach(dm.dataset, encoder=encoder, pad_id=dm.tokenizer.pad_token_id, examples=dm.examples,
              passage_texts=dm.passage_texts)


def _texts(dm, ids):
    return [dm.passage_texts[j] for j in ids]


def _reweight(encoder, seed):
    """New weights in the same module object the callback holds."""
    encoder.load_state_dict(_encoder(encoder.tokenizer, seed).state_dict())


def _ranking(encoder, query, pool, forbidden, window=(10, 12)):
    """The clean ranking of `pool` for `query`, computed here: encode, matmul, argsort; checked to
    be clear of ties around ranks `window` (a swap there would be rounding, not a bug)."""
    q = torch.from_numpy(encoder.encode([query]))
    p = torch.from_numpy(encoder.encode(pool))
    scores = (q @ p.T)[0]
    order = [j for j in torch.argsort(scores, descending=True).tolist() if pool[j] not in forbidden]
    lo, hi = window
    near = scores[order[max(lo - 1, 0):hi + 1]]
    assert (near[:-1] - near[1:]).min() > 1e-5, "the test data rank too close to call"
    return [pool[j] for j in order]


def _mean_score(encoder, query, negatives):
    q, p = torch.from_numpy(encoder.encode([query])), torch.from_numpy(encoder.encode(negatives))
    return float((q @ p.T).mean())


@pytest.mark.parametrize("corpus", ["candidates", "all"])
def test_a_refresh_mines_again_with_the_current_weights_and_resets_s0(tokenizer, corpus):
    dm, encoder = _data(tokenizer), _encoder(tokenizer)
    cb = DynamicHardNegatives(check_every=1, rescore=0, candidates="data", corpus=corpus)
    _attach(cb, dm, encoder)
    cb.start(step=0)
    # s0 is measured when the negatives are assigned, with the starting weights
    for i in range(6):
        assert cb.initial[i] == pytest.approx(_mean_score(encoder, ROWS[i]["query"], ROWS[i]["neg"]),
                                              abs=1e-5)
    assert np.isnan(cb.current).all()

    def pool_of(samples):
        if corpus == "all":
            return list(dm.passage_texts)
        return list(dict.fromkeys(t for i in samples for t in pools[i]))

    pools = {i: ROWS[i]["candidates"] for i in range(6)}
    _reweight(encoder, seed=1)   # training moved the weights
    stale = [0, 3]
    cb.current[stale] = -0.7     # 1.15 · −0.7 < s0 and |−0.7| < 0.8
    assert should_refresh(cb.initial[stale], cb.current[stale]).all()
    assert cb.check(step=100) == 2
    for i in stale:
        forbidden = {ROWS[i]["query"], *ROWS[i]["pos"]}
        expected = _ranking(encoder, ROWS[i]["query"], pool_of(stale), forbidden)
        assert _texts(dm, dm.dataset.neg[i]) == expected[10:12]                # n = 2: ranks 10, 11
        assert expected[10:12] != ROWS[i]["candidates"][10:12]                 # not the old ranking
        assert set(_texts(dm, dm.dataset.candidates[i])) == set(expected[:60])  # the new pool
        # s0 reset to the new negatives' score under the weights of the refresh; s cleared
        assert cb.initial[i] == pytest.approx(_mean_score(encoder, ROWS[i]["query"], expected[10:12]),
                                              abs=1e-5)
        assert np.isnan(cb.current[i])
        pools[i] = expected[:60]
    assert _texts(dm, dm.dataset.neg[1]) == ROWS[1]["neg"]                      # not stale: kept
    assert cb.checks[-1]["pool"] == len(pool_of(stale))

    # the second replacement of sample 0: ranks 12, 13 of a ranking by the weights of that moment
    _reweight(encoder, seed=2)
    cb.current[0] = -0.7
    assert cb.check(step=200) == 1
    forbidden = {ROWS[0]["query"], *ROWS[0]["pos"]}
    expected = _ranking(encoder, ROWS[0]["query"], pool_of([0]), forbidden, window=(12, 14))
    assert _texts(dm, dm.dataset.neg[0]) == expected[12:14]
    assert cb.initial[0] == pytest.approx(_mean_score(encoder, ROWS[0]["query"], expected[12:14]),
                                          abs=1e-5)
    assert cb.window_index.tolist() == [2, 0, 0, 1, 0, 0] and cb.refreshed_total == 3


def test_training_steps_update_s_never_s0(tokenizer):
    dm, encoder = _data(tokenizer), _encoder(tokenizer)
    cb = DynamicHardNegatives(rescore=0)
    _attach(cb, dm, encoder)
    cb.start(step=0)
    s0 = cb.initial.copy()
    cb.observe([0, 1], [0.25, -0.5], step=1)
    cb.observe([0], [0.125], step=2)
    assert np.array_equal(cb.initial, s0) and cb.current[:2].tolist() == [0.125, -0.5]
    assert cb.seen_at[:3].tolist() == [2, 1, 0]


def test_a_ranking_too_short_for_the_next_window_is_counted_once_and_not_mined_again(tokenizer):
    dm, encoder = _data(tokenizer), _encoder(tokenizer)
    cb = DynamicHardNegatives(check_every=1, rescore=0, offset=19, candidate_depth=20)  # 20 − 1 query/pos
    _attach(cb, dm, encoder)
    cb.start(step=0)
    cb.current[3] = -0.7
    assert cb.check(step=1) == 0 and cb.exhausted == 1 and cb.spent.tolist() == [0, 0, 0, 1, 0, 0]
    assert _texts(dm, dm.dataset.neg[3]) == ROWS[3]["neg"]
    cb.current[3] = -0.7
    assert cb.check(step=2) == 0 and cb.exhausted == 1
    assert cb.checks[-1] == {"step": 2, "fired": 0, "refreshed": 0, "exhausted": 0, "rescored": 0,
                             "pool": 0}


def test_corpus_all_needs_no_pools_and_candidates_data_asks_for_them(tokenizer):
    rows = [{k: v for k, v in r.items() if k != "candidates"} for r in ROWS]
    dm, encoder = _data(tokenizer, rows=rows), _encoder(tokenizer)
    with pytest.raises(ValueError, match="candidates=data needs rows with `candidates`"):
        cb = DynamicHardNegatives(candidates="data", corpus="candidates")
        _attach(cb, dm, encoder)
        cb.start()
    cb = DynamicHardNegatives(check_every=1, rescore=0, candidates="data", corpus="all", offset=2)
    _attach(cb, dm, encoder)
    cb.start()
    cb.current[2] = -0.7
    assert cb.check(step=1) == 1
    expected = _ranking(encoder, rows[2]["query"], list(dm.passage_texts),
                        {rows[2]["query"], *rows[2]["pos"]}, window=(2, 4))
    assert _texts(dm, dm.dataset.neg[2]) == expected[2:4]
    with pytest.raises(ValueError, match="corpus must be one of"):
        DynamicHardNegatives(corpus="pools")


@pytest.mark.parametrize("candidates", ["mine", "data"])
def test_the_state_round_trips_through_a_weights_only_checkpoint(tokenizer, candidates):
    dm, encoder = _data(tokenizer), _encoder(tokenizer)
    cb = DynamicHardNegatives(check_every=1, rescore=0, candidates=candidates)
    _attach(cb, dm, encoder)
    cb.start(step=0)
    _reweight(encoder, seed=1)
    cb.current[[1, 4]] = -0.7
    cb.check(step=1)
    cb.curve.append((1, 0.5, 0.25))
    buf = io.BytesIO()
    torch.save(cb.state_dict(), buf)
    buf.seek(0)
    fresh_dm = _data(tokenizer)
    fresh = DynamicHardNegatives(check_every=1, rescore=0, candidates=candidates)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    _attach(fresh, fresh_dm, encoder)
    assert fresh.started     # on_train_start neither re-measures s0 nor re-ranks the pools
    assert [fresh_dm.dataset.neg[i] for i in range(6)] == [dm.dataset.neg[i] for i in range(6)]
    assert fresh_dm.dataset.candidates == dm.dataset.candidates             # the pools too
    for key in ("initial", "current", "seen_at", "window_index", "spent"):
        assert np.array_equal(getattr(fresh, key), getattr(cb, key), equal_nan=True), key
    assert fresh.summary() == cb.summary()
    # both continue alike: the same next round with the same weights
    for c in (cb, fresh):
        c.current[[1, 2]] = -0.7
        c.check(step=2)
    assert [fresh_dm.dataset.neg[i] for i in range(6)] == [dm.dataset.neg[i] for i in range(6)]
    with pytest.raises(ValueError, match="DHNM state is version 1"):
        DynamicHardNegatives().load_state_dict({"window_index": torch.zeros(6, dtype=torch.long)})


def _fit(module, dm, cb, max_steps: int, extra=(), ckpt_path=None, **trainer_args) -> pl.Trainer:
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, max_epochs=3, logger=False,
                         enable_checkpointing=bool(extra), enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[cb, *extra], **trainer_args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return trainer


def test_a_resumed_fit_ends_in_the_state_of_an_uninterrupted_one(tokenizer, tmp_path):
    from embedkit.checkpointing import AtomicCheckpointIO, RngState, latest_checkpoint, step_checkpoint

    class Killed(pl.Callback):   # the run dies right after its step-4 checkpoint
        def on_train_batch_end(self, trainer, *args):
            trainer.should_stop = trainer.global_step >= 4

    def run(resume=False, killed=False):
        dm, encoder = _data(tokenizer), _encoder(tokenizer)
        module = InfoNCE(encoder, lr=5e-3, warmup_ratio=0.0)
        # ratio 0 and max_abs 2: every sample with s0 > 0 that a step or a re-score saw is stale
        cb = DynamicHardNegatives(check_every=2, ratio=0.0, max_abs=2.0, rescore=2, candidates="mine")
        extra = [step_checkpoint(tmp_path, 4), RngState(), *([Killed()] if killed else [])]
        _fit(module, dm, cb, 6, extra=extra, plugins=[AtomicCheckpointIO()],
             ckpt_path=str(latest_checkpoint(tmp_path)) if resume else None)
        return cb, dm

    whole, whole_dm = run()
    for f in tmp_path.iterdir():
        f.unlink()
    run(killed=True)
    assert latest_checkpoint(tmp_path).name == "step=000004.ckpt"
    resumed, resumed_dm = run(resume=True)
    assert whole.refreshed_total > 0 and [c["step"] for c in whole.checks] == [2, 4, 6]
    assert [resumed_dm.dataset.neg[i] for i in range(6)] == [whole_dm.dataset.neg[i] for i in range(6)]
    assert resumed_dm.dataset.candidates == whole_dm.dataset.candidates
    assert resumed.window_index.tolist() == whole.window_index.tolist()
    for key in ("initial", "current"):
        np.testing.assert_allclose(getattr(resumed, key), getattr(whole, key), rtol=0, atol=1e-6)
    assert resumed.checks == whole.checks and len(resumed.curve) == len(whole.curve) == 6


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
    assert not np.isnan(cb.current).any()                     # 6 samples x 2 epochs: all seen
    assert summary["refreshed_total"] == 0
    # the step's logged negative score is the batch mean of q·n over the group's negatives
    q, p = module.last_embeddings["query"].detach(), module.last_embeddings["passages"].detach()
    neg = (q.unsqueeze(1) * p.view(2, 3, -1)[:, 1:]).sum(-1).mean()
    # Same float32 dot products, means taken in another order: |score| ≤ 1, a few roundings.
    assert summary["curve"][-1]["neg_score"] == pytest.approx(float(neg), abs=1e-6)


def test_dhnm_refuses_in_batch_only_training_and_loader_workers(tokenizer):
    from types import SimpleNamespace

    dm = ContrastiveDataModule([lambda: ROWS], batch_size=2, train_group_size=1)
    dm.attach_tokenizer(tokenizer)
    dm.setup()
    with pytest.raises(ValueError, match="train_group_size"):
        DynamicHardNegatives().attach(dm.dataset)
    dm = _data(tokenizer)
    dm.num_workers = 2
    with pytest.raises(ValueError, match="num_workers=2"):
        DynamicHardNegatives().on_train_start(SimpleNamespace(datamodule=dm, global_step=0),
                                              SimpleNamespace(encoder=None))


def test_checks_run_on_steps_that_trained_another_task(tokenizer):
    from types import SimpleNamespace

    dm, encoder = _data(tokenizer), _encoder(tokenizer)
    cb = DynamicHardNegatives(check_every=5, rescore=0, task="retrieval")
    _attach(cb, dm, encoder)
    cb.start(step=0)
    cb.observe([1], [-0.7], step=2)
    logged = {}
    module = SimpleNamespace(last_embeddings={"sts": {}}, log=lambda k, v, **kw: logged.update({k: v}))
    cb.on_train_batch_end(SimpleNamespace(global_step=5, current_epoch=0), module, None,
                          {"sts": {}}, 4)
    assert cb.window_index[1] == 1 and logged["dhnm/refreshed"] == 1.0 and not cb.curve


def test_gradcache_steps_are_tracked_as_the_plain_steps_are(tokenizer):
    """Under GradCache the step embeds in chunks without grad; it must still leave its embeddings
    for the callback (`last_embeddings`), or DHNM records nothing. Without dropout both runs see
    the same embeddings up to float32 rounding of the chunked forward, so they record the same s."""
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
    assert not np.isnan(cached.current).any()                  # 3 batches of 2: all 6 samples seen
    # float32 embeddings of unit norm, the same rows in chunks of 2: a few roundings apart
    np.testing.assert_allclose(cached.current, plain.current, rtol=0, atol=1e-5)
    np.testing.assert_allclose([c[2] for c in cached.curve], [c[2] for c in plain.curve], rtol=0, atol=1e-5)
