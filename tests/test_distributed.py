"""Two CPU ranks (Lightning ddp_spawn, gloo) against one process with the full batch.

- Cross-device negatives: the ranks' gradients are equal, and equal to one process's gradient on
  the whole batch; the mean of the ranks' losses is that process's loss.
- GradCache under DDP (the trap of reference §A.8-5): replays go through the DDP reducer and only
  the last chunk synchronises; the ranks' gradients are equal and equal the single-process ones,
  with and without cross-device negatives, for InfoNCE, CoSENT, Matryoshka and M3, and DDP synchronises exactly one
  backward per step (syncing every replay gives the same gradient at several times the traffic,
  sentence-transformers #4027).
- Conan's CBB layout (MultiTask's retrieval_ranks_share_queries): ranks with the same queries and
  positives and their own negatives train as one process on the pooled group.

Both sides run in float64 (Lightning's 64-true precision, the reference `.double()`): the claims
are exact, so they are checked to float64 rounding (tests/_numerics.py).
"""

import json

import pytest
import torch
from pytorch_lightning.callbacks import Callback

from embedkit.models.vocab import build_char_vocab, save_tokenizer
from embedkit.objectives.cosent import CoSENT
from embedkit.objectives.infonce import InfoNCE, InfoNCELoss
from embedkit.objectives.m3 import M3
from embedkit.objectives.matryoshka import Matryoshka

from _numerics import RTOL64, assert_close_scaled, scale_of
from helpers import PASSAGES, QUERIES, tokens
from helpers import toy_encoder as encoder

pytestmark = pytest.mark.slow   # each case spawns two processes (~10-20 s on 2 shared cores)

WORLD, PER_RANK, GROUP = 2, 3, 2


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return save_tokenizer(build_char_vocab(QUERIES + PASSAGES), tmp_path_factory.mktemp("ddptok"))


def rank_slice(batch, rank):
    if "labels" in batch:   # scored pairs (CoSENT): each rank takes its own pairs
        rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        return {"sentence1": {k: v[rows] for k, v in batch["sentence1"].items()},
                "sentence2": {k: v[rows] for k, v in batch["sentence2"].items()},
                "labels": batch["labels"][rows]}
    q, p = slice(rank * PER_RANK, (rank + 1) * PER_RANK), slice(rank * PER_RANK * GROUP, (rank + 1) * PER_RANK * GROUP)
    return {"query": {k: v[q] for k, v in batch["query"].items()},
            "passages": {k: v[p] for k, v in batch["passages"].items()}}


class _RankBatch(torch.utils.data.Dataset):
    """One global batch; each rank reads its own slice (as GroupBatchSampler slices global batches)."""

    def __init__(self, batch):
        self.batch = batch

    def __len__(self):
        return 1

    def __getitem__(self, i):
        return rank_slice(self.batch, torch.distributed.get_rank())


