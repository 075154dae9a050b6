"""What every embedding objective shares: the encoder it trains, the step, the optimiser schedule.

A step is split in two: `embed(batch)` runs the encoder and returns named embedding tensors, and
`loss_from_embeddings(embeddings, batch)` is a pure function of them. Wrappers rely on the split:
Matryoshka truncates the embeddings and calls the inner loss once per dimension without running
the encoder again, and GradCache can embed in chunks without grad, then replay.

AdamW with linear warm-up then linear decay to zero is what FlagEmbedding (via the HF Trainer),
RetroMAE and Conan all use; weight decay skips biases and LayerNorm weights, as HF does.

A NaN or Inf loss stops the run by default (`on_nonfinite_loss="error"`), naming the global step,
batch index and batch size, because one such step silently turns every weight into NaN and the
run would go on to train and evaluate garbage. `"skip"` instead leaves that batch out (no backward,
no parameter update: Lightning's `training_step` returning None) and counts it in
`train/skipped_nonfinite`; the learning-rate schedule still advances. Under DDP the decision is
reduced over ranks (any rank non-finite: every rank errors or skips), so ranks never disagree on
whether to run backward. The total gradient norm before clipping is logged as `train/grad_norm`.

`grad_cache={"mini_batch": N}` (None or N = null: off) trains with GradCache instead of one plain
backward (embedkit/objectives/gradcache.py): the step then runs under Lightning's manual
optimisation, which takes over gradient clipping and accumulation from the Trainer
(`trainer_overrides`).
"""

from __future__ import annotations

import logging

import pytorch_lightning as pl
import torch

from embedkit.models.encoder import TextEncoder

log = logging.getLogger(__name__)

NONFINITE_POLICIES = ("error", "skip")


class NonFiniteLossError(FloatingPointError):
    """The training loss was NaN or Inf; the message names the step and the batch."""


