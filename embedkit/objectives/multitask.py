"""Multi-task fine-tuning: one encoder, one loss per task, weighted and summed (Conan's CBB loss).

`MultiTaskLoss` holds one loss part per task (formula, paper, arguments, batch: its docstring);
`MultiTask` trains it as a LightningModule with the shared optimisation of
embedkit/objectives/base.py: one optimiser over the shared encoder. The tasks are the task
objectives' *loss parts*, never nested LightningModules; the shared settings (lr, optimizer,
scheduler, warm-up, on_nonfinite_loss) are the wrapper's: a task objective given with a different
value is an error, and one the wrapper leaves unset is taken from the tasks (which must then agree;
conf/objective/multitask.yaml makes the tasks follow the wrapper's).

Under CBB every step holds every task, and the loss is Conan's Eq. 3, L_CBB = L_retrieval +
β·L_cos with β = 0.8 (the `weights`): one InfoNCE whose denominator pools the negatives of all the
retrieval GPUs, which share queries and positives but carry different negatives (Conan §3.4,
Figure 4), plus CoSENT on the STS task's larger batch. Under sequential random-task training
(Conan's "Vanilla": standard contrastive and CoSENT fine-tuning) a step holds one task and the loss
is that task's plain loss: the weights balance tasks *within* a step, and on a one-task step a
weight would only rescale that task's gradient, which Vanilla does not do.

Shards (`retrieval_shards = K`, one device emulating K GPUs): a retrieval group of 1 + K·n
passages holds the shared positive and K shards of n negatives. `retrieval_pooling="pooled"`
(Eq. 3) scores each query against its positive, all K·n of its negatives and, in-batch, every
other query's positive and negatives; every positive is counted once, so on one device this is
the task loss over the whole 1 + K·n group, and K only checks that the group splits.
`retrieval_pooling="mean"` is the average of K separate InfoNCEs, shard k's softmax holding the
positives and only shard k's negatives (no softmax ever holds more than n hard negatives per
query): kept for comparison. The group size comes from the tensors' shapes; the data sets it
(`data.tasks.retrieval.train_group_size`).

Real DDP: each rank trains its own slice of every task's batch (embedkit/data/batching.py's
GroupBatchSampler), so ranks do not share queries, and Conan's layout is emulated per rank with
`retrieval_shards`. `retrieval_ranks_share_queries=True` is the loss side of the real layout, for
data that gives every rank the same queries and positives with its own negatives (not built by
embedkit/data yet; each step checks that the ranks' query and positive tokens agree, and raises
otherwise): under "pooled" every rank's negatives are all-gathered with gradient
(embedkit/objectives/cross_device.py) into one denominator, so every rank computes the same loss
and DDP's average of the ranks' gradients equals one process's gradient on the pooled group of
1 + W·K·n (tests/test_distributed.py); under "mean" each rank's own loss is its shard's and DDP's
average is the mean over shards, with nothing to gather.

`mrl_dims` wraps every task's loss in Matryoshka (embedkit/objectives/matryoshka.py), as the
full Conan recipe trains MRL; evaluation then reports the widths in `eval_dims` (all by default).
GradCache is not offered (a step's batch is {task: batch}, not tokenised columns).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from embedkit.models.encoder import TextEncoder
from embedkit.objectives.base import EmbeddingLoss, EmbeddingObjective, build_loss
from embedkit.objectives.cross_device import gather_rows, same_on_every_rank, world
from embedkit.objectives.matryoshka import MatryoshkaLoss, TruncatedEncoder

POOLINGS = ("pooled", "mean")
# Conan-Embedding (arXiv:2408.15710) Eq. 3: L_CBB = L_retrieval + β·L_cos, β = 0.8.
CBB_WEIGHTS = {"retrieval": 1.0, "sts": 0.8}


class MultiTaskLoss(EmbeddingLoss):
    """The weighted sum of the task losses a step holds (Conan's CBB loss, Eq. 3).

    Formula:
        With batches {task: batch} (embedkit/data/multitask.py), a step holding several tasks:

            L = Σ_t w_t · L_t        (Conan: L_CBB = L_retrieval + 0.8 · L_cos)

        and a step holding one task t (sequential training): L = L_t, unweighted.

        L_cos = CoSENT(u, v, y) (`CoSENTLoss`). L_retrieval, for B queries q_i, each with a group
        [p_i⁺, its negatives n_i1 .. n_iM] (M = K·n: K shards of n), L2-normalised, temperature τ:

          pooled:  L = −(1/B) Σ_i log( e^{q_i·p_i⁺/τ} / Σ_{c ∈ C} e^{q_i·c/τ} ),
                   C = {p_j⁺ : j < B} ∪ {n_jm : j < B, m ≤ M}  (each positive once)

          mean:    L = (1/K) Σ_k InfoNCE(q, [p⁺, negatives of shard k])

        With `retrieval_ranks_share_queries` under DDP with W ranks, C also holds every other
        rank's negatives (M = W·K·n). The per-task losses are the task losses' own (`InfoNCELoss`,
        or any task loss taking {query, passages}; pooled calls it on the pooled group).

    Paper:
        Conan-Embedding (Li et al. 2024, arXiv:2408.15710), §3.4 (cross-GPU batch balance, CBB,
        Eq. 3: one denominator over all retrieval GPUs' negatives, β = 0.8) and §4 (Table 3: CBB
        against sequential random-task training, "Vanilla").

    Arguments (paper defaults):
        tasks: {name: the task's loss}: an EmbeddingLoss, an objective class or a partial of one
            (Hydra's `_partial_: true`), or a config with a `_target_`; built around the same
            encoder. Conan: retrieval (InfoNCE) and STS (CoSENT).
        weights: {task: w}, applied on steps holding several tasks; a task left out weighs 1.
            None = Conan's Eq. 3: retrieval 1, sts β = 0.8 (`CBB_WEIGHTS`), any other task 1.
        retrieval_shards: K, the GPUs emulated on one device (1 = plain InfoNCE).
        retrieval_pooling: how the shards' negatives combine: "pooled" (Eq. 3, one softmax over
            all of them) or "mean" (the mean of K per-shard InfoNCEs).
        retrieval_ranks_share_queries: False (embedkit/data gives each DDP rank its own queries);
            True for data that gives every rank the same queries and positives with its own
            negatives (Conan's retrieval GPUs), the module docstring says what it does.
        mrl_dims: None, or widths at which every task's loss is trained under Matryoshka (Conan
            trains MRL at 256 .. 1792).
        eval_dims: the widths to evaluate when mrl_dims is set; None = all.
        encoder: the encoder, to build the tasks around and check the widths against.

    Batch:
        {task name: that task's batch} (`embedkit.data.multitask.MultiTaskDataModule`): every task
        under CBB, one under sequential training.
    """

    def __init__(self, tasks: Mapping[str, Any], weights: Mapping[str, float] | None = None,
                 retrieval_shards: int = 1, retrieval_pooling: str = "pooled",
                 retrieval_ranks_share_queries: bool = False, mrl_dims: Sequence[int] | None = None,
                 eval_dims: Sequence[int] | None = None, encoder: TextEncoder | None = None):
        super().__init__()
        if not tasks:
            raise ValueError("MultiTask needs at least one task objective")
        if retrieval_shards < 1:
            raise ValueError(f"retrieval_shards must be >= 1, got {retrieval_shards}")
        if retrieval_pooling not in POOLINGS:
            raise ValueError(f"retrieval_pooling must be one of {POOLINGS}, got {retrieval_pooling!r}")
        built = {}
        for name, spec in tasks.items():
            built[name], settings = build_loss(spec, encoder)
            if settings:
                self.inner_settings[f"tasks.{name}"] = settings
        if retrieval_ranks_share_queries:
            for name, loss in built.items():
                if any(getattr(part, "negatives_cross_device", False) for part in loss.modules()):
                    # its gather would take every rank's passages, the shared positives included,
                    # so each positive would sit W times in the denominator
                    raise ValueError(f"retrieval_ranks_share_queries=true gathers the negatives itself: "
                                     f"set tasks.{name}.negatives_cross_device=false")
        if mrl_dims:
            built = {name: MatryoshkaLoss(loss, dims=mrl_dims, encoder=encoder)
                     for name, loss in built.items()}
        self.tasks = torch.nn.ModuleDict(built)
        if weights is None:
            weights = {name: w for name, w in CBB_WEIGHTS.items() if name in built}
        unknown = set(weights) - set(built)
        if unknown:
            raise ValueError(f"weights name unknown tasks {sorted(unknown)}; tasks: {list(built)}")
        self.weights = {name: float(weights.get(name, 1.0)) for name in built}
        bad = {name: w for name, w in self.weights.items() if not 0 <= w < float("inf")}
        if bad:
            raise ValueError(f"weights must be finite and >= 0, got {bad}")
        self.retrieval_shards = retrieval_shards
        self.retrieval_pooling = retrieval_pooling
        self.retrieval_ranks_share_queries = bool(retrieval_ranks_share_queries)
        self.mrl_dims = list(mrl_dims) if mrl_dims else None
        self.eval_dims = list(eval_dims) if eval_dims else None
        self._task_losses: dict[str, torch.Tensor] = {}

    def _tasks_in(self, batch) -> list[str]:
        present = [name for name in batch if name in self.tasks]
        if not present:
            raise KeyError(f"the batch holds none of the tasks {list(self.tasks)} (got {list(batch)})")
        return present

    def embed(self, encoder, batch) -> dict[str, dict[str, torch.Tensor]]:
        return {name: self.tasks[name].embed(encoder, batch[name]) for name in self._tasks_in(batch)}

    def task_loss(self, name: str, embeddings: dict, batch) -> torch.Tensor:
        """Task `name`'s loss; a retrieval task's ({query, passages}) follows the shard settings."""
        loss, k = self.tasks[name], self.retrieval_shards
        shared = self.retrieval_ranks_share_queries and world()[1] > 1
        if "passages" not in embeddings or (k == 1 and not shared):
            return loss(embeddings, batch)
        q, p = embeddings["query"], embeddings["passages"]
        if p.shape[0] % q.shape[0]:
            raise ValueError(f"{p.shape[0]} {name} passages do not split into groups for "
                             f"{q.shape[0]} queries")
        groups = p.view(q.shape[0], -1, p.shape[-1])
        negatives = groups.shape[1] - 1
        if negatives % k or (k > 1 and not negatives):
            raise ValueError(f"{negatives} negatives per query do not split into {k} retrieval shards; "
                             f"set the {name} data's train_group_size (data.tasks.{name}."
                             f"train_group_size) to 1 + {k}·n with n >= 1")
        if shared:
            self._check_shared(name, batch, groups.shape[1])
        if self.retrieval_pooling == "mean":
            n = negatives // k
            losses = []
            for s in range(k):
                shard = torch.cat([groups[:, :1], groups[:, 1 + s * n:1 + (s + 1) * n]], dim=1)
                losses.append(loss({**embeddings, "passages": shard.reshape(-1, p.shape[-1])}, batch))
            return torch.stack(losses).mean()
        if shared and negatives:
            if set(embeddings) != {"query", "passages"}:
                raise ValueError(f"retrieval_ranks_share_queries pools passage embeddings only; the "
                                 f"{name} loss also embeds {sorted(set(embeddings) - {'query', 'passages'})}")
            return loss({**embeddings, "passages": pool_across_ranks(groups)}, batch)
        # One device: the whole group is the pool (each positive once, every shard's negatives).
        return loss(embeddings, batch)

    def _check_shared(self, name: str, batch, group_size: int) -> None:
        try:
            query, passages = batch["query"], batch["passages"]
            mark = torch.cat([fingerprint(query), fingerprint(passages, slice(None, None, group_size))])
        except (KeyError, TypeError) as e:
            raise ValueError(f"retrieval_ranks_share_queries checks the {name} batch's query and "
                             f"passage tokens, which the batch does not hold ({e!r})") from e
        if not same_on_every_rank(mark):
            raise ValueError(
                f"retrieval_ranks_share_queries=true, but the DDP ranks' {name} queries or positives "
                f"differ: the {name} data must give every rank the same queries and positives, each "
                f"rank its own negatives (embedkit/data's GroupBatchSampler gives each rank its own "
                f"slice of the batch instead); else set objective.retrieval_ranks_share_queries=false")

    def forward(self, embeddings, batch) -> torch.Tensor:
        # Weights balance the tasks summed in one step (Eq. 3); a one-task step (sequential,
        # Conan's Vanilla) is that task's plain loss.
        weighted = len(embeddings) > 1
        total, self._task_losses = 0.0, {}
        for name, emb in embeddings.items():
            loss = self.task_loss(name, emb, batch[name])
            self._task_losses[name] = loss.detach()
            total = total + (self.weights[name] if weighted else 1.0) * loss
        return total

    def batch_size_of(self, batch) -> int:
        name = self._tasks_in(batch)[0]
        return self.tasks[name].batch_size_of(batch[name])

    def diagnostics(self, embeddings, batch) -> dict[str, Any]:
        # One curve per task (Conan Figure 5). Under sequential training a step trains one task;
        # the others log NaN ("no value at this step"), because Lightning would otherwise write
        # their last value again on every step and the curves would show stale points.
        out: dict[str, Any] = {f"loss_{name}": self._task_losses.get(name, float("nan"))
                               for name in self.tasks}
        out["tasks_in_step"] = float(len(self._task_losses))
        return out

    def eval_targets(self, encoder) -> dict[str, dict]:
        if not self.mrl_dims:
            return {"": {"encoder": encoder}}
        cache: dict = {}
        return {f"dim={d}": {"encoder": TruncatedEncoder(encoder, d, cache)}
                for d in (self.eval_dims or self.mrl_dims)}

    def save_extras(self, out_dir) -> None:
        for loss in self.tasks.values():
            loss.save_extras(out_dir)

    def load_extras(self, out_dir) -> None:
        for loss in self.tasks.values():
            loss.load_extras(out_dir)


def pool_across_ranks(groups: torch.Tensor) -> torch.Tensor:
    """groups (B, 1 + M, D), this rank's [p⁺, M negatives] per query, the positives equal on every
    rank: (B·(1 + W·M), D), query i's group [p_i⁺, every rank's M negatives of query i (rank
    order)]. The negatives are all-gathered with gradient, the positives taken once (local)."""
    b, g, d = groups.shape
    negatives, _ = gather_rows(groups[:, 1:].reshape(-1, d))
    w = negatives.shape[0] // (b * (g - 1))
    negatives = negatives.view(w, b, g - 1, d).transpose(0, 1).reshape(b, w * (g - 1), d)
    return torch.cat([groups[:, :1], negatives], dim=1).reshape(-1, d)


def fingerprint(tokens: Mapping[str, torch.Tensor], rows: slice = slice(None)) -> torch.Tensor:
    """Four int64 sums that tell apart two token batches (padding ignored, row order counted):
    rows, and Σ_i i·len_i, Σ_i i·Σ_t id_it, Σ_i i·Σ_t t·id_it over 1-based rows i, positions t."""
    ids, mask = tokens["input_ids"][rows].long(), tokens["attention_mask"][rows].long()
    kept = ids * mask
    row = torch.arange(1, ids.shape[0] + 1, device=ids.device)
    pos = torch.arange(1, ids.shape[1] + 1, device=ids.device)
    return torch.stack([torch.tensor(ids.shape[0], device=ids.device), (row * mask.sum(1)).sum(),
                        (row * kept.sum(1)).sum(), (row * (kept * pos).sum(1)).sum()])


class MultiTask(EmbeddingObjective):
    """MultiTaskLoss as a LightningModule: `MultiTask(encoder, tasks, <MultiTaskLoss's other
    arguments>, <the shared settings of EmbeddingObjective>)`."""

    loss_class = MultiTaskLoss
    embedding_width_args = ("mrl_dims", "eval_dims")
