"""The text encoder every objective trains: a Hugging Face backbone, pooling, L2 normalisation.

BGE, BGE-M3 and Conan all score with the dot product of L2-normalised CLS vectors (FlagEmbedding
`modeling.py`; C-Pack §4), so CLS is the default pooling. Mean pooling is kept for ablations and for
checkpoints trained that way. The backbone is loaded *without* BERT's pooler layer: nothing uses it,
and under DDP an unused parameter either desynchronises gradients or raises "Expected to mark a
variable ready only once" (sentence-transformers issue #1454).

An optional linear projection after pooling (before normalisation) changes the output width, as
Conan-Embedding widens its 1024-wide BERT to 1792 dimensions with one fully connected layer (the
`2_Dense` module of TencentBAC/Conan-embedding-v1: W·x + b, identity activation). It is saved beside
the backbone as `projection.safetensors` and its size goes into `embedkit_encoder.json`.

Two speed switches change how the backbone runs, never what it computes (up to float rounding):
`unpad` runs it on the real tokens only (embedkit/models/unpadded.py) and `compile` wraps its
forward in `torch.compile`. Neither is saved with the model: they are settings of a run.
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
PROJECTION_WEIGHTS = "projection.safetensors"


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "mean":
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    raise ValueError(f"unknown pooling {pooling!r}; choose one of {POOLINGS}")


class TextEncoder(nn.Module):
    """Backbone + pooling (+ projection) (+ L2 normalisation).

    `forward` takes a tokenised batch, `encode` raw text. `projection_dim` adds a trainable
    `nn.Linear(hidden, projection_dim)` after pooling; `dim` is then the projected width.
    """

    def __init__(self, backbone: nn.Module, tokenizer, pooling: str = "cls", normalize: bool = True,
                 max_length: int = 512, projection_dim: int | None = None, unpad: bool = False,
                 compile: bool = False):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; choose one of {POOLINGS}")
        if projection_dim is not None and projection_dim < 1:
            raise ValueError(f"projection_dim must be a positive width or None, got {projection_dim}")
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.normalize = normalize
        self.max_length = max_length
        self.projection_dim = projection_dim
        self.projection = (nn.Linear(backbone.config.hidden_size, projection_dim)
                           if projection_dim is not None else None)
        self.unpad = bool(unpad)
        if self.unpad:
            from embedkit.models.unpadded import enable_unpadded

            enable_unpadded(backbone)
        if compile:
            # In place (nn.Module.compile): parameter names, state_dict and save_pretrained are
            # unchanged, which wrapping in torch.compile(backbone) would prefix with _orig_mod.
            # Shapes start static; the first new length makes the graph dynamic (one recompile).
            backbone.compile()

    @property
    def dim(self) -> int:
        return self.projection_dim if self.projection is not None else self.backbone.config.hidden_size

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      **_unused) -> torch.Tensor:
        # token_type_ids are all zero for single-segment input; leaving them out lets the backbone
        # use its buffered zeros and keeps the batch dicts model-agnostic (RoBERTa/XLM-R have none).
        if self.unpad and attention_mask is not None and not bool(attention_mask.all()):
            from embedkit.models.unpadded import unpadded_hidden_states

            return unpadded_hidden_states(self.backbone, input_ids, attention_mask)
        return self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_unused) -> torch.Tensor:
        emb = pool(self.hidden_states(input_ids, attention_mask), attention_mask, self.pooling)
        if self.projection is not None:
            emb = self.projection(emb)
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
        """Write the backbone (safetensors), the tokenizer, the pooling choice and the projection."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(out, safe_serialization=True)
        self.tokenizer.save_pretrained(out)
        settings = {"pooling": self.pooling, "normalize": self.normalize, "max_length": self.max_length}
        if self.projection is not None:
            from safetensors.torch import save_file

            save_file({k: v.detach().cpu().contiguous() for k, v in self.projection.state_dict().items()},
                      str(out / PROJECTION_WEIGHTS))
            settings["projection_dim"] = self.projection_dim
        else:
            (out / PROJECTION_WEIGHTS).unlink(missing_ok=True)   # not a stale head from an earlier save
        (out / ENCODER_CONFIG).write_text(json.dumps(settings, indent=2))
        return out

    def load_projection(self, path: str | Path) -> None:
        """Load `projection.safetensors` (written by `save_pretrained`) into this encoder's projection."""
        from safetensors.torch import load_file

        if self.projection is None:
            raise ValueError(f"{path}: this encoder has no projection to load weights into "
                             f"(build it with projection_dim)")
        self.projection.load_state_dict(load_file(str(path)))
