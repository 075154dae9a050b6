"""InfoNCE with in-batch and hard negatives: C-Pack's contrastive objective (stages 2 and 3).

`InfoNCELoss` is the loss (formula, paper, arguments, batch: its docstring); `InfoNCE` trains it
as a LightningModule with the shared optimisation of embedkit/objectives/base.py.

Cross-device negatives (`negatives_cross_device=True`, FlagEmbedding's `--negatives_cross_device`):
under DDP with W ranks of B queries each, every rank scores its own queries against the passages
of all ranks (W·B·G columns, all-gathered with gradient, `torch.distributed.nn.functional.
all_gather`), with query i of rank r targeting column (r·B + i)·G. The gather's backward sums
each rank's gradient into the owner's slice, and DDP averages over ranks, so the parameter
gradient equals one process's on the W·B-query batch, whose loss is the mean of the ranks'
(tests/test_distributed.py). Queries need no gathering: only this rank's rows are scored (the
same value as scoring all W·B rows on every rank, at 1/W of the score matrix). Off, or outside
DDP, it is plain InfoNCE. Needs equal per-rank batches (the batch sampler drops the last partial one).
GradCache (`grad_cache.mini_batch`) composes with it: the gather runs once on the cached
embeddings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from embedkit.models.encoder import TextEncoder
from embedkit.objectives.base import EmbeddingLoss, EmbeddingObjective
from embedkit.objectives.cross_device import gather_rows


def info_nce_loss(q: torch.Tensor, p: torch.Tensor, temperature: float) -> torch.Tensor:
    """q: (B, D), p: (B·G, D) with query i's positive at row i·G."""
    if p.shape[0] % q.shape[0]:
        raise ValueError(f"{p.shape[0]} passages do not split into groups for {q.shape[0]} queries")
    group_size = p.shape[0] // q.shape[0]
    scores = q @ p.T / temperature
    target = torch.arange(q.shape[0], device=q.device) * group_size
    return F.cross_entropy(scores, target)


def info_nce_loss_grouped(q: torch.Tensor, p: torch.Tensor, temperature: float, group_size: int,
                          query_offset: int = 0) -> torch.Tensor:
    """InfoNCE where query i's positive is row (query_offset + i)·group_size of p."""
    if p.shape[0] % group_size or p.shape[0] < (query_offset + q.shape[0]) * group_size:
        raise ValueError(f"{p.shape[0]} passages cannot hold groups of {group_size} for queries "
                         f"{query_offset}..{query_offset + q.shape[0] - 1}")
    scores = q @ p.T / temperature
    target = (query_offset + torch.arange(q.shape[0], device=q.device)) * group_size
    return F.cross_entropy(scores, target)


