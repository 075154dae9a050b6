"""What every embedding objective shares: the encoder it trains, the step, the optimiser schedule.

A step is split in two: `embed(batch)` runs the encoder and returns named embedding tensors, and
`loss_from_embeddings(embeddings, batch)` is a pure function of them. Wrappers rely on the split:
Matryoshka truncates the embeddings and calls the inner loss once per dimension without running
the encoder again, and GradCache can embed in chunks without grad, then replay.

AdamW with linear warm-up then linear decay to zero is what FlagEmbedding (via the HF Trainer),
RetroMAE and Conan all use; weight decay skips biases and LayerNorm weights, as HF does.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch

from embedkit.models.encoder import TextEncoder


class EmbeddingObjective(pl.LightningModule):
    def __init__(self, encoder: TextEncoder, lr: float, weight_decay: float = 0.0,
                 warmup_ratio: float = 0.1, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        super().__init__()
        self.encoder = encoder
        self.lr = lr
        self.weight_decay = weight_decay
        self.warmup_ratio = warmup_ratio
        self.betas = tuple(betas)
        self.eps = eps

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

    def training_step(self, batch, batch_idx):
        embeddings = self.embed(batch)
        loss = self.loss_from_embeddings(embeddings, batch)
        size = self.batch_size_of(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        with torch.no_grad():
            self.log_extras(embeddings, batch)
        return loss

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
        scheduler = get_linear_schedule_with_warmup(optimizer, int(self.warmup_ratio * total), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
