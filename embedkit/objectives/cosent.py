"""CoSENT: a ranking loss on the cosine similarities of sentence pairs (Conan-Embedding's STS loss).

`CoSENTLoss` is the loss (formula, paper, arguments, batch: its docstring); `CoSENT` trains it as a
LightningModule with the shared optimisation of embedkit/objectives/base.py. Conan's fine-tuning
uses batch size 32 for STS and AdamW at lr 1e-5, warm-up 0.05 and a "decay" of 0.001 (presumably
weight decay) (its experimental details); the mini scale trains a fresh tiny BERT, so its lr is
larger (conf/objective/cosent.yaml).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from embedkit.objectives.base import EmbeddingLoss, EmbeddingObjective


def cosent_loss(u: torch.Tensor, v: torch.Tensor, labels: torch.Tensor,
                scale: float = 20.0) -> torch.Tensor:
    """u, v: (B, D) embeddings of the two sides of B pairs; labels: (B,) gold similarities.

    Builds the B×B matrix of score differences s_k − s_i, keeps the entries where y_i > y_k, and
    takes log(1 + Σ exp(·)) as a logsumexp with a zero logit for the "1". Masked entries are −inf,
    so they contribute exp(−inf) = 0 to the value and nothing to the gradient.
    """
    if u.shape != v.shape or u.ndim != 2:
        raise ValueError(f"u and v must both be (batch, dim), got {tuple(u.shape)} and {tuple(v.shape)}")
    labels = labels.reshape(-1)
    if labels.numel() != u.shape[0]:
        raise ValueError(f"expected one label per pair ({u.shape[0]}), got {labels.numel()}")
    if u.dtype in (torch.float16, torch.bfloat16):
        # Half precision loses the small score differences CoSENT ranks on: score in float32.
        u, v = u.float(), v.float()
    scores = scale * F.cosine_similarity(u, v, dim=-1)
    diff = scores.unsqueeze(0) - scores.unsqueeze(1)          # diff[i, k] = s_k − s_i
    above = labels.unsqueeze(1) > labels.unsqueeze(0)         # above[i, k] = y_i > y_k
    diff = diff.masked_fill(~above, float("-inf"))
    return torch.logsumexp(torch.cat([scores.new_zeros(1), diff.flatten()]), dim=0)


def _ranks(x: torch.Tensor) -> torch.Tensor:
    return torch.argsort(torch.argsort(x)).float()


class CoSENTLoss(EmbeddingLoss):
    """CoSENT on scored sentence pairs; the two sides share the encoder.

    Formula:
        For a batch of pairs (u_i, v_i) with gold similarity labels y_i, let s_i = λ·cos(u_i, v_i):

            L = log( 1 + Σ_{(i,k) : y_i > y_k} exp(s_k − s_i) )

        i.e. every pair of pairs whose gold order is i above k is penalised when the model scores
        k close to or above i. Only the *order* of the labels enters: pairs with equal labels
        (ties) add nothing, and any strictly increasing rescaling of the labels gives the same
        loss. The loss is one scalar per batch, a smooth maximum over all mis-ordered comparisons,
        not an average; it therefore grows roughly with log(number of ordered pairs), i.e. with the
        batch size. Equal to sentence-transformers' `CoSENTLoss(scale=λ)` with its default
        `pairwise_cos_sim` (tests/test_cosent.py).

    Paper:
        Su Jianlin, "CoSENT (1): a more effective sentence-vector scheme than Sentence-BERT"
        (kexue.fm, 2022; later Huang et al., IEEE/ACM TASLP 2024), adopted for the STS task of
        Conan-Embedding (Li et al. 2024, arXiv:2408.15710, §3.4), whose authors found it slightly
        better than cross-entropy there.

    Arguments (paper defaults):
        scale: λ = 20 (Su's and sentence-transformers' default, a temperature of 0.05).

    Batch:
        {"sentence1": tokens (B rows), "sentence2": tokens (B rows), "labels": (B,) gold scores}
        (`embedkit.data.sts.StsDataModule`).
    """

    def __init__(self, scale: float = 20.0):
        super().__init__()
        if scale <= 0:
            raise ValueError(f"scale (λ, an inverse temperature) must be > 0, got {scale}")
        self.scale = scale

    def embed(self, encoder, batch) -> dict[str, torch.Tensor]:
        return {"sentence1": encoder(**batch["sentence1"]), "sentence2": encoder(**batch["sentence2"])}

    def embed_tokens(self, encoder, side, features) -> dict[str, torch.Tensor]:
        return {side: encoder(**features)}

    def forward(self, embeddings, batch) -> torch.Tensor:
        return cosent_loss(embeddings["sentence1"], embeddings["sentence2"], batch["labels"], self.scale)

    def batch_size_of(self, batch) -> int:
        return int(batch["labels"].numel())

    def diagnostics(self, embeddings, batch) -> dict[str, torch.Tensor]:
        cos = F.cosine_similarity(embeddings["sentence1"].float(), embeddings["sentence2"].float(), dim=-1)
        labels = batch["labels"].reshape(-1).float()
        out = {"cos_mean": cos.mean()}
        if labels.numel() > 2:
            # Spearman correlation within the batch (ties broken by position), the metric STS reports.
            rc, rl = _ranks(cos), _ranks(labels)
            rc, rl = rc - rc.mean(), rl - rl.mean()
            denom = (rc.norm() * rl.norm()).clamp(min=1e-12)
            out["spearman"] = (rc * rl).sum() / denom
        return out


class CoSENT(EmbeddingObjective):
    """CoSENTLoss as a LightningModule: `CoSENT(encoder, <CoSENTLoss's arguments>, <the shared
    settings of EmbeddingObjective>)`."""

    loss_class = CoSENTLoss
