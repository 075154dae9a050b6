"""Multi-task fine-tuning: one encoder, one loss per task, summed (Conan-Embedding's CBB loss).

With batches `{task: batch}` (embedkit/data/multitask.py), the step's loss is

    L = Σ_t w_t · L_t,   L_retrieval = (1/K) Σ_k InfoNCE(q, [p⁺, negatives of shard k]),
                         L_sts = CoSENT(u, v, y)

Under CBB every step holds every task, so L sums all of them (Conan §3.4: the retrieval losses
of the GPUs that share queries and positives but carry different negatives, plus the STS loss
computed with a larger batch). Under sequential random-task training a step holds one task and
L is that task's loss alone. The per-task losses reuse the objectives' own `loss_from_embeddings`
(`info_nce_loss`, `cosent_loss`; weights w_t default to 1).

Shards (`retrieval_shards = K`, one device emulating K): a retrieval group of 1 + K·n passages
is split into K groups [p⁺, n negatives]; each shard's InfoNCE sees the same queries and
positives (and the other queries' passages of that shard in-batch) but its own negatives, as
Conan's GPUs do. K = 1 is plain InfoNCE. Under real DDP each rank still trains its own slice of
the batch with all tasks; ranks sharing queries is not implemented.

`mrl_dims` wraps every task's objective in Matryoshka (embedkit/objectives/matryoshka.py), as the
full Conan recipe trains MRL; evaluation then reports the widths in `eval_dims` (all by default).

Optimiser: one AdamW over the shared encoder, with this module's lr / weight decay / warm-up
(null: the first task's).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from embedkit.models.encoder import TextEncoder
from embedkit.objectives.base import EmbeddingObjective
from embedkit.objectives.matryoshka import Matryoshka, TruncatedEncoder, _build_inner


class MultiTask(EmbeddingObjective):
    # Checked against the encoder's width before training (embedkit/recipes/preflight.py).
    embedding_width_args = ("mrl_dims", "eval_dims")

    def __init__(self, encoder: TextEncoder, tasks: Mapping[str, Any],
                 weights: Mapping[str, float] | None = None, retrieval_shards: int = 1,
                 train_group_size: int | None = None, mrl_dims: Sequence[int] | None = None,
                 eval_dims: Sequence[int] | None = None, lr: float | None = None,
                 weight_decay: float | None = None, warmup_ratio: float | None = None,
                 on_nonfinite_loss: str = "error"):
        if not tasks:
            raise ValueError("MultiTask needs at least one task objective")
        built = {name: _build_inner(spec, encoder, {}) for name, spec in tasks.items()}
        first = next(iter(built.values()))
        super().__init__(encoder,
                         lr=first.lr if lr is None else lr,
                         weight_decay=first.weight_decay if weight_decay is None else weight_decay,
                         warmup_ratio=first.warmup_ratio if warmup_ratio is None else warmup_ratio,
                         on_nonfinite_loss=on_nonfinite_loss)
        if retrieval_shards < 1:
            raise ValueError(f"retrieval_shards must be >= 1, got {retrieval_shards}")
        for obj in built.values():
            if train_group_size is not None and hasattr(obj, "train_group_size"):
                obj.train_group_size = train_group_size
        if mrl_dims:
            built = {name: Matryoshka(encoder, inner=obj, dims=mrl_dims) for name, obj in built.items()}
        self.tasks = torch.nn.ModuleDict(built)
        self.weights = {name: float((weights or {}).get(name, 1.0)) for name in built}
        unknown = set(weights or {}) - set(built)
        if unknown:
            raise ValueError(f"weights name unknown tasks {sorted(unknown)}; tasks: {list(built)}")
        self.retrieval_shards = retrieval_shards
        self.train_group_size = train_group_size
        self.mrl_dims = list(mrl_dims) if mrl_dims else None
        self.eval_dims = list(eval_dims) if eval_dims else None
        self._task_losses: dict[str, torch.Tensor] = {}
        self.save_hyperparameters(ignore=["encoder", "tasks"])

    def _tasks_in(self, batch) -> list[str]:
        present = [name for name in batch if name in self.tasks]
        if not present:
            raise KeyError(f"the batch holds none of the tasks {list(self.tasks)} (got {list(batch)})")
        return present

    def embed(self, batch) -> dict[str, dict[str, torch.Tensor]]:
        return {name: self.tasks[name].embed(batch[name]) for name in self._tasks_in(batch)}

    def task_loss(self, name: str, embeddings: dict, batch) -> torch.Tensor:
        objective, k = self.tasks[name], self.retrieval_shards
        if k == 1 or "passages" not in embeddings:
            return objective.loss_from_embeddings(embeddings, batch)
        q, p = embeddings["query"], embeddings["passages"]
        groups = p.view(q.shape[0], -1, p.shape[-1])
        negatives = groups.shape[1] - 1
        if negatives % k:
            raise ValueError(f"{negatives} negatives per query do not split into {k} retrieval shards; "
                             f"set objective.train_group_size = 1 + {k}·n")
        n = negatives // k
        losses = []
        for s in range(k):
            shard = torch.cat([groups[:, :1], groups[:, 1 + s * n:1 + (s + 1) * n]], dim=1)
            losses.append(objective.loss_from_embeddings(
                {**embeddings, "passages": shard.reshape(-1, p.shape[-1])}, batch))
        return torch.stack(losses).mean()

    def loss_from_embeddings(self, embeddings, batch) -> torch.Tensor:
        total, self._task_losses = 0.0, {}
        for name, emb in embeddings.items():
            loss = self.task_loss(name, emb, batch[name])
            self._task_losses[name] = loss.detach()
            total = total + self.weights[name] * loss
        return total

    def batch_size_of(self, batch) -> int:
        name = self._tasks_in(batch)[0]
        return self.tasks[name].batch_size_of(batch[name])

    def log_extras(self, embeddings, batch) -> None:
        # One curve per task (Conan Figure 5). Under sequential training a step trains one task;
        # the others log NaN ("no value at this step"), because Lightning would otherwise write
        # their last value again on every step and the curves would show stale points.
        for name in self.tasks:
            loss = self._task_losses.get(name)
            size = self.tasks[name].batch_size_of(batch[name]) if name in batch else 1
            self.log(f"train/loss_{name}", loss if loss is not None else float("nan"),
                     on_step=True, on_epoch=False, batch_size=size)
        self.log("train/tasks_in_step", float(len(self._task_losses)), on_step=True, on_epoch=False)

    def eval_targets(self) -> dict[str, dict]:
        if not self.mrl_dims:
            return {"": {"encoder": self.encoder}}
        cache: dict = {}
        return {f"dim={d}": {"encoder": TruncatedEncoder(self.encoder, d, cache)}
                for d in (self.eval_dims or self.mrl_dims)}
