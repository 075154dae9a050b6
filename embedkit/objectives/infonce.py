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

Knowledge distillation from teacher scores (`kd_loss_type`, FlagEmbedding's `--knowledge_distillation
True --kd_loss_type ...`): rows carrying `pos_scores` / `neg_scores` (FlagEmbedding's data format,
e.g. a reranker's logits from its `scripts/add_reranker_score.py`) give the batch
`teacher_scores` (B, G), aligned with each row's drawn group (embedkit/data/contrastive.py). The
two losses are FlagEmbedding 1.4.2's (`AbsEmbedderModel._compute_in_batch_neg_loss`,
`_compute_cross_device_neg_loss` and `distill_loss` in FlagEmbedding/abc/finetune/embedder/
AbsModeling.py); `contrastive_loss` below gives the formulas. With cross-device negatives both are
taken over this rank's queries against every rank's passages (FlagEmbedding scores all W·B
gathered queries on every rank, the same mean over ranks; its m3_kd_loss gathers the teacher
targets for that, here each rank uses its own rows' scores).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from embedkit.models.encoder import TextEncoder
from embedkit.objectives.base import EmbeddingLoss, EmbeddingObjective
from embedkit.objectives.cross_device import gather_rows


KD_LOSS_TYPES = ("kl_div", "m3_kd_loss")
KD_SETTING = "objective.kd_loss_type"


def check_kd_loss_type(kd_loss_type: str | None) -> str | None:
    """None (no distillation) or one of KD_LOSS_TYPES; an error naming the setting otherwise."""
    if kd_loss_type is None or kd_loss_type in KD_LOSS_TYPES:
        return kd_loss_type
    raise ValueError(f"{KD_SETTING} must be null (no distillation) or one of {list(KD_LOSS_TYPES)}, "
                     f"got {kd_loss_type!r}")


def check_teacher_temperature(teacher_temperature: float) -> float:
    if not teacher_temperature > 0:
        raise ValueError(f"objective.teacher_temperature must be > 0, got {teacher_temperature}")
    return float(teacher_temperature)


def teacher_targets(batch, kd_loss_type: str, teacher_temperature: float, queries: int,
                    group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """softmax(teacher_scores / teacher_temperature) over each row's group: (B, G), no gradient.

    FlagEmbedding (`AbsEmbedderModel.forward`) takes the softmax of the raw scores, i.e.
    teacher_temperature = 1. A batch without teacher scores is an error naming the setting."""
    scores = batch.get("teacher_scores") if isinstance(batch, dict) else None
    if scores is None:
        raise ValueError(
            f"{KD_SETTING}={kd_loss_type} distils from teacher scores, but this batch carries none: "
            f"every training row needs `pos_scores` and `neg_scores` aligned with `pos` and `neg` "
            f"(FlagEmbedding's format; the data.sources files lack them, or a row's group was "
            f"filled with passages that have no score: rows without `neg`, or negatives replaced "
            f"by dynamic hard-negative mining). Set {KD_SETTING}: null to train without them.")
    if tuple(scores.shape) != (queries, group_size):
        raise ValueError(f"teacher_scores has shape {tuple(scores.shape)}, expected one score per "
                         f"group member: ({queries}, {group_size})")
    return torch.softmax(scores.detach().to(dtype) / teacher_temperature, dim=-1)


def contrastive_loss(scores: torch.Tensor, group_size: int, query_offset: int = 0,
                     teacher: torch.Tensor | None = None, kd_loss_type: str | None = None,
                     reduction: str = "mean") -> torch.Tensor:
    """The InfoNCE loss of already-scaled scores, with or without teacher distillation.

    scores: (B, N) logits s_ij / τ; query i's group is columns (o + i)·G .. (o + i)·G + G − 1
    (o = query_offset), its positive first. teacher: (B, G) target distribution t_i over the
    group (`teacher_targets`). Per query i, with c_i = (o + i)·G:

        none:       ℓ_i = −log softmax_j(s_i)[c_i]                                   (InfoNCE)
        kl_div:     ℓ_i = −Σ_k t_ik · log softmax_k(s_i[c_i .. c_i + G − 1]) + InfoNCE ℓ_i
                    (cross-entropy against the teacher over the row's own group, plus the
                    in-batch InfoNCE term with weight 1: FlagEmbedding `distill_loss("kl_div")`
                    + `compute_loss` in `_compute_in_batch_neg_loss`)
        m3_kd_loss: ℓ_i = Σ_k t_ik · −log( exp(s_i[c_i + k]) / Σ_{j ∉ {c_i .. c_i + k − 1}} exp(s_ij) )
                    (listwise over the whole in-batch row: member k against every column but the
                    members before it, weighted by the teacher; no extra InfoNCE term:
                    FlagEmbedding `distill_loss("m3_kd_loss")`, which masks with finfo.min)

    and the loss is mean_i ℓ_i (reduction "mean") or Σ_i ℓ_i ("sum", for GradCache's blocks).
    """
    b, n = scores.shape
    if n % group_size or n < (query_offset + b) * group_size:
        raise ValueError(f"{n} passages cannot hold groups of {group_size} for queries "
                         f"{query_offset}..{query_offset + b - 1}")
    first = (query_offset + torch.arange(b, device=scores.device)) * group_size
    if kd_loss_type is None:
        per_query = F.cross_entropy(scores, first, reduction="none")
    elif teacher is None:
        raise ValueError(f"kd_loss_type={kd_loss_type!r} needs the teacher distribution")
    elif kd_loss_type == "kl_div":
        own = scores.gather(1, first[:, None] + torch.arange(group_size, device=scores.device))
        per_query = (-(teacher * torch.log_softmax(own, dim=-1)).sum(-1)
                     + F.cross_entropy(scores, first, reduction="none"))
    elif kd_loss_type == "m3_kd_loss":
        per_query = scores.new_zeros(b)
        masked = scores
        for k in range(group_size):
            target = first + k
            per_query = per_query + teacher[:, k] * F.cross_entropy(masked, target, reduction="none")
            # member k leaves the denominators of the members after it
            masked = masked.scatter(1, target[:, None], float("-inf"))
    else:
        check_kd_loss_type(kd_loss_type)
    return per_query.mean() if reduction == "mean" else per_query.sum()


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
        kd_loss_type: None (no distillation: plain InfoNCE, teacher scores in the batch are
            ignored), "kl_div" or "m3_kd_loss" (`contrastive_loss`; FlagEmbedding's
            `--kd_loss_type`, whose default is kl_div once `--knowledge_distillation` is on).
            Set, it needs `teacher_scores` in every batch and raises naming this setting without.
        teacher_temperature: T of the teacher distribution softmax(teacher_scores / T) (1:
            FlagEmbedding has none, it takes the softmax of the raw reranker logits).

    Batch:
        {"query": tokens (B rows), "passages": tokens (B·G rows, query i's group at rows
        i·G .. i·G+G−1, its positive first)} (`embedkit.data.contrastive.ContrastiveDataModule`).
        G, the group size, is read from the shapes; the data sets it (`data.train_group_size`:
        1 = in-batch negatives only, C-Pack's general-purpose stage; FlagEmbedding's task stage
        uses 8). The query instruction is applied by the data module to queries only. With
        kd_loss_type set, also "teacher_scores": (B, G) floats, query i's group's teacher scores
        in the group's order (the collator adds it when every row of the batch has them).
    """

    def __init__(self, temperature: float = 0.02, negatives_cross_device: bool = False,
                 kd_loss_type: str | None = None, teacher_temperature: float = 1.0):
        super().__init__()
        if not 0 < temperature <= 1:
            raise ValueError(f"temperature must be in (0, 1], got {temperature}")
        self.temperature = temperature
        self.negatives_cross_device = bool(negatives_cross_device)
        self.kd_loss_type = check_kd_loss_type(kd_loss_type)
        self.teacher_temperature = check_teacher_temperature(teacher_temperature)

    def _teacher(self, batch, q, p):
        if self.kd_loss_type is None:
            return None
        return teacher_targets(batch, self.kd_loss_type, self.teacher_temperature, q.shape[0],
                               p.shape[0] // q.shape[0], torch.promote_types(q.dtype, torch.float32))

    def embed(self, encoder: TextEncoder, batch) -> dict[str, torch.Tensor]:
        return {"query": encoder(**batch["query"]), "passages": encoder(**batch["passages"])}

    def embed_tokens(self, encoder: TextEncoder, side, features) -> dict[str, torch.Tensor]:
        return {side: encoder(**features)}

    def forward(self, embeddings, batch) -> torch.Tensor:
        q, p = embeddings["query"], embeddings["passages"]
        if not self.negatives_cross_device and self.kd_loss_type is None:
            return info_nce_loss(q, p, self.temperature)
        if p.shape[0] % q.shape[0]:
            raise ValueError(f"{p.shape[0]} passages do not split into groups for {q.shape[0]} queries")
        teacher = self._teacher(batch, q, p)
        all_p, rank = gather_rows(p) if self.negatives_cross_device else (p, 0)
        return contrastive_loss(q @ all_p.T / self.temperature, p.shape[0] // q.shape[0],
                                query_offset=rank * q.shape[0], teacher=teacher,
                                kd_loss_type=self.kd_loss_type)

    def loss_and_grads(self, embeddings, batch, scale: float, rows: int):
        """GradCache's pass 2 in blocks of `rows` queries: (loss, {key: ∂(scale·loss)/∂embedding}).

        The loss is a mean of per-query cross-entropies, so it is a sum over query blocks, each
        back-propagated at once; only one (rows × B·G) score block is alive at a time instead of
        the full B × B·G matrix (at B = 19,200 that matrix alone is 1.5 GB in float32), as
        sentence-transformers' CachedMultipleNegativesRankingLoss does; the distillation losses
        are per-query sums too, so they are blocked the same way. None with cross-device
        negatives (the gathered path is left to autograd)."""
        if self.negatives_cross_device:
            return None
        q, p = embeddings["query"].detach(), embeddings["passages"].detach().requires_grad_()
        if p.shape[0] % q.shape[0]:
            raise ValueError(f"{p.shape[0]} passages do not split into groups for {q.shape[0]} queries")
        n, group = q.shape[0], p.shape[0] // q.shape[0]
        teacher = self._teacher(batch, q, p)
        grad_q = torch.empty_like(q)
        total = q.new_zeros((), dtype=torch.promote_types(q.dtype, torch.float32))  # bf16: sum in float32
        for a in range(0, n, rows):
            block = q[a:a + rows].requires_grad_()
            with torch.enable_grad():
                loss = contrastive_loss(block @ p.T / self.temperature, group, query_offset=a,
                                        teacher=None if teacher is None else teacher[a:a + rows],
                                        kd_loss_type=self.kd_loss_type, reduction="sum") / n
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
