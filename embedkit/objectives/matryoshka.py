"""Matryoshka Representation Learning (MRL): one embedding that still works when cut short.

Wraps any embedding objective (InfoNCE, CoSENT, M3's dense score). For nested dimensions
d_1 < … < d_m ≤ D and weights w_d (all 1 by default), with the inner objective's loss L_inner:

    L = Σ_d w_d · L_inner( normalize(e[:, :d]) for every embedding tensor e of the batch )

so the first d coordinates of the embedding are trained to be a usable embedding on their own.
Truncation is followed by L2 re-normalisation, so a dot-product inner loss (InfoNCE) stays a cosine
loss at every width. The encoder runs once per step whatever the number of dimensions: the inner
objective's `embed(batch)` is called once, and its `loss_from_embeddings` once per dimension on
truncated views of the same tensors, so the gradients of every width flow into one graph.

Sources: Kusupati et al., "Matryoshka Representation Learning" (NeurIPS 2022); Conan-Embedding
(Li et al. 2024, arXiv:2408.15710) trains MRL at 256, 512, 768, 1024, 1536 and 1792 dimensions on
top of a linear layer that widens its 1024-wide BERT to 1792 (`TextEncoder(projection_dim=1792)`).
The loss equals sentence-transformers' `MatryoshkaLoss(model, inner, dims, weights)` with the
corresponding inner loss (tests/test_matryoshka.py); its `n_dims_per_step` sampling is not offered.

Optimiser: by default the inner objective's own settings (lr, weight decay, warm-up, betas, eps),
so wrapping an objective does not change how it is optimised; `lr`, `weight_decay` and
`warmup_ratio` given here override them. Only the inner objective's `embed`,
`loss_from_embeddings`, `log_extras`, `batch_size_of` and `save_extras` are used; its other
Lightning hooks are not called.

Evaluation (`eval_targets`): one variant per dimension, labelled "dim=<d>", whose encoder returns the
first d coordinates re-normalised. The variants share one cache of full-width embeddings, so the
texts of the evaluation suite are encoded once, not once per dimension.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from embedkit.models.encoder import TextEncoder
from embedkit.objectives.base import EmbeddingObjective

log = logging.getLogger(__name__)


def truncate(embedding: torch.Tensor, dim: int) -> torch.Tensor:
    """The first `dim` coordinates of the last axis, L2-normalised again."""
    if dim > embedding.shape[-1]:
        raise ValueError(f"cannot truncate {embedding.shape[-1]}-dimensional embeddings to {dim}")
    return F.normalize(embedding[..., :dim], dim=-1)


class TruncatedEncoder(nn.Module):
    """An encoder seen through its first `dim` coordinates, re-normalised (MRL evaluation).

    `encode` has TextEncoder's signature (it passes `show_progress` / `desc` through) and returns
    float32 arrays of width `dim`. `cache`, a dict shared by the views of one encoder, keeps the
    full-width embeddings of texts already encoded, so views of other widths reuse them; the
    encoder must not change while a cache is in use (it is frozen during evaluation).
    """

    def __init__(self, encoder: TextEncoder, dim: int, cache: dict | None = None):
        super().__init__()
        if not 0 < dim <= encoder.dim:
            raise ValueError(f"dim must be in 1..{encoder.dim}, got {dim}")
        self.encoder = encoder
        self._dim = int(dim)
        self.cache = cache

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def tokenizer(self):
        return self.encoder.tokenizer

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **unused) -> torch.Tensor:
        return truncate(self.encoder(input_ids, attention_mask, **unused), self._dim)

    def encode(self, texts: Sequence[str], batch_size: int = 128, max_length: int | None = None,
               show_progress: bool = False, desc: str = "encode") -> np.ndarray:
        texts = list(texts)
        kwargs = dict(batch_size=batch_size, max_length=max_length, show_progress=show_progress,
                      desc=desc)
        if self.cache is None:
            full = self.encoder.encode(texts, **kwargs)
        else:
            missing = [t for t in dict.fromkeys(texts) if (t, max_length) not in self.cache]
            if missing:
                for text, vec in zip(missing, self.encoder.encode(missing, **kwargs)):
                    self.cache[(text, max_length)] = vec
            full = (np.stack([self.cache[(t, max_length)] for t in texts]) if texts
                    else np.zeros((0, self.encoder.dim), dtype=np.float32))
        part = np.asarray(full[:, :self._dim], dtype=np.float32)
        norms = np.linalg.norm(part, axis=1, keepdims=True)
        return part / np.maximum(norms, 1e-12)


def _build_inner(inner: Any, encoder: TextEncoder | None, kwargs: dict) -> EmbeddingObjective:
    """The inner objective around the *same* encoder: a built objective, a partial (Hydra's
    `_partial_: true`) or a config with a `_target_`; `kwargs` are added to its arguments."""
    if isinstance(inner, EmbeddingObjective):
        if inner.encoder is not encoder:
            raise ValueError("the inner objective must train the same encoder as Matryoshka")
        for key, value in kwargs.items():
            if getattr(inner, key, None) != value:
                raise ValueError(f"{key}={value!r} cannot be applied to an already built inner "
                                 f"objective (it has {getattr(inner, key, None)!r})")
        return inner
    if callable(inner):
        return inner(encoder=encoder, **kwargs)
    from omegaconf import DictConfig

    if isinstance(inner, (dict, DictConfig)) and "_target_" in inner:
        from hydra.utils import instantiate

        return instantiate(inner, encoder=encoder, **kwargs)
    raise TypeError(f"inner must be an EmbeddingObjective, a partial of one or a config with a "
                    f"_target_, got {type(inner).__name__}")


class Matryoshka(EmbeddingObjective):
    # Arguments holding embedding widths: checked against the encoder's width before training
    # (embedkit/recipes/preflight.py), not only when the objective is built after the data is read.
    embedding_width_args = ("dims",)

    def __init__(self, encoder: TextEncoder, inner: Any, dims: Sequence[int],
                 weights: Sequence[float] | None = None, truncate_keys: Sequence[str] | None = None,
                 train_group_size: int | None = None, lr: float | None = None,
                 weight_decay: float | None = None, warmup_ratio: float | None = None,
                 on_nonfinite_loss: str = "error", grad_cache=None, **inner_kwargs):
        """
        inner: the objective to apply at every width (see `_build_inner`).
        dims: the nested widths, e.g. Conan's [256, 512, 768, 1024, 1536, 1792].
        weights: one per dim; None = all 1.
        truncate_keys: which tensors of the inner `embed()` dict to truncate; None = every
            floating-point tensor (restrict it when the inner objective also returns tensors that
            are not embeddings, e.g. per-token weights).
        train_group_size: None, or passed to the inner objective. Contrastive data configs read
            `${objective.train_group_size}`, so conf/objective/matryoshka.yaml mirrors the inner
            objective's value here, and `objective.train_group_size=N` then sets both.
        lr, weight_decay, warmup_ratio: the optimiser's; None = the inner objective's.
        on_nonfinite_loss: "error" or "skip" (see EmbeddingObjective); this wrapper's training
            step is the one that runs, so the setting is its own, not the inner objective's.
        grad_cache: GradCache settings of this wrapper's step (the inner objective's are unused):
            the chunks are embedded by the inner `embed_tokens`, and the cached gradient is that
            of the sum over widths, so each chunk is replayed once, not once per width.
        inner_kwargs: any other argument goes to the inner objective, so settings made for a plain
            objective (`objective.temperature=0.05`, scale=paper's values) reach it unchanged.
        """
        if train_group_size is not None:
            inner_kwargs["train_group_size"] = train_group_size
        inner = _build_inner(inner, encoder, inner_kwargs)
        super().__init__(encoder,
                         lr=inner.lr if lr is None else lr,
                         weight_decay=inner.weight_decay if weight_decay is None else weight_decay,
                         warmup_ratio=inner.warmup_ratio if warmup_ratio is None else warmup_ratio,
                         betas=inner.betas, eps=inner.eps, on_nonfinite_loss=on_nonfinite_loss,
                         grad_cache=grad_cache)
        self.inner = inner
        dims = [int(d) for d in dims]
        if not dims:
            raise ValueError("Matryoshka needs at least one dimension in dims")
        if any(d <= 0 for d in dims):
            raise ValueError(f"every Matryoshka dimension must be > 0, got {dims}")
        if len(set(dims)) != len(dims):
            raise ValueError(f"Matryoshka dims repeat a value: {dims}")
        weights = [1.0] * len(dims) if weights is None else [float(w) for w in weights]
        if len(weights) != len(dims):
            raise ValueError(f"{len(weights)} weights for {len(dims)} dims; give one weight per dim")
        if encoder is not None:
            full = encoder.dim
            if max(dims) > full:
                raise ValueError(f"Matryoshka dims {dims} exceed the encoder's output width {full} "
                                 f"(a projection head widens it: model.encoder.projection_dim)")
            if full not in dims:
                log.warning("Matryoshka dims %s leave out the encoder's full width %d, which is "
                            "then never trained as such", dims, full)
        self.dims = dims
        self.weights = weights
        self.truncate_keys = None if truncate_keys is None else set(truncate_keys)
        self.train_group_size = getattr(inner, "train_group_size", None)
        self._dim_losses: list[tuple[int, torch.Tensor]] = []
        self.save_hyperparameters(ignore=["encoder", "inner"])

    # ------------------------------------------------------------------ the step

    def embed(self, batch) -> dict[str, torch.Tensor]:
        return self.inner.embed(batch)

    def embed_tokens(self, side, features) -> dict[str, torch.Tensor]:
        return self.inner.embed_tokens(side, features)

    def truncated(self, embeddings: dict[str, Any], dim: int) -> dict[str, Any]:
        """The inner `embed()` dict with every (selected) embedding tensor cut to `dim`."""
        out = {}
        for key, value in embeddings.items():
            selected = (key in self.truncate_keys if self.truncate_keys is not None
                        else torch.is_tensor(value) and value.is_floating_point())
            out[key] = truncate(value, dim) if selected else value
        return out

    def loss_from_embeddings(self, embeddings, batch) -> torch.Tensor:
        total, self._dim_losses = 0.0, []
        for dim, weight in zip(self.dims, self.weights):
            loss = self.inner.loss_from_embeddings(self.truncated(embeddings, dim), batch)
            self._dim_losses.append((dim, loss.detach()))
            total = total + weight * loss
        return total

    def batch_size_of(self, batch) -> int:
        return self.inner.batch_size_of(batch)

    def log_extras(self, embeddings, batch) -> None:
        size = self.batch_size_of(batch)
        for dim, loss in self._dim_losses:
            self.log(f"train/loss_dim{dim}", loss, batch_size=size)
        # The inner objective's own diagnostics on the full-width embeddings. Lightning only lets a
        # module log inside a hook it is running; the inner one shares our trainer, so lend it ours.
        previous = self.inner._current_fx_name
        self.inner._current_fx_name = self._current_fx_name
        try:
            self.inner.log_extras(embeddings, batch)
        finally:
            self.inner._current_fx_name = previous

    # ------------------------------------------------------------------ after training

    def eval_targets(self) -> dict[str, dict]:
        cache: dict = {}
        return {f"dim={d}": {"encoder": TruncatedEncoder(self.encoder, d, cache)} for d in self.dims}

    def save_extras(self, out_dir: str | Path) -> None:
        self.inner.save_extras(out_dir)

    def load_extras(self, out_dir: str | Path) -> None:
        self.inner.load_extras(out_dir)
