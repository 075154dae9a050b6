"""GradCache: the cached step has the plain step's loss and parameter gradients, for every objective
whose loss is a function of embeddings, and replays dropout exactly; it trains inside Lightning
with clipping, accumulation, the LR schedule and the grad-norm / non-finite checks intact."""

import pytest
import torch

from embedkit.models.vocab import build_char_vocab, save_tokenizer
from embedkit.objectives.cosent import CoSENT, CoSENTLoss
from embedkit.objectives.gradcache import GradCache
from embedkit.objectives.infonce import InfoNCE, InfoNCELoss
from embedkit.objectives.m3 import M3
from embedkit.objectives.matryoshka import Matryoshka

from _numerics import EPS32, RTOL64, assert_close_scaled, scale_of
from helpers import (PASSAGES, QUERIES, assert_same_grads, cached_loss_and_grads, pair_batch,
                     plain_loss_and_grads, sts_batch)
from helpers import toy_encoder as encoder


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return save_tokenizer(build_char_vocab(QUERIES + PASSAGES), tmp_path_factory.mktemp("gctok"))


OBJECTIVES = {
    "infonce": (lambda enc: InfoNCE(enc, temperature=0.05), pair_batch),
    "cosent": (lambda enc: CoSENT(enc), sts_batch),
    "matryoshka": (lambda enc: Matryoshka(enc, inner=InfoNCELoss(temperature=0.05), dims=[8, 16, 32]),
                   pair_batch),
    "matryoshka_cosent": (lambda enc: Matryoshka(enc, inner=CoSENTLoss(), dims=[16, 32]), sts_batch),
    "m3": (lambda enc: M3(enc), pair_batch),
}


@pytest.mark.parametrize("name", list(OBJECTIVES))
@pytest.mark.parametrize("mini_batch", [1, 4])
def test_cached_step_equals_the_plain_step(tok, name, mini_batch):
    # An exactness claim (the chain rule), so both sides run in float64 (tests/_numerics.py).
    build, make_batch = OBJECTIVES[name]
    module = build(encoder(tok)).double()
    batch = make_batch(tok)
    loss, grads = plain_loss_and_grads(module, batch)
    cached, cached_grads = cached_loss_and_grads(module, batch, mini_batch)
    assert loss.dtype == cached.dtype == torch.float64
    assert_close_scaled(cached, loss, RTOL64, what="loss")
    assert_same_grads(cached_grads, grads)
    # The test can fail: dropping one chunk's replay changes the gradient.
    assert any(g.abs().max() > 0 for g in grads.values())


def test_dropout_is_replayed_exactly(tok):
    module = InfoNCE(encoder(tok, dropout=0.3))
    module.train()
    batch = pair_batch(tok)
    gc = GradCache(mini_batch=4)
    torch.manual_seed(1)
    first, chunks = gc.embed_no_grad(module, batch)
    offsets = {}
    for side, (a, b), state in chunks:
        with state.replay():
            again = module.embed_tokens(side, {k: v[a:b] for k, v in batch[side].items()})
        assert torch.equal(again[side], first[side][a:b])
        offsets[side] = b
    # Two plain passes differ, so the equality above is the replayed RNG, not a dropout-free model.
    torch.manual_seed(1)
    p1 = module.embed_tokens("query", batch["query"])["query"]
    p2 = module.embed_tokens("query", batch["query"])["query"]
    assert not torch.equal(p1, p2)


def test_replay_leaves_the_rng_where_the_first_pass_left_it(tok):
    module = InfoNCE(encoder(tok, dropout=0.3))
    batch = pair_batch(tok)
    gc = GradCache(mini_batch=2)
    torch.manual_seed(3)
    loss, _, leaves, chunks = gc.loss_and_cache(module, batch)
    after_first = torch.get_rng_state()
    grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
    gc.replay(module, batch, chunks, grads, backward=lambda s: s.backward())
    assert torch.equal(torch.get_rng_state(), after_first)


def test_config_switch():
    assert GradCache.from_config(None) is None
    assert GradCache.from_config({"mini_batch": None}) is None
    assert GradCache.from_config({"mini_batch": 8}).mini_batch == 8
    with pytest.raises(ValueError, match="mini_batch"):
        GradCache.from_config({"mini_batch": 0})
    with pytest.raises(ValueError, match="unknown grad_cache"):
        GradCache.from_config({"mini_batch": 2, "chunk": 3})


