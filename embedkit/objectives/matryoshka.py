"""Matryoshka Representation Learning (MRL): one embedding that still works when cut short.

`MatryoshkaLoss` wraps any embedding loss (InfoNCE, CoSENT, M3's dense score); formula, paper,
arguments and batch: its docstring. `Matryoshka` trains it as a LightningModule with the shared
optimisation of embedkit/objectives/base.py. The wrapper holds the inner objective's *loss part*,
never a nested LightningModule: the encoder runs once per step whatever the number of dimensions
(the inner loss's `embed(encoder, batch)` once, its `forward` once per dimension on truncated views
of the same tensors, so the gradients of every width flow into one graph), and only the wrapper's
step and optimiser run. The shared settings (lr, optimizer, scheduler, warm-up, on_nonfinite_loss,
grad_cache) are the wrapper's; an inner objective given with a different value is an error, and
one the wrapper leaves unset is taken from the inner objective (conf/objective/matryoshka.yaml makes
the inner ones follow the wrapper's). Under GradCache the
chunks are embedded by the inner `embed_tokens`, and the cached gradient is that of the sum over
widths, so each chunk is replayed once, not once per width.

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
from embedkit.objectives.base import EmbeddingLoss, EmbeddingObjective, build_loss

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


class MatryoshkaLoss(EmbeddingLoss):
    """The inner loss summed over nested, re-normalised prefixes of the embedding.

    Formula:
        For nested dimensions d_1 < … < d_m ≤ D and weights w_d, with the inner loss L_inner:

            L = Σ_d w_d · L_inner( normalize(e[:, :d]) for every embedding tensor e of the batch )

        so the first d coordinates of the embedding are trained to be a usable embedding on their
        own. Truncation is followed by L2 re-normalisation, so a dot-product inner loss (InfoNCE)
        stays a cosine loss at every width. Equal to sentence-transformers'
        `MatryoshkaLoss(model, inner, dims, weights)` with the corresponding inner loss
        (tests/test_matryoshka.py); its `n_dims_per_step` sampling is not offered.

    Paper:
        Kusupati et al., "Matryoshka Representation Learning" (NeurIPS 2022), §3; Conan-Embedding
        (Li et al. 2024, arXiv:2408.15710, §3.4) trains MRL at 256, 512, 768, 1024, 1536 and 1792
        dimensions on top of a linear layer that widens its 1024-wide BERT to 1792
        (`TextEncoder(projection_dim=1792)`).

    Arguments (paper defaults):
        inner: the loss applied at every width: an EmbeddingLoss, an objective class or a partial
            of one (Hydra's `_partial_: true`, conf/objective/matryoshka.yaml's `inner`), or a
            config with a `_target_`; built around the same encoder.
        dims: the nested widths (no default; Conan's [256, 512, 768, 1024, 1536, 1792]).
        weights: one per dim; None = all 1 (sentence-transformers' default; Conan states none).
        truncate_keys: which tensors of the inner `embed()` dict to truncate; None = every
            floating-point tensor (restrict it when the inner loss also returns tensors that are
            not embeddings, e.g. M3's per-token weights: [query, passages]).
        inner_kwargs: any other argument goes to the inner objective, so settings made for a plain
            objective (`objective.temperature=0.05`, scale=paper's values) reach it unchanged.
        encoder: the encoder, to check the widths against and to build `inner` around.

    Batch:
        The inner loss's batch, unchanged (InfoNCE's query/passages, CoSENT's sentence pairs, ...).
    """

    def __init__(self, inner: Any, dims: Sequence[int], weights: Sequence[float] | None = None,
                 truncate_keys: Sequence[str] | None = None, encoder: TextEncoder | None = None,
                 **inner_kwargs):
        super().__init__()
        self.inner, settings = build_loss(inner, encoder, inner_kwargs)
        if settings:
            self.inner_settings = {"inner": settings}
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
        self._dim_losses: list[tuple[int, torch.Tensor]] = []

    @property
    def supports_grad_cache(self) -> bool:
        return self.inner.supports_grad_cache

    # ------------------------------------------------------------------ the step

    def embed(self, encoder, batch) -> dict[str, torch.Tensor]:
        return self.inner.embed(encoder, batch)

    def embed_tokens(self, encoder, side, features) -> dict[str, torch.Tensor]:
        return self.inner.embed_tokens(encoder, side, features)

    def truncated(self, embeddings: dict[str, Any], dim: int) -> dict[str, Any]:
        """The inner `embed()` dict with every (selected) embedding tensor cut to `dim`."""
        out = {}
        for key, value in embeddings.items():
            selected = (key in self.truncate_keys if self.truncate_keys is not None
                        else torch.is_tensor(value) and value.is_floating_point())
            out[key] = truncate(value, dim) if selected else value
        return out

    def forward(self, embeddings, batch) -> torch.Tensor:
        total, self._dim_losses = 0.0, []
        for dim, weight in zip(self.dims, self.weights):
            loss = self.inner(self.truncated(embeddings, dim), batch)
            self._dim_losses.append((dim, loss.detach()))
            total = total + weight * loss
        return total

    def batch_size_of(self, batch) -> int:
        return self.inner.batch_size_of(batch)

    def diagnostics(self, embeddings, batch) -> dict[str, Any]:
        # Every width's loss, then the inner loss's own diagnostics on the full-width embeddings.
        out = {f"loss_dim{dim}": loss for dim, loss in self._dim_losses}
        return {**out, **self.inner.diagnostics(embeddings, batch)}

    # ------------------------------------------------------------------ after training

    def eval_targets(self, encoder) -> dict[str, dict]:
        cache: dict = {}
        return {f"dim={d}": {"encoder": TruncatedEncoder(encoder, d, cache)} for d in self.dims}

    def save_extras(self, out_dir: str | Path) -> None:
        self.inner.save_extras(out_dir)

    def load_extras(self, out_dir: str | Path) -> None:
        self.inner.load_extras(out_dir)


class Matryoshka(EmbeddingObjective):
    """MatryoshkaLoss as a LightningModule: `Matryoshka(encoder, inner, dims, <MatryoshkaLoss's
    other arguments>, <the shared settings of EmbeddingObjective>)`. The inner loss is
    `self.loss.inner`."""

    loss_class = MatryoshkaLoss
    embedding_width_args = ("dims",)
