"""Multi-task fine-tuning: one encoder, one loss per task, summed (Conan-Embedding's CBB loss).

`MultiTaskLoss` holds one loss part per task (formula, paper, arguments, batch: its docstring);
`MultiTask` trains it as a LightningModule with the shared optimisation of
embedkit/objectives/base.py: one optimiser over the shared encoder. The tasks are the task
objectives' *loss parts*, never nested LightningModules; the shared settings (lr, optimizer,
scheduler, warm-up, on_nonfinite_loss) are the wrapper's: a task objective given with a different
value is an error, and one the wrapper leaves unset is taken from the tasks (which must then agree;
conf/objective/multitask.yaml makes the tasks follow the wrapper's).

Under CBB every step holds every task, so the loss sums all of them (Conan §3.4: the retrieval
losses of the GPUs that share queries and positives but carry different negatives, plus the STS
loss computed with a larger batch). Under sequential random-task training a step holds one task
and the loss is that task's loss alone.

Shards (`retrieval_shards = K`, one device emulating K): a retrieval group of 1 + K·n passages
is split into K groups [p⁺, n negatives]; each shard's InfoNCE sees the same queries and
positives (and the other queries' passages of that shard in-batch) but its own negatives, as
Conan's GPUs do. K = 1 is plain InfoNCE. The group size comes from the tensors' shapes; the data
sets it (`data.tasks.retrieval.train_group_size`). Under real DDP each rank still trains its own
slice of the batch with all tasks; ranks sharing queries is not implemented.

`mrl_dims` wraps every task's loss in Matryoshka (embedkit/objectives/matryoshka.py), as the
full Conan recipe trains MRL; evaluation then reports the widths in `eval_dims` (all by default).
GradCache is not offered (a step's batch is {task: batch}, not tokenised columns).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from embedkit.models.encoder import TextEncoder
from embedkit.objectives.base import EmbeddingLoss, EmbeddingObjective, build_loss
from embedkit.objectives.matryoshka import MatryoshkaLoss, TruncatedEncoder


class MultiTaskLoss(EmbeddingLoss):
    """The weighted sum of the task losses a step holds.

    Formula:
        With batches {task: batch} (embedkit/data/multitask.py):

            L = Σ_t w_t · L_t,   L_retrieval = (1/K) Σ_k InfoNCE(q, [p⁺, negatives of shard k]),
                                 L_sts = CoSENT(u, v, y)

        summed over the tasks present in the step; the per-task losses are the task losses' own
        (`InfoNCELoss`, `CoSENTLoss`).

    Paper:
        Conan-Embedding (Li et al. 2024, arXiv:2408.15710), §3.4 (cross-GPU batch balance, CBB)
        and §4 (Table 3: CBB against sequential random-task training).

    Arguments (paper defaults):
        tasks: {name: the task's loss}: an EmbeddingLoss, an objective class or a partial of one
            (Hydra's `_partial_: true`), or a config with a `_target_`; built around the same
            encoder. Conan: retrieval (InfoNCE) and STS (CoSENT).
        weights: {task: w}; None = all 1 (Conan sums the task losses).
        retrieval_shards: K, the GPUs emulated on one device (1 = plain InfoNCE).
        mrl_dims: None, or widths at which every task's loss is trained under Matryoshka (Conan
            trains MRL at 256 .. 1792).
        eval_dims: the widths to evaluate when mrl_dims is set; None = all.
        encoder: the encoder, to build the tasks around and check the widths against.

    Batch:
        {task name: that task's batch} (`embedkit.data.multitask.MultiTaskDataModule`): every task
        under CBB, one under sequential training.
    """

    def __init__(self, tasks: Mapping[str, Any], weights: Mapping[str, float] | None = None,
                 retrieval_shards: int = 1, mrl_dims: Sequence[int] | None = None,
                 eval_dims: Sequence[int] | None = None, encoder: TextEncoder | None = None):
        super().__init__()
        if not tasks:
            raise ValueError("MultiTask needs at least one task objective")
        if retrieval_shards < 1:
            raise ValueError(f"retrieval_shards must be >= 1, got {retrieval_shards}")
        built = {}
        for name, spec in tasks.items():
            built[name], settings = build_loss(spec, encoder)
            if settings:
                self.inner_settings[f"tasks.{name}"] = settings
        if mrl_dims:
            built = {name: MatryoshkaLoss(loss, dims=mrl_dims, encoder=encoder)
                     for name, loss in built.items()}
        self.tasks = torch.nn.ModuleDict(built)
        unknown = set(weights or {}) - set(built)
        if unknown:
            raise ValueError(f"weights name unknown tasks {sorted(unknown)}; tasks: {list(built)}")
        self.weights = {name: float((weights or {}).get(name, 1.0)) for name in built}
        self.retrieval_shards = retrieval_shards
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
        loss, k = self.tasks[name], self.retrieval_shards
        if k == 1 or "passages" not in embeddings:
            return loss(embeddings, batch)
        q, p = embeddings["query"], embeddings["passages"]
        groups = p.view(q.shape[0], -1, p.shape[-1])
        negatives = groups.shape[1] - 1
        if negatives % k:
            raise ValueError(f"{negatives} negatives per query do not split into {k} retrieval shards; "
                             f"set the {name} data's train_group_size (data.tasks.{name}."
                             f"train_group_size) to 1 + {k}·n")
        n = negatives // k
        losses = []
        for s in range(k):
            shard = torch.cat([groups[:, :1], groups[:, 1 + s * n:1 + (s + 1) * n]], dim=1)
            losses.append(loss({**embeddings, "passages": shard.reshape(-1, p.shape[-1])}, batch))
        return torch.stack(losses).mean()

    def forward(self, embeddings, batch) -> torch.Tensor:
        total, self._task_losses = 0.0, {}
        for name, emb in embeddings.items():
            loss = self.task_loss(name, emb, batch[name])
            self._task_losses[name] = loss.detach()
            total = total + self.weights[name] * loss
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


class MultiTask(EmbeddingObjective):
    """MultiTaskLoss as a LightningModule: `MultiTask(encoder, tasks, <MultiTaskLoss's other
    arguments>, <the shared settings of EmbeddingObjective>)`."""

    loss_class = MultiTaskLoss
    embedding_width_args = ("mrl_dims", "eval_dims")