def test_trainer_overrides_move_clipping_and_accumulation_into_the_objective(tok):
    module = InfoNCE(encoder(tok), grad_cache={"mini_batch": 2})
    assert module.automatic_optimization is False
    overrides = module.trainer_overrides({"gradient_clip_val": 0.5, "accumulate_grad_batches": 3})
    assert overrides == {"gradient_clip_val": None, "accumulate_grad_batches": 1}
    assert module.grad_cache.gradient_clip_val == 0.5 and module.grad_cache.accumulate_grad_batches == 3
    assert InfoNCE(encoder(tok)).trainer_overrides({"gradient_clip_val": 0.5}) == {}


# ---------------------------------------------------------------------- inside Lightning


class _Batches(torch.utils.data.Dataset):
    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        return self.batches[i]


def _fit(module, batches, tmp_path, clip, accumulate, precision="32-true", max_steps=-1):
    import pytorch_lightning as pl

    trainer_cfg = dict(accelerator="cpu", devices=1, max_epochs=1, max_steps=max_steps,
                       precision=precision, gradient_clip_val=clip, accumulate_grad_batches=accumulate,
                       logger=False, enable_checkpointing=False, enable_progress_bar=False,
                       enable_model_summary=False, default_root_dir=str(tmp_path),
                       num_sanity_val_steps=0, limit_val_batches=0)
    trainer = pl.Trainer(**{**trainer_cfg, **module.trainer_overrides(trainer_cfg)})
    loader = torch.utils.data.DataLoader(_Batches(batches), batch_size=None, shuffle=False)
    trainer.fit(module, train_dataloaders=loader)
    return trainer


def test_lightning_training_matches_the_plain_step(tok, tmp_path):
    """Four batches, accumulation 2, a clip that bites: weights, optimiser steps and LR after
    training equal the automatic-optimisation run's; the loss and grad norm are logged."""
    batches = [pair_batch(tok, n_queries=3 + i % 2, group=2) for i in range(4)]
    plain = InfoNCE(encoder(tok), temperature=0.05, lr=1e-2)
    cached = InfoNCE(encoder(tok), temperature=0.05, lr=1e-2,
                     grad_cache={"mini_batch": 2})
    t_plain = _fit(plain, batches, tmp_path / "a", clip=0.05, accumulate=2, precision="64-true")
    t_cached = _fit(cached, batches, tmp_path / "b", clip=0.05, accumulate=2, precision="64-true")
    assert t_plain.global_step == t_cached.global_step == 2
    assert plain.lr_schedulers().get_last_lr() == cached.lr_schedulers().get_last_lr()
    # Both runs in float64: Adam divides by sqrt(v)+eps, which in float32 turns the rounding
    # noise of gradients that are ~0 by cancellation (~1e-11) into weight differences of ~1e-5;
    # in float64 that noise is ~1e-20 and the runs agree to rounding. A missed chunk, a wrong
    # accumulation factor or an unclipped step differs by ~1e-2 (steps of lr = 1e-2).
    assert all(p.dtype == torch.float64 for p in cached.parameters())
    scale = scale_of(*plain.parameters())   # a weight near 0 (the key bias) is rounded at this size
    for (n, p), (_, q) in zip(plain.named_parameters(), cached.named_parameters()):
        assert_close_scaled(q, p, RTOL64, scale=scale, what=n)
    start = InfoNCE(encoder(tok)).double()
    moved = max((p - q).abs().max() for p, q in zip(plain.parameters(), start.parameters()))
    assert moved > 1e-2   # training did change the weights
    assert_close_scaled(t_cached.callback_metrics["train/loss"], t_plain.callback_metrics["train/loss"],
                        RTOL64, what="train/loss")
    # The logged norm is taken in float32 (embedkit/objectives/base.py) of gradients equal to
    # float64 rounding: at most a few float32 roundings apart.
    assert_close_scaled(t_cached.callback_metrics["train/grad_norm"],
                        t_plain.callback_metrics["train/grad_norm"], 8 * EPS32, what="train/grad_norm")