class EmbeddingObjective(pl.LightningModule):
    def __init__(self, encoder: TextEncoder, lr: float, weight_decay: float = 0.0,
                 warmup_ratio: float = 0.1, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, on_nonfinite_loss: str = "error", grad_cache=None):
        super().__init__()
        if on_nonfinite_loss not in NONFINITE_POLICIES:
            raise ValueError(f"on_nonfinite_loss must be one of {NONFINITE_POLICIES}, "
                             f"got {on_nonfinite_loss!r}")
        self.encoder = encoder
        self.lr = lr
        self.weight_decay = weight_decay
        self.warmup_ratio = warmup_ratio
        self.betas = tuple(betas)
        self.eps = eps
        self.on_nonfinite_loss = on_nonfinite_loss
        self.skipped_nonfinite = 0
        from embedkit.objectives.gradcache import GradCache

        self.grad_cache = GradCache.from_config(grad_cache)
        # GradCache back-propagates chunk by chunk inside the step: manual optimisation.
        self.automatic_optimization = self.grad_cache is None

    def embed(self, batch) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def loss_from_embeddings(self, embeddings: dict[str, torch.Tensor], batch) -> torch.Tensor:
        raise NotImplementedError

    def batch_size_of(self, batch) -> int:
        first = next(iter(batch.values()))
        return int(first["input_ids"].shape[0] if isinstance(first, dict) else first.shape[0])

    def log_extras(self, embeddings: dict[str, torch.Tensor], batch) -> None:
        """Objective-specific diagnostics, logged without grad."""

    def eval_targets(self) -> dict[str, dict]:
        """What to evaluate after training: variant label -> keyword arguments of `suite.evaluate`.

        The plain objective evaluates its encoder once (label ""). Matryoshka returns one variant per
        dimension; M3 adds its sparse / multi-vector / hybrid retrieval modes, each with its own mteb
        model (`mteb_model=`) restricted to the task types that mode applies to (`task_types=`).
        """
        return {"": {"encoder": self.encoder}}

    def save_extras(self, out_dir) -> None:
        """Save what the objective adds beside the encoder (M3's heads); the encoder saves itself."""

    def load_extras(self, out_dir) -> None:
        """Load what `save_extras` wrote, for a trained stage that is evaluated again (a resumed run)."""

    def embed_tokens(self, side: str, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The part of `embed(batch)` that one tokenised column `batch[side]` makes, by itself.

        GradCache embeds each column in row chunks through this; objectives that support it
        return the same keys and values as `embed` does for that column."""
        raise NotImplementedError(f"{type(self).__name__} does not support GradCache")

    def trainer_overrides(self, trainer_cfg) -> dict:
        """Trainer arguments this objective must set itself (GradCache: clipping, accumulation)."""
        return self.grad_cache.trainer_overrides(trainer_cfg) if self.grad_cache else {}

    def training_step(self, batch, batch_idx):
        if self.grad_cache is not None:
            return self.grad_cache.training_step(self, batch, batch_idx)
        embeddings = self.embed(batch)
        self.last_embeddings = embeddings   # read (detached) by callbacks, e.g. dynamic mining
        loss = self.loss_from_embeddings(embeddings, batch)
        size = self.batch_size_of(batch)
        if not self.loss_is_usable(loss, batch_idx, size):
            return None
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        with torch.no_grad():
            self.log_extras(embeddings, batch)
        return loss

    # ------------------------------------------------------------------ numerics

    def loss_is_usable(self, loss: torch.Tensor, batch_idx: int, batch_size: int) -> bool:
        """True for a finite loss. A non-finite one raises NonFiniteLossError ("error") or is
        counted and reported as unusable ("skip"; the caller then returns None to skip the batch).

        Every training_step calls this before logging or returning its loss. It reads the loss
        on the host (one device sync per step) and, under DDP, reduces the answer over ranks.
        """
        local = bool(torch.isfinite(loss.detach()).all())
        finite = local
        if self._trainer is not None:
            finite = bool(self.trainer.strategy.reduce_boolean_decision(local, all=True))
        if finite:
            self._log_skipped(batch_size)
            return True
        value = loss.detach().float().cpu()
        what = (f"{value.item() if value.numel() == 1 else value.tolist()}" if not local
                else "on another rank")
        where = (f"global step {self.global_step} (epoch {self.current_epoch}, batch index "
                 f"{batch_idx}, batch size {batch_size})")
        if self.on_nonfinite_loss == "error":
            raise NonFiniteLossError(
                f"non-finite training loss ({what}) at {where} in {type(self).__name__}. Lower the "
                f"learning rate or check that batch; objective.on_nonfinite_loss=skip skips such "
                f"batches instead.")
        self.skipped_nonfinite += 1
        log.warning("skipping a non-finite training loss (%s) at %s: %d skipped so far",
                    what, where, self.skipped_nonfinite)
        self._log_skipped(batch_size)
        return False

    def _log_skipped(self, batch_size: int) -> None:
        if self._trainer is not None and self.on_nonfinite_loss == "skip":
            self.log("train/skipped_nonfinite", float(self.skipped_nonfinite), batch_size=batch_size)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Store the hyper-parameters as plain Python: Hydra hands nested arguments (grad_cache,
        eval variants, ...) over as OmegaConf nodes, which `torch.load(weights_only=True)` refuses
        to rebuild, so a resume would fail on its own checkpoint."""
        from omegaconf import OmegaConf

        def plain(value):
            if OmegaConf.is_config(value):
                return OmegaConf.to_container(value, resolve=True)
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return type(value)(plain(v) for v in value)
            return value

        for key in ("hyper_parameters", "datamodule_hyper_parameters"):
            if key in checkpoint:
                checkpoint[key] = plain(dict(checkpoint[key]))

    def on_before_optimizer_step(self, optimizer) -> None:
        """Log the total 2-norm of the gradients, before clipping (Lightning clips after this hook).

        Equal to Lightning's `grad_norm(self, 2)["grad_2.0_norm_total"]`, computed on the device:
        `grad_norm` gathers every parameter's norm into a CPU tensor, one device sync per parameter.
        """
        grads = [p.grad.detach() for p in self.parameters() if p.grad is not None]
        if not grads:
            return   # a skipped batch: nothing was back-propagated
        norms = torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])
        self.log("train/grad_norm", torch.linalg.vector_norm(norms), on_step=True, on_epoch=False)
        if self.grad_cache is not None:
            self.grad_cache.clip(self, optimizer)   # Lightning skips clipping in manual optimisation

    def configure_optimizers(self):
        from transformers import get_linear_schedule_with_warmup

        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            (no_decay if param.ndim < 2 or "LayerNorm" in name else decay).append(param)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=self.lr, betas=self.betas, eps=self.eps)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        if self.grad_cache is not None:
            total = self.grad_cache.total_steps(self.trainer)
        scheduler = get_linear_schedule_with_warmup(optimizer, int(self.warmup_ratio * total), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