def _counting_allreduce(state, bucket):
    """DDP's default all-reduce, counting the synchronised backward passes (bucket 0 of each)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    if bucket.index() == 0:
        state["synced_backwards"] += 1
    return allreduce_hook(None, bucket)


class _Recorder(Callback):
    """Writes this rank's gradients (after DDP's all-reduce, before the step), its loss, and how
    many backward passes DDP synchronised in the step."""

    def __init__(self, out_dir):
        self.out_dir = str(out_dir)
        self.state = {"synced_backwards": 0}

    def on_train_start(self, trainer, pl_module):
        trainer.strategy.model.register_comm_hook(self.state, _counting_allreduce)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}
        torch.save(grads, f"{self.out_dir}/grads{trainer.global_rank}.pt")
        with open(f"{self.out_dir}/syncs{trainer.global_rank}.json", "w") as f:
            json.dump(self.state["synced_backwards"], f)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        with open(f"{self.out_dir}/loss{trainer.global_rank}.json", "w") as f:
            json.dump(float(loss), f)


def _run_ddp(module, batch, out_dir, dataset=None):
    import pytorch_lightning as pl

    cfg = dict(accelerator="cpu", devices=WORLD, strategy="ddp_spawn", max_steps=1, precision="64-true",
               gradient_clip_val=None, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
               default_root_dir=str(out_dir), num_sanity_val_steps=0, limit_val_batches=0)
    trainer = pl.Trainer(**{**cfg, **module.trainer_overrides(cfg)}, callbacks=[_Recorder(out_dir)])
    loader = torch.utils.data.DataLoader(dataset or _RankBatch(batch), batch_size=None)
    trainer.fit(module, train_dataloaders=loader)
    grads = [torch.load(out_dir / f"grads{r}.pt") for r in range(WORLD)]
    losses = [json.loads((out_dir / f"loss{r}.json").read_text()) for r in range(WORLD)]
    syncs = [json.loads((out_dir / f"syncs{r}.json").read_text()) for r in range(WORLD)]
    return grads, losses, syncs


def _reference(module, batches):
    """One process: the mean over `batches` of the plain loss, and its parameter gradients."""
    module.zero_grad(set_to_none=True)
    losses = [module.loss_from_embeddings(module.embed(b), b) for b in batches]
    total = torch.stack(losses).mean()
    total.backward()
    return [x.item() for x in losses], {n: p.grad.clone() for n, p in module.named_parameters()
                                        if p.grad is not None}


CASES = {
    # name: (build(encoder, mini_batch) -> module, cross-device?, mini_batch)
    "infonce_cross_device": (lambda enc, mb: InfoNCE(enc, temperature=0.05,
                                                     negatives_cross_device=True,
                                                     grad_cache={"mini_batch": mb}), True, None),
    "infonce_cross_device_gradcache": (lambda enc, mb: InfoNCE(enc, temperature=0.05,
                                                               negatives_cross_device=True,
                                                               grad_cache={"mini_batch": mb}), True, 2),
    "infonce_gradcache": (lambda enc, mb: InfoNCE(enc, temperature=0.05,
                                                  grad_cache={"mini_batch": mb}), False, 1),
    "cosent_gradcache": (lambda enc, mb: CoSENT(enc, grad_cache={"mini_batch": mb}), False, 2),
    "matryoshka_gradcache": (lambda enc, mb: Matryoshka(enc, inner=InfoNCELoss(temperature=0.05),
                                                        dims=[8, 16, 32], grad_cache={"mini_batch": mb}),
                             False, 2),
    "m3_gradcache": (lambda enc, mb: M3(enc, grad_cache={"mini_batch": mb}),
                     False, 2),
    "m3_cross_device_gradcache": (lambda enc, mb: M3(enc, negatives_cross_device=True,
                                                     grad_cache={"mini_batch": mb}), "m3", 2),
}


def _m3_cross_device_reference(module, batch):
    """Per rank, M3's local loss with L_dense swapped for the cross-entropy against every rank's
    passages: with self-distillation and 3 heads, loss = (L + L')/2 and L = (Σ λ_h L_h + L_inter)/4,
    so the swap adds λ_dense·(L_cross − L_dense_local)/8. Returns the ranks' losses and the
    gradients of their mean."""
    import torch.nn.functional as F

    module.zero_grad(set_to_none=True)
    all_p = module.embed(batch)["passages"]
    losses = []
    for r in range(WORLD):
        part = rank_slice(batch, r)
        emb = module.embed(part)
        q, p = emb["query"], emb["passages"]
        rows = torch.arange(PER_RANK)
        local_dense = F.cross_entropy(q @ p.T / module.loss.temperature, rows * GROUP)
        cross = F.cross_entropy(q @ all_p.T / module.loss.temperature, (r * PER_RANK + rows) * GROUP)
        swap = module.loss.loss_weights["dense"] * (cross - local_dense) / 8
        losses.append(module.loss_from_embeddings(emb, part) + swap)
    torch.stack(losses).mean().backward()
    return [x.item() for x in losses], {n: p.grad.clone() for n, p in module.named_parameters()
                                        if p.grad is not None}


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_equal_one_process(tok, tmp_path, monkeypatch, case):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    build, cross_device, mini_batch = CASES[case]
    n = WORLD * PER_RANK
    if case.startswith("cosent"):
        batch = {"sentence1": tokens(tok, QUERIES[:n]), "sentence2": tokens(tok, PASSAGES[:n]),
                 "labels": torch.tensor([5.0, 4.0, 1.0, 3.0, 0.0, 2.0])}
    else:
        batch = {"query": tokens(tok, QUERIES[:n]), "passages": tokens(tok, PASSAGES[:n * GROUP])}

    reference = build(encoder(tok), None).double()
    reference.loss.negatives_cross_device = False   # one process: the full batch is the whole pool
    if cross_device == "m3":
        ref_losses, ref_grads = _m3_cross_device_reference(reference, batch)
        ref_loss = sum(ref_losses) / WORLD
    elif cross_device:
        ref_losses, ref_grads = _reference(reference, [batch])
        ref_loss = ref_losses[0]
    else:   # each rank's own in-batch loss; DDP averages their gradients
        ref_losses, ref_grads = _reference(reference, [rank_slice(batch, r) for r in range(WORLD)])
        ref_loss = sum(ref_losses) / WORLD

    grads, losses, syncs = _run_ddp(build(encoder(tok), mini_batch), batch, tmp_path)
    # One gradient all-reduce per optimiser step, however many chunks GradCache replays.
    assert syncs == [1] * WORLD
    assert sum(losses) / WORLD == pytest.approx(ref_loss, rel=RTOL64)
    if cross_device != True:   # noqa: E712 - per-rank losses are known unless InfoNCE scores globally
        assert losses == pytest.approx(ref_losses, rel=RTOL64)
    assert set(grads[0]) == set(grads[1]) == set(ref_grads)
    assert all(g.dtype == torch.float64 for g in grads[0].values())
    scale = scale_of(ref_grads)   # a gradient ~0 by cancellation is rounded at this size
    for name, g in ref_grads.items():
        assert_close_scaled(grads[1][name], grads[0][name], RTOL64, scale=scale, what=f"rank 1 {name}")
        assert_close_scaled(grads[0][name], g, RTOL64, scale=scale, what=name)


# ---------------------------------------------------------------- Conan's CBB layout across ranks

def _shared_query_batches(tok, differ=False):
    """Conan's retrieval GPUs: every rank the same 3 queries and positives, each its own negative
    per query; each rank its own STS pairs. Returns the ranks' batches and the pooled batch one
    process trains on (query i's group [p_i⁺, rank 0's negative, rank 1's negative]). The rows are
    cut from one padded batch, so padding is the same on both sides."""
    full = tokens(tok, [t for i in range(PER_RANK) for t in (PASSAGES[i], PASSAGES[3 + 2 * i],
                                                             PASSAGES[4 + 2 * i])])
    queries = tokens(tok, QUERIES[:2 * PER_RANK])
    sts = {"sentence1": tokens(tok, QUERIES[:WORLD * PER_RANK]),
           "sentence2": tokens(tok, PASSAGES[:WORLD * PER_RANK]),
           "labels": torch.tensor([5.0, 4.0, 1.0, 3.0, 0.0, 2.0])}
    first = {k: v[:PER_RANK] for k, v in queries.items()}
    ranks = []
    for r in range(WORLD):
        rows = torch.tensor([3 * i + j for i in range(PER_RANK) for j in (0, 1 + r)])
        q = {k: v[PER_RANK:] for k, v in queries.items()} if differ and r == 1 else first
        ranks.append({"retrieval": {"query": q, "passages": {k: v[rows] for k, v in full.items()}},
                      "sts": rank_slice(sts, r)})
    pooled = [{"retrieval": {"query": first, "passages": full}, "sts": rank_slice(sts, r)}
              for r in range(WORLD)]
    return ranks, pooled


class _PerRank(torch.utils.data.Dataset):
    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return 1

    def __getitem__(self, i):
        return self.batches[torch.distributed.get_rank()]


def _cbb(tok, **kw):
    import functools

    from embedkit.objectives.multitask import MultiTask

    return MultiTask(encoder(tok), {"retrieval": functools.partial(InfoNCE, temperature=0.05),
                                    "sts": functools.partial(CoSENT, scale=20.0)}, **kw)


def test_ranks_sharing_queries_pool_every_ranks_negatives_as_one_process(tok, tmp_path, monkeypatch):
    """CBB with retrieval_ranks_share_queries (Conan Eq. 3 across real ranks): every rank's loss is
    L_ret over the pooled group 1 + W·n plus 0.8·its own CoSENT, and DDP's averaged gradient is one
    process's gradient of the mean of those losses."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ranks, pooled = _shared_query_batches(tok)
    reference = _cbb(tok).double()
    ref_losses, ref_grads = _reference(reference, pooled)

    grads, losses, syncs = _run_ddp(_cbb(tok, retrieval_ranks_share_queries=True), None, tmp_path,
                                    dataset=_PerRank(ranks))
    assert syncs == [1] * WORLD
    assert losses == pytest.approx(ref_losses, rel=RTOL64)
    assert set(grads[0]) == set(grads[1]) == set(ref_grads)
    scale = scale_of(ref_grads)
    for name, g in ref_grads.items():
        assert_close_scaled(grads[1][name], grads[0][name], RTOL64, scale=scale, what=f"rank 1 {name}")
        assert_close_scaled(grads[0][name], g, RTOL64, scale=scale, what=name)


def test_ranks_said_to_share_queries_that_do_not_is_an_error(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ranks, _ = _shared_query_batches(tok, differ=True)
    with pytest.raises(Exception, match="queries or positives differ"):
        _run_ddp(_cbb(tok, retrieval_ranks_share_queries=True), None, tmp_path, dataset=_PerRank(ranks))