class InfoNCELoss(EmbeddingLoss):
    """InfoNCE over in-batch and hard negatives.

    Formula:
        For B queries q_i and the flattened passages P (B·G rows; row i·G is q_i's positive, the
        next G−1 rows its hard negatives), with L2-normalised embeddings and temperature τ:

            L = −(1/B) Σ_i log( exp(q_i·p_{i·G}/τ) / Σ_{j<B·G} exp(q_i·p_j/τ) )

        so every query sees B·G − 1 negatives: its own hard negatives and every other row's
        passages. This equals sentence-transformers' MultipleNegativesRankingLoss with
        scale = 1/τ on the same embeddings (tests/test_infonce.py).

    Paper:
        C-Pack (Xiao et al. 2023, arXiv:2309.07597), §4.2; FlagEmbedding
        `_compute_in_batch_neg_loss`.

    Arguments (paper defaults):
        temperature: τ = 0.02 (FlagEmbedding since BGE v1.5; v1 used 0.01).
        negatives_cross_device: False; True scores against every DDP rank's passages
            (FlagEmbedding's `--negatives_cross_device`; see the module docstring).

    Batch:
        {"query": tokens (B rows), "passages": tokens (B·G rows, query i's group at rows
        i·G .. i·G+G−1, its positive first)} (`embedkit.data.contrastive.ContrastiveDataModule`).
        G, the group size, is read from the shapes; the data sets it (`data.train_group_size`:
        1 = in-batch negatives only, C-Pack's general-purpose stage; FlagEmbedding's task stage
        uses 8). The query instruction is applied by the data module to queries only.
    """

    def __init__(self, temperature: float = 0.02, negatives_cross_device: bool = False):
        super().__init__()
        if not 0 < temperature <= 1:
            raise ValueError(f"temperature must be in (0, 1], got {temperature}")
        self.temperature = temperature
        self.negatives_cross_device = bool(negatives_cross_device)

    def embed(self, encoder: TextEncoder, batch) -> dict[str, torch.Tensor]:
        return {"query": encoder(**batch["query"]), "passages": encoder(**batch["passages"])}

    def embed_tokens(self, encoder: TextEncoder, side, features) -> dict[str, torch.Tensor]:
        return {side: encoder(**features)}

    def forward(self, embeddings, batch) -> torch.Tensor:
        q, p = embeddings["query"], embeddings["passages"]
        if not self.negatives_cross_device:
            return info_nce_loss(q, p, self.temperature)
        if p.shape[0] % q.shape[0]:
            raise ValueError(f"{p.shape[0]} passages do not split into groups for {q.shape[0]} queries")
        all_p, rank = gather_rows(p)
        return info_nce_loss_grouped(q, all_p, self.temperature, p.shape[0] // q.shape[0],
                                     query_offset=rank * q.shape[0])

    def loss_and_grads(self, embeddings, batch, scale: float, rows: int):
        """GradCache's pass 2 in blocks of `rows` queries: (loss, {key: ∂(scale·loss)/∂embedding}).

        The loss is a mean of per-query cross-entropies, so it is a sum over query blocks, each
        back-propagated at once; only one (rows × B·G) score block is alive at a time instead of
        the full B × B·G matrix (at B = 19,200 that matrix alone is 1.5 GB in float32), as
        sentence-transformers' CachedMultipleNegativesRankingLoss does. None with cross-device
        negatives (the gathered path is left to autograd)."""
        if self.negatives_cross_device:
            return None
        q, p = embeddings["query"].detach(), embeddings["passages"].detach().requires_grad_()
        if p.shape[0] % q.shape[0]:
            raise ValueError(f"{p.shape[0]} passages do not split into groups for {q.shape[0]} queries")
        n, group = q.shape[0], p.shape[0] // q.shape[0]
        grad_q = torch.empty_like(q)
        total = q.new_zeros((), dtype=torch.promote_types(q.dtype, torch.float32))  # bf16: sum in float32
        for a in range(0, n, rows):
            block = q[a:a + rows].requires_grad_()
            with torch.enable_grad():
                target = torch.arange(a, a + block.shape[0], device=q.device) * group
                loss = F.cross_entropy(block @ p.T / self.temperature, target, reduction="sum") / n
                (loss * scale).backward()
            grad_q[a:a + block.shape[0]] = block.grad
            total = total + loss.detach().to(total.dtype)
        return total, {"query": grad_q, "passages": p.grad}

    def diagnostics(self, embeddings, batch) -> dict[str, torch.Tensor]:
        q, p = embeddings["query"], embeddings["passages"]
        g = p.shape[0] // q.shape[0]
        out = {"pos_score": (q * p[::g]).sum(-1).mean()}
        if g > 1:
            negs = (q.unsqueeze(1) * p.view(q.shape[0], g, -1)[:, 1:]).sum(-1)
            out["hard_neg_score"] = negs.mean()
        return out


class InfoNCE(EmbeddingObjective):
    """InfoNCELoss as a LightningModule: `InfoNCE(encoder, <InfoNCELoss's arguments>, <the shared
    settings of EmbeddingObjective>)`."""

    loss_class = InfoNCELoss
