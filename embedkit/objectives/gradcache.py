"""GradCache: a contrastive batch far larger than what fits through the encoder at once.

Gao et al., "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup" (RepL4NLP
2021). For any loss L(E) that is a function of the batch's embeddings E = f_θ(X), the chain rule
splits the parameter gradient into per-row pieces:

    ∂L/∂θ = Σ_chunks  J_θ(f_θ(X_c))ᵀ · ∂L/∂E_c

so one step is done in three passes, with activations alive for one chunk of `mini_batch` rows only:

1. embed every chunk of every tokenised column without grad, saving the RNG state before each;
2. compute L on the concatenated (detached) embeddings and its gradient G = ∂L/∂E;
3. for each chunk again, restore its RNG state (same dropout masks), embed with grad and
   back-propagate the surrogate ⟨E_c, G_c⟩, whose parameter gradient is J_cᵀ G_c.

Loss and parameter gradients equal the plain step's on the same batch (tests/test_gradcache.py);
the price is one extra forward per row. Activation memory is set by `mini_batch`, not the batch:
what stays resident is E, G and one score matrix. Rows are sliced, not re-padded, so every chunk
keeps the batch's padded width (per-token outputs such as M3's concatenate unchanged); the
length-grouped batches of embedkit/data/contrastive.py keep that padding small.

The objective supplies `embed_tokens(side, features)` (one column's part of `embed`, from its
loss part's `EmbeddingLoss.embed_tokens`), and its `loss_from_embeddings` is reused as is: InfoNCE
(with or without cross-device negatives), CoSENT, Matryoshka (the wrapper caches, the inner loss
runs once per width) and M3 (dense, sparse and multi-vector outputs all take part in the
surrogate). The cached embeddings are left in the objective's `last_embeddings`, as the plain step
does, so callbacks that read them (dynamic hard-negative mining) see every step.

In Lightning the step runs under manual optimisation (`self.manual_backward`, so mixed-precision
loss scaling applies). Because Lightning refuses `gradient_clip_val` and `accumulate_grad_batches`
with manual optimisation, the recipe moves them from the Trainer config into this object
(`trainer_overrides`): the gradient is clipped by norm in `on_before_optimizer_step` (after AMP
unscaling, as Lightning does), and every `accumulate_grad_batches` batches one optimiser and one
LR-scheduler step are taken, the loss being divided by that number as Lightning does.

Under DDP (the known trap, reference §A.8-5): every replay back-propagates through the DDP-wrapped
module's reducer, and only the last chunk of the last accumulated batch synchronises
(`DistributedDataParallel.no_sync()` around all others), so gradients are all-reduced exactly
once per optimiser step; replaying on the bare module instead leaves ranks with silently different
gradients. Default: off (`objective.grad_cache.mini_batch: null`); sentence-transformers'
CachedMultipleNegativesRankingLoss defaults to mini-batches of 32.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch.utils.checkpoint import get_device_states, set_device_states


class RngState:
    """The CPU generator and the generators of the devices `tensors` live on, to replay dropout."""

    def __init__(self, *tensors: torch.Tensor):
        self.cpu = torch.get_rng_state()
        self.devices, self.states = get_device_states(*tensors)

    @contextlib.contextmanager
    def replay(self):
        # fork_rng restores the outer state afterwards, so a replay leaves the RNG where the
        # first pass left it (the next step draws as it would have without GradCache).
        with torch.random.fork_rng(devices=self.devices):
            torch.set_rng_state(self.cpu)
            set_device_states(self.devices, self.states)
            yield


def token_columns(batch: Mapping) -> list[str]:
    """The keys of the batch that hold tokenised text (a dict with input_ids), in batch order."""
    return [k for k, v in batch.items() if isinstance(v, Mapping) and "input_ids" in v]


def row_chunks(features: Mapping[str, torch.Tensor], size: int) -> list[tuple[int, int]]:
    n = int(features["input_ids"].shape[0])
    return [(a, min(a + size, n)) for a in range(0, n, size)]


def slice_rows(features: Mapping[str, Any], a: int, b: int) -> dict[str, Any]:
    return {k: v[a:b] if torch.is_tensor(v) and v.ndim else v for k, v in features.items()}


@dataclass
class GradCache:
    mini_batch: int
    gradient_clip_val: float | None = None
    gradient_clip_algorithm: str = "norm"
    accumulate_grad_batches: int = 1

    def __post_init__(self):
        if int(self.mini_batch) < 1:
            raise ValueError(f"grad_cache.mini_batch must be >= 1 rows (or null: off), got {self.mini_batch}")
        if int(self.accumulate_grad_batches) < 1:
            raise ValueError(f"accumulate_grad_batches must be >= 1, got {self.accumulate_grad_batches}")
        self.mini_batch = int(self.mini_batch)
        self.accumulate_grad_batches = int(self.accumulate_grad_batches)

    @classmethod
    def from_config(cls, cfg) -> "GradCache | None":
        """None, an int (the mini-batch) or a mapping {mini_batch: N | null, ...}; null = off."""
        if cfg is None or isinstance(cfg, GradCache):
            return cfg
        if isinstance(cfg, int):
            return cls(mini_batch=cfg)
        if isinstance(cfg, Mapping):
            cfg = dict(cfg)
            if cfg.get("mini_batch") is None:
                return None
            unknown = set(cfg) - set(cls.__dataclass_fields__)
            if unknown:
                raise ValueError(f"unknown grad_cache settings {sorted(unknown)}; "
                                 f"known: {sorted(cls.__dataclass_fields__)}")
            return cls(**cfg)
        raise TypeError(f"grad_cache must be null, an int or a mapping with mini_batch, got {cfg!r}")

    # ------------------------------------------------------------------ Lightning plumbing

    def trainer_overrides(self, trainer_cfg) -> dict:
        """Take clipping and accumulation from the Trainer config (Lightning forbids them under
        manual optimisation) and return the Trainer arguments that switch them off there."""
        get = trainer_cfg.get if hasattr(trainer_cfg, "get") else (lambda k, d=None: d)
        if self.gradient_clip_val is None and get("gradient_clip_val") is not None:
            self.gradient_clip_val = float(get("gradient_clip_val"))
            self.gradient_clip_algorithm = get("gradient_clip_algorithm") or "norm"
        accumulate = get("accumulate_grad_batches")
        if accumulate is not None and int(accumulate) != 1:
            self.accumulate_grad_batches = int(accumulate)
        return {"gradient_clip_val": None, "accumulate_grad_batches": 1}

    def total_steps(self, trainer) -> int:
        """Optimiser steps of the run, for the LR schedule (max_steps already counts them)."""
        total = max(1, int(trainer.estimated_stepping_batches))
        if trainer.max_steps is not None and trainer.max_steps > 0:
            return total
        return max(1, total // self.accumulate_grad_batches)

    def clip(self, module, optimizer) -> None:
        if self.gradient_clip_val:
            module.clip_gradients(optimizer, gradient_clip_val=self.gradient_clip_val,
                                  gradient_clip_algorithm=self.gradient_clip_algorithm)

    # ------------------------------------------------------------------ the step

    def embed_no_grad(self, module, batch):
        """Pass 1: every chunk of every column without grad. Returns the concatenated embeddings
        and the chunks as (column, (begin, end), RngState)."""
        parts: dict[str, list[torch.Tensor]] = {}
        chunks = []
        with torch.no_grad():
            for side in token_columns(batch):
                for a, b in row_chunks(batch[side], self.mini_batch):
                    features = slice_rows(batch[side], a, b)
                    state = RngState(*[v for v in features.values() if torch.is_tensor(v)])
                    for key, value in module.embed_tokens(side, features).items():
                        parts.setdefault(key, []).append(value)
                    chunks.append((side, (a, b), state))
        return {k: torch.cat(v) for k, v in parts.items()}, chunks

    def loss_and_cache(self, module, batch):
        """Passes 1 and 2: (loss, embeddings, {key: ∂loss/∂embedding}, chunks)."""
        embeddings, chunks = self.embed_no_grad(module, batch)
        leaves = {k: v.detach().requires_grad_() for k, v in embeddings.items()
                  if v.is_floating_point()}
        embeddings = {**embeddings, **leaves}
        with torch.enable_grad():
            loss = module.loss_from_embeddings(embeddings, batch)
        return loss, embeddings, leaves, chunks

    def replay(self, module, batch, chunks, grads: Mapping[str, torch.Tensor], backward,
               context_for=lambda last: contextlib.nullcontext()):
        """Pass 3: re-embed each chunk under its saved RNG state and back-propagate ⟨E_c, G_c⟩.

        `backward(surrogate)` runs the backward (Lightning: manual_backward); `context_for(last)`
        wraps each replay (DDP: no_sync for all but the last)."""
        for i, (side, (a, b), state) in enumerate(chunks):
            features = slice_rows(batch[side], a, b)
            with context_for(i == len(chunks) - 1), state.replay():
                out = module.embed_tokens(side, features)
                # Keys are per column (query, passages_sparse, ...), so rows a:b of the cached
                # gradient are this chunk's. The surrogate is formed in float32 at least (bf16 /
                # fp16 under AMP), never below the embeddings' dtype (a float64 model stays exact).
                terms = [_surrogate(value, grads[key][a:b])
                         for key, value in out.items() if grads.get(key) is not None]
                if not terms:   # nothing to send back, but a DDP step still needs its backward
                    terms = [sum(v.float().sum() for v in out.values() if v.is_floating_point()) * 0.0]
                backward(torch.stack(terms).sum())

    def cached_loss(self, module, batch):
        """Passes 1 and 2: (loss, embeddings, chunks, grads or None). An objective with a blocked
        pass 2 (`loss_and_grads`, InfoNCE) already returns the embedding gradients; otherwise they
        come from autograd on the whole loss, once the loss is known to be usable."""
        blocked = getattr(module, "loss_and_grads", None)
        if blocked is not None:
            embeddings, chunks = self.embed_no_grad(module, batch)
            out = blocked(embeddings, batch, 1.0 / self.accumulate_grad_batches, self.mini_batch)
            if out is not None:
                return out[0], embeddings, chunks, out[1]
            leaves = {k: v.detach().requires_grad_() for k, v in embeddings.items()
                      if v.is_floating_point()}
            embeddings = {**embeddings, **leaves}
            with torch.enable_grad():
                loss = module.loss_from_embeddings(embeddings, batch)
        else:
            loss, embeddings, leaves, chunks = self.loss_and_cache(module, batch)

        def grads():
            # The division by the accumulation count that Lightning applies in automatic mode.
            keys = list(leaves)
            found = torch.autograd.grad(loss / self.accumulate_grad_batches,
                                        [leaves[k] for k in keys], allow_unused=True)
            return dict(zip(keys, found))
        return loss, embeddings, chunks, grads

    def training_step(self, module, batch, batch_idx):
        trainer = module.trainer
        loss, embeddings, chunks, grads = self.cached_loss(module, batch)
        # Callbacks read the step's embeddings (dynamic hard-negative mining): the cached ones here.
        module.keep_embeddings(embeddings)
        size = module.batch_size_of(batch)
        boundary = ((batch_idx + 1) % self.accumulate_grad_batches == 0
                    or bool(getattr(trainer, "is_last_batch", False)))
        if module.loss_is_usable(loss, batch_idx, size):
            if callable(grads):
                grads = grads()
            ddp = _ddp_module(trainer)

            def context_for(last):
                sync = last and boundary
                return ddp.no_sync() if ddp is not None and not sync else contextlib.nullcontext()

            self.replay(module, batch, chunks, grads, module.manual_backward, context_for)
            module.log_step(loss.detach(), {k: v.detach() for k, v in embeddings.items()}, batch, size)
        if boundary:
            optimizer = module.optimizers()
            has_grads = any(p.grad is not None for p in module.parameters())
            if has_grads:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            scheduler = module.lr_schedulers()
            if scheduler is not None:
                scheduler.step()
        return loss.detach()


def _surrogate(value: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """⟨value, grad⟩, whose gradient with respect to value is grad."""
    dtype = torch.promote_types(torch.promote_types(value.dtype, grad.dtype), torch.float32)
    return (value.to(dtype) * grad.to(dtype)).sum()


def _ddp_module(trainer):
    from torch.nn.parallel import DistributedDataParallel

    model = getattr(getattr(trainer, "strategy", None), "model", None)
    return model if isinstance(model, DistributedDataParallel) else None
