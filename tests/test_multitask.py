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


def test_the_cbb_loss_is_the_sum_of_the_task_losses(tokenizer):
    # An exactness claim: in float64, equal to rounding (tests/_numerics.py).
    module = _module(tokenizer, weights={"sts": 0.5}).double()
    batch = _first_batch(tokenizer)
    emb = module.embed(batch)
    total = module.loss_from_embeddings(emb, batch)
    enc = module.encoder
    q, p = enc(**batch["retrieval"]["query"]), enc(**batch["retrieval"]["passages"])
    u, v = enc(**batch["sts"]["sentence1"]), enc(**batch["sts"]["sentence2"])
    expected = info_nce_loss(q, p, 0.05) + 0.5 * cosent_loss(u, v, batch["sts"]["labels"], 20.0)
    assert total.dtype == torch.float64
    assert float(total) == pytest.approx(float(expected), rel=RTOL64)
    # a sequential step holds one task: its loss alone
    only = {"sts": batch["sts"]}
    assert float(module.loss_from_embeddings(module.embed(only), only)) == pytest.approx(
        float(0.5 * cosent_loss(u, v, batch["sts"]["labels"], 20.0)), rel=RTOL64)


def test_retrieval_shards_share_queries_and_positives_with_their_own_negatives():
    torch.manual_seed(0)
    q = F.normalize(torch.randn(3, 8, dtype=torch.float64), dim=-1)   # float64: as above
    p = F.normalize(torch.randn(3 * 5, 8, dtype=torch.float64), dim=-1)   # per query: pos + 4 negatives
    module = MultiTaskLoss({"retrieval": InfoNCELoss(temperature=0.05)}, retrieval_shards=2)
    got = module.task_loss("retrieval", {"query": q, "passages": p}, None)
    g = p.view(3, 5, 8)
    shard0 = torch.cat([g[:, :1], g[:, 1:3]], 1).reshape(-1, 8)   # pos, neg1, neg2
    shard1 = torch.cat([g[:, :1], g[:, 3:5]], 1).reshape(-1, 8)   # pos, neg3, neg4
    expected = (info_nce_loss(q, shard0, 0.05) + info_nce_loss(q, shard1, 0.05)) / 2
    assert float(got) == pytest.approx(float(expected), rel=RTOL64)
    module.retrieval_shards = 3
    with pytest.raises(ValueError, match="shards"):
        module.task_loss("retrieval", {"query": q, "passages": p}, None)


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