def test_lightning_clipping_is_applied(tok, tmp_path):
    batches = [pair_batch(tok, n_queries=4)]
    runs = {}
    for clip in (None, 1e-3):
        m = InfoNCE(encoder(tok), temperature=0.05, lr=1e-2, warmup_ratio=0.0,
                    grad_cache={"mini_batch": 3})
        _fit(m, batches, tmp_path / str(clip), clip=clip, accumulate=1)
        runs[clip] = torch.cat([p.detach().flatten() for p in m.parameters()])
    start = torch.cat([p.detach().flatten() for p in InfoNCE(encoder(tok)).parameters()])
    # Adam normalises step sizes, so compare the directions' effect: clipping changes the update.
    assert not torch.allclose(runs[None] - start, runs[1e-3] - start)


def test_lightning_bf16_mixed_precision_runs(tok, tmp_path):
    m = InfoNCE(encoder(tok), temperature=0.05, grad_cache={"mini_batch": 2})
    trainer = _fit(m, [pair_batch(tok, n_queries=4)] * 2, tmp_path, clip=1.0, accumulate=1,
                   precision="bf16-mixed")
    assert trainer.global_step == 2
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_lightning_nonfinite_loss_still_stops_the_run(tok, tmp_path):
    from embedkit.objectives.base import NonFiniteLossError

    m = InfoNCE(encoder(tok), grad_cache={"mini_batch": 2})
    with torch.no_grad():
        m.encoder.backbone.embeddings.word_embeddings.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="global step 0"):
        _fit(m, [pair_batch(tok, n_queries=4)], tmp_path, clip=1.0, accumulate=1)


def test_checkpoint_saves_and_restores(tok, tmp_path):
    m = InfoNCE(encoder(tok), lr=1e-2, grad_cache={"mini_batch": 2})
    trainer = _fit(m, [pair_batch(tok, n_queries=4)] * 2, tmp_path, clip=1.0, accumulate=1)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=False)
    assert ckpt["global_step"] == 2 and ckpt["optimizer_states"]
    restored = InfoNCE(encoder(tok, seed=5), lr=1e-2, grad_cache={"mini_batch": 2})
    restored.load_state_dict(ckpt["state_dict"])
    for p, q in zip(m.parameters(), restored.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("rows", [1, 4, 100])
def test_infonce_blocked_pass_two_equals_autograd(tok, rows):
    """InfoNCE's pass 2 in query blocks (one score block alive) gives the loss and embedding
    gradients of autograd on the whole score matrix, scaled by the accumulation factor. Both in
    float64: in float32 the two summation orders differ by ~1e-7 of the gradient's scale, by an
    amount that depends on the CPU's kernels."""
    module = InfoNCE(encoder(tok), temperature=0.05).double()
    with torch.no_grad():
        emb = module.embed(pair_batch(tok))
    leaves = {k: v.clone().requires_grad_() for k, v in emb.items()}
    loss = module.loss_from_embeddings(leaves, None)
    (loss * 0.5).backward()
    blocked_loss, grads = module.loss_and_grads(emb, None, scale=0.5, rows=rows)
    assert blocked_loss.dtype == torch.float64
    assert_close_scaled(blocked_loss, loss.detach(), RTOL64, what="loss")
    scale = scale_of(leaves["query"].grad, leaves["passages"].grad)
    for key in ("query", "passages"):
        assert_close_scaled(grads[key], leaves[key].grad, RTOL64, scale=scale, what=key)
    module.loss.negatives_cross_device = True
    assert module.loss_and_grads(emb, None, scale=1.0, rows=rows) is None


@pytest.mark.parametrize("build", [lambda enc, x: InfoNCE(enc, negatives_cross_device=x),
                                   lambda enc, x: M3(enc, negatives_cross_device=x)])
def test_cross_device_switch_is_plain_on_one_process(tok, build):
    """Without a process group the switch changes nothing (tests/test_distributed.py: 2 ranks):
    the same scores and targets; InfoNCE's cross-device path scores its queries by offset into the
    gathered passages (as FlagEmbedding's), which may round the last float32 bit differently."""
    batch = pair_batch(tok)
    on, off = build(encoder(tok), True), build(encoder(tok), False)
    torch.testing.assert_close(on.loss_from_embeddings(on.embed(batch), batch),
                               off.loss_from_embeddings(off.embed(batch), batch), rtol=1e-6, atol=0)
