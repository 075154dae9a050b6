"""Multi-task training (Conan CBB vs sequential random task): what a step holds and what it sums."""

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from embedkit.data.contrastive import ContrastiveDataModule
from embedkit.data.multitask import MultiTaskDataModule
from embedkit.data.sts import StsDataModule
from embedkit.models.build import tiny_zh_encoder
from embedkit.models.vocab import build_char_vocab, save_tokenizer
from embedkit.objectives.cosent import CoSENT, cosent_loss
from embedkit.objectives.infonce import InfoNCE, InfoNCELoss, info_nce_loss
from embedkit.objectives.multitask import MultiTask, MultiTaskLoss

from _numerics import RTOL64

RETRIEVAL = [{"query": f"问{i}", "pos": [f"答{i}甲"], "neg": [f"错{i}乙", f"错{i}丙", f"错{i}丁", f"错{i}戊"]}
             for i in range(12)]
STS = [{"sentence1": f"句{i}一", "sentence2": f"句{i}二", "score": float(i % 6)} for i in range(20)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [t for r in RETRIEVAL for t in (r["query"], *r["pos"], *r["neg"])]
    texts += [t for r in STS for t in (r["sentence1"], r["sentence2"])]
    return save_tokenizer(build_char_vocab(texts), tmp_path_factory.mktemp("tok"))


def _data(tokenizer, mode):
    dm = MultiTaskDataModule({
        "retrieval": ContrastiveDataModule([lambda: RETRIEVAL], batch_size=4, train_group_size=5),
        "sts": StsDataModule([lambda: STS], batch_size=4)}, mode=mode, seed=3)
    dm.attach_tokenizer(tokenizer)
    dm.setup()
    return dm


def test_every_cbb_step_holds_every_task(tokenizer):
    dm = _data(tokenizer, "cbb")
    loader = dm.train_dataloader()
    batches = [b for b, _, _ in iter(loader)]   # CombinedLoader yields (batch, index, loader index)
    assert len(batches) == 5                                   # max(12/4, 20/4) batches
    assert all(set(b) == {"retrieval", "sts"} for b in batches)
    assert all(b["retrieval"]["query"]["input_ids"].shape[0] == 4 for b in batches)
    assert all(b["sts"]["labels"].shape[0] == 4 for b in batches)


def test_sequential_steps_hold_one_task_and_an_epoch_covers_each_once(tokenizer):
    dm = _data(tokenizer, "sequential")
    loader = dm.train_dataloader()
    first, second = [list(b) for b in loader], [list(b) for b in loader]
    assert all(len(b) == 1 for b in first) and len(first) == len(loader) == 3 + 5
    assert sum(b == ["retrieval"] for b in first) == 3 and sum(b == ["sts"] for b in first) == 5
    assert first != second                                     # a new task order every epoch


def _first_batch(tokenizer):
    batch, _, _ = next(iter(_data(tokenizer, "cbb").train_dataloader()))
    return batch


def _module(tokenizer, **kw):
    torch.manual_seed(0)
    encoder = tiny_zh_encoder(tokenizer, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                              dropout=0.0)
    tasks = {"retrieval": functools.partial(InfoNCE, temperature=0.05),
             "sts": functools.partial(CoSENT, scale=20.0)}
    return MultiTask(encoder, tasks, **kw)


def _pooled_by_hand(q, groups, tau):
    """Conan Eq. 3 written out: query i's softmax over [every positive once, every negative of
    every query and shard]; the target is its own positive, column i."""
    b, g, d = groups.shape
    candidates = torch.cat([groups[:, 0], groups[:, 1:].reshape(-1, d)])    # (B + B·(G−1), D)
    log_p = torch.log_softmax(q @ candidates.T / tau, dim=-1)
    return -log_p[torch.arange(b), torch.arange(b)].mean()


def _shard_mean_by_hand(q, groups, tau, k):
    """The `mean` pooling written out: shard s's softmax holds the positives and shard s's negatives."""
    b, g, d = groups.shape
    n = (g - 1) // k
    losses = []
    for s in range(k):
        candidates = torch.cat([groups[:, 0], groups[:, 1 + s * n:1 + (s + 1) * n].reshape(-1, d)])
        log_p = torch.log_softmax(q @ candidates.T / tau, dim=-1)
        losses.append(-log_p[torch.arange(b), torch.arange(b)].mean())
    return sum(losses) / k


def test_the_cbb_loss_is_retrieval_plus_beta_cosent_and_a_sequential_step_is_plain(tokenizer):
    # Conan Eq. 3: L_CBB = L_retrieval + 0.8·L_cos by default. An exactness claim: in float64,
    # equal to rounding (tests/_numerics.py).
    module = _module(tokenizer).double()
    assert module.loss.weights == {"retrieval": 1.0, "sts": 0.8}
    batch = _first_batch(tokenizer)
    total = module.loss_from_embeddings(module.embed(batch), batch)
    enc = module.encoder
    q, p = enc(**batch["retrieval"]["query"]), enc(**batch["retrieval"]["passages"])
    u, v = enc(**batch["sts"]["sentence1"]), enc(**batch["sts"]["sentence2"])
    retrieval = _pooled_by_hand(q, p.view(q.shape[0], 5, -1), 0.05)
    cos = cosent_loss(u, v, batch["sts"]["labels"], 20.0)
    assert total.dtype == torch.float64
    assert float(total) == pytest.approx(float(retrieval + 0.8 * cos), rel=RTOL64)
    # a sequential step (Conan's Vanilla) holds one task: its plain loss, no β
    for name, alone in (("sts", cos), ("retrieval", retrieval)):
        only = {name: batch[name]}
        assert float(module.loss_from_embeddings(module.embed(only), only)) == pytest.approx(
            float(alone), rel=RTOL64)
    # weights given explicitly replace the default; a task left out weighs 1
    module = _module(tokenizer, weights={"retrieval": 2.0}).double()   # the same seeded encoder
    total = module.loss_from_embeddings(module.embed(batch), batch)
    assert float(total) == pytest.approx(float(2 * retrieval + cos), rel=RTOL64)


def test_the_yaml_default_is_conans_eq3(tokenizer):
    from helpers import compose

    cfg = compose(["objective=multitask", "data=multitask"]).objective
    assert dict(cfg.weights) == {"retrieval": 1.0, "sts": 0.8}
    assert cfg.retrieval_pooling == "pooled" and cfg.retrieval_shards == 1
    assert cfg.retrieval_ranks_share_queries is False


def test_pooled_shards_put_every_negative_in_one_softmax_and_count_positives_once(tokenizer):
    torch.manual_seed(0)
    q = F.normalize(torch.randn(3, 8, dtype=torch.float64), dim=-1)   # float64: as above
    p = F.normalize(torch.randn(3 * 5, 8, dtype=torch.float64), dim=-1)   # per query: pos + 2·2 negatives
    g = p.view(3, 5, 8)
    module = MultiTaskLoss({"retrieval": InfoNCELoss(temperature=0.05)}, retrieval_shards=2)
    assert module.retrieval_pooling == "pooled"
    got = module.task_loss("retrieval", {"query": q, "passages": p}, None)
    expected = _pooled_by_hand(q, g, 0.05)
    assert float(got) == pytest.approx(float(expected), rel=RTOL64)
    # the pool is not the shard mean, nor a softmax that repeats the shared positive per shard
    assert abs(float(expected) - float(_shard_mean_by_hand(q, g, 0.05, 2))) > 1e-3
    repeated = torch.cat([g[:, 0], g[:, 0], g[:, 1:].reshape(-1, 8)])
    twice = -torch.log_softmax(q @ repeated.T / 0.05, -1)[torch.arange(3), torch.arange(3)].mean()
    assert abs(float(expected) - float(twice)) > 1e-3
    # through MultiTask on a real batch, 1 + 2·2 passages per query (train_group_size=5)
    module = _module(tokenizer, retrieval_shards=2).double()
    batch = {"retrieval": _first_batch(tokenizer)["retrieval"]}
    enc = module.encoder
    qe, pe = enc(**batch["retrieval"]["query"]), enc(**batch["retrieval"]["passages"])
    assert float(module.loss_from_embeddings(module.embed(batch), batch)) == pytest.approx(
        float(_pooled_by_hand(qe, pe.view(qe.shape[0], 5, -1), 0.05)), rel=RTOL64)


def test_mean_pooling_keeps_the_per_shard_infonce_mean():
    torch.manual_seed(0)
    q = F.normalize(torch.randn(3, 8, dtype=torch.float64), dim=-1)
    p = F.normalize(torch.randn(3 * 5, 8, dtype=torch.float64), dim=-1)
    module = MultiTaskLoss({"retrieval": InfoNCELoss(temperature=0.05)}, retrieval_shards=2,
                           retrieval_pooling="mean")
    got = module.task_loss("retrieval", {"query": q, "passages": p}, None)
    g = p.view(3, 5, 8)
    assert float(got) == pytest.approx(float(_shard_mean_by_hand(q, g, 0.05, 2)), rel=RTOL64)
    # the value the shard mean had before `retrieval_pooling` existed, through info_nce_loss
    shard0 = torch.cat([g[:, :1], g[:, 1:3]], 1).reshape(-1, 8)   # pos, neg1, neg2
    shard1 = torch.cat([g[:, :1], g[:, 3:5]], 1).reshape(-1, 8)   # pos, neg3, neg4
    expected = (info_nce_loss(q, shard0, 0.05) + info_nce_loss(q, shard1, 0.05)) / 2
    assert float(got) == pytest.approx(float(expected), rel=RTOL64)


@pytest.mark.parametrize("pooling", ["pooled", "mean"])
def test_a_group_that_does_not_split_into_shards_is_an_error(pooling):
    q = F.normalize(torch.randn(3, 8), dim=-1)
    module = MultiTaskLoss({"retrieval": InfoNCELoss(temperature=0.05)}, retrieval_shards=3,
                           retrieval_pooling=pooling)
    with pytest.raises(ValueError, match=r"train_group_size.*1 \+ 3·n"):   # 4 negatives, 3 shards
        module.task_loss("retrieval", {"query": q, "passages": torch.randn(3 * 5, 8)}, None)
    with pytest.raises(ValueError, match="train_group_size"):              # no negatives to shard
        module.task_loss("retrieval", {"query": q, "passages": torch.randn(3, 8)}, None)
    with pytest.raises(ValueError, match="passages do not split"):
        module.task_loss("retrieval", {"query": q, "passages": torch.randn(7, 8)}, None)


def test_bad_settings_are_errors_naming_the_setting():
    tasks = lambda **kw: {"retrieval": InfoNCELoss(temperature=0.05, **kw)}   # noqa: E731
    with pytest.raises(ValueError, match="retrieval_pooling must be one of"):
        MultiTaskLoss(tasks(), retrieval_pooling="sum")
    with pytest.raises(ValueError, match="retrieval_shards"):
        MultiTaskLoss(tasks(), retrieval_shards=0)
    with pytest.raises(ValueError, match="weights name unknown tasks"):
        MultiTaskLoss(tasks(), weights={"cls": 1.0})
    with pytest.raises(ValueError, match="finite and >= 0"):
        MultiTaskLoss(tasks(), weights={"retrieval": -1.0})
    # sharing ranks gathers the negatives itself: the task's own cross-device gather would repeat
    # every shared positive once per rank
    with pytest.raises(ValueError, match="tasks.retrieval.negatives_cross_device=false"):
        MultiTaskLoss(tasks(negatives_cross_device=True), retrieval_ranks_share_queries=True)


def test_the_shared_query_check_ignores_padding_and_sees_order():
    from embedkit.objectives.multitask import fingerprint

    a = {"input_ids": torch.tensor([[5, 6, 7], [8, 9, 0]]), "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]])}
    padded = {k: F.pad(v, (0, 2)) for k, v in a.items()}
    swapped = {k: v.flip(0) for k, v in a.items()}
    other = {"input_ids": torch.tensor([[5, 7, 6], [8, 9, 0]]), "attention_mask": a["attention_mask"]}
    assert torch.equal(fingerprint(a), fingerprint(padded))
    assert not torch.equal(fingerprint(a), fingerprint(swapped))
    assert not torch.equal(fingerprint(a), fingerprint(other))
    assert torch.equal(fingerprint(a, slice(None, None, 2)), fingerprint({k: v[:1] for k, v in a.items()}))


def test_mrl_wraps_every_task_and_evaluates_the_chosen_widths(tokenizer):
    module = _module(tokenizer, mrl_dims=[16, 32], eval_dims=[32])
    assert list(module.eval_targets()) == ["dim=32"]
    batch = _first_batch(tokenizer)
    assert np.isfinite(float(module.loss_from_embeddings(module.embed(batch), batch)))


def test_sequential_curves_hold_a_task_loss_only_on_the_steps_that_trained_it(tokenizer, tmp_path):
    # Lightning re-emits an on-step metric's last value on steps that did not log it; the untrained
    # task must read NaN there, or the per-task curves (Conan Figure 5) show stale points.
    import csv

    import pytorch_lightning as pl
    from pytorch_lightning.loggers import CSVLogger

    module = _module(tokenizer)
    trainer = pl.Trainer(max_steps=8, log_every_n_steps=1, logger=CSVLogger(str(tmp_path)),
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, datamodule=_data(tokenizer, "sequential"))
    (metrics,) = tmp_path.glob("lightning_logs/version_*/metrics.csv")
    rows = [r for r in csv.DictReader(open(metrics)) if r.get("train/tasks_in_step")]
    assert len(rows) == 8
    for r in rows:
        finite = [k for k in ("train/loss_retrieval", "train/loss_sts") if np.isfinite(float(r[k]))]
        assert len(finite) == 1 and float(r["train/loss"]) == float(r[finite[0]])
