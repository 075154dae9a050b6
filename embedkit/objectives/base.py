"""What every embedding objective shares: the encoder it trains and the optimiser schedule.

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
