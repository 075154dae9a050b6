"""InfoNCE with in-batch and hard negatives: C-Pack's contrastive objective (stages 2 and 3).

For B queries q_i and the flattened passages P (B·G rows; row i·G is q_i's positive, the next G−1
rows its hard negatives), with L2-normalised embeddings and temperature τ:

    L = −(1/B) Σ_i log( exp(q_i·p_{i·G}/τ) / Σ_{j<B·G} exp(q_i·p_j/τ) )

so every query sees B·G − 1 negatives: its own hard negatives and every other row's passages
(C-Pack, Xiao et al. 2023, §4.2; FlagEmbedding `_compute_in_batch_neg_loss`). This equals
sentence-transformers' MultipleNegativesRankingLoss with scale = 1/τ on the same embeddings.

Defaults: τ = 0.02 (FlagEmbedding since BGE v1.5; v1 used 0.01), train_group_size = 1, i.e.
in-batch negatives only as in C-Pack's general-purpose stage; the task stage uses 8 in
FlagEmbedding's defaults. The query instruction is applied by the data module to queries only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from embedkit.models.encoder import TextEncoder
from embedkit.objectives.base import EmbeddingObjective


def info_nce_loss(q: torch.Tensor, p: torch.Tensor, temperature: float) -> torch.Tensor:
    """q: (B, D), p: (B·G, D) with query i's positive at row i·G."""
    if p.shape[0] % q.shape[0]:
        raise ValueError(f"{p.shape[0]} passages do not split into groups for {q.shape[0]} queries")
    group_size = p.shape[0] // q.shape[0]
    scores = q @ p.T / temperature
    target = torch.arange(q.shape[0], device=q.device) * group_size
    return F.cross_entropy(scores, target)


class InfoNCE(EmbeddingObjective):
    def __init__(self, encoder: TextEncoder, temperature: float = 0.02, train_group_size: int = 1,
                 lr: float = 3e-5, weight_decay: float = 0.0, warmup_ratio: float = 0.1,
                 on_nonfinite_loss: str = "error"):
        super().__init__(encoder, lr=lr, weight_decay=weight_decay, warmup_ratio=warmup_ratio,
                         on_nonfinite_loss=on_nonfinite_loss)
        if not 0 < temperature <= 1:
            raise ValueError(f"temperature must be in (0, 1], got {temperature}")
        self.temperature = temperature
        self.train_group_size = train_group_size
        self.save_hyperparameters(ignore=["encoder"])

    def embed(self, batch) -> dict[str, torch.Tensor]:
        return {"query": self.encoder(**batch["query"]), "passages": self.encoder(**batch["passages"])}

    def loss_from_embeddings(self, embeddings, batch) -> torch.Tensor:
        return info_nce_loss(embeddings["query"], embeddings["passages"], self.temperature)

    def log_extras(self, embeddings, batch) -> None:
        q, p = embeddings["query"], embeddings["passages"]
        g = p.shape[0] // q.shape[0]
        self.log("train/pos_score", (q * p[::g]).sum(-1).mean(), batch_size=q.shape[0])
        if g > 1:
            negs = (q.unsqueeze(1) * p.view(q.shape[0], g, -1)[:, 1:]).sum(-1)
            self.log("train/hard_neg_score", negs.mean(), batch_size=q.shape[0])
