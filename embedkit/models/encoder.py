"""The text encoder every objective trains: a Hugging Face backbone, pooling, L2 normalisation.

BGE, BGE-M3 and Conan all score with the dot product of L2-normalised CLS vectors (FlagEmbedding
`modeling.py`; C-Pack §4), so CLS is the default pooling. Mean pooling is kept for ablations and for
checkpoints trained that way. The backbone is loaded *without* BERT's pooler layer: nothing uses it,
and under DDP an unused parameter either desynchronises gradients or raises "Expected to mark a
variable ready only once" (sentence-transformers issue #1454).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

POOLINGS = ("cls", "mean")
ENCODER_CONFIG = "embedkit_encoder.json"


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "mean":
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    raise ValueError(f"unknown pooling {pooling!r}; choose one of {POOLINGS}")


class TextEncoder(nn.Module):
    """Backbone + pooling (+ L2 normalisation). `forward` takes a tokenised batch, `encode` raw text."""

    def __init__(self, backbone: nn.Module, tokenizer, pooling: str = "cls", normalize: bool = True,
                 max_length: int = 512):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; choose one of {POOLINGS}")
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.normalize = normalize
        self.max_length = max_length

    @property
    def dim(self) -> int:
        return self.backbone.config.hidden_size

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      **_unused) -> torch.Tensor:
        # token_type_ids are all zero for single-segment input; leaving them out lets the backbone
        # use its buffered zeros and keeps the batch dicts model-agnostic (RoBERTa/XLM-R have none).
        return self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_unused) -> torch.Tensor:
        emb = pool(self.hidden_states(input_ids, attention_mask), attention_mask, self.pooling)
        return F.normalize(emb, dim=-1) if self.normalize else emb

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 128, max_length: int | None = None,
               show_progress: bool = False, desc: str = "encode") -> np.ndarray:
        """Embed texts in length-sorted batches (less padding), returned in the input order."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        order = np.argsort([-len(t) for t in texts], kind="stable")
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        starts: Iterable[int] = range(0, len(texts), batch_size)
        if show_progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=desc, total=(len(texts) + batch_size - 1) // batch_size,
                          leave=False)
        for start in starts:
            idx = order[start:start + batch_size]
            batch = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                   max_length=max_length or self.max_length, return_tensors="pt")
            emb = self(batch["input_ids"].to(device), batch["attention_mask"].to(device))
            out[idx] = emb.float().cpu().numpy()
        self.train(was_training)
        return out

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Write the backbone (safetensors), the tokenizer and the pooling choice to `out_dir`."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(out, safe_serialization=True)
        self.tokenizer.save_pretrained(out)
        (out / ENCODER_CONFIG).write_text(json.dumps(
            {"pooling": self.pooling, "normalize": self.normalize, "max_length": self.max_length},
            indent=2))
        return out
