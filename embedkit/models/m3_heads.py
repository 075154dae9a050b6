"""BGE-M3's two extra heads on the encoder's last hidden states, and the three relevance scores.

Chen et al. 2024, "BGE M3-Embedding: Multi-Lingual, Multi-Functionality, Multi-Granularity Text
Embeddings Through Self-Knowledge Distillation" (arXiv:2402.03216), §3.2; FlagEmbedding
`research/BGE_M3/modeling.py` and `FlagEmbedding/finetune/embedder/encoder_only/m3/modeling.py`.
For hidden states H (B × L × D) of one tokenised batch:

- dense: e = normalize(H[:, 0]), the encoder's own pooled output; s_dense(q, p) = ⟨e_q, e_p⟩.
- sparse (lexical): w_t = ReLU(W_lex · H_t + b), W_lex ∈ R^{1×D}. The special tokens (CLS, SEP/EOS,
  PAD, UNK, found by the tokenizer's ids, never by spelling) and padding get weight 0, and a token
  that occurs several times keeps its largest weight. s_lex(q, p) = Σ_{t ∈ q ∩ p} w_qt · w_pt.
- multi-vector (ColBERT): E = normalize(W_mul · H[:, 1:] + b) on every token but CLS (the final
  SEP included), padding zeroed. s_mul(q, p) = (1/N_q) Σ_i max_j E_q[i] · E_p[j], with N_q the
  query's non-pad tokens after CLS.

The score functions are pure and batched: query rows against passage rows, (B, N) out.
`sparse_scores` scatters each row's weights (max-reduced) into a vector over the token ids that
occur in the batch, so its memory is B·U + N·U for U distinct ids, not the vocabulary size.
`multivec_scores` masks passage padding out of the max (FlagEmbedding's training code lets the
zeroed pad vectors take part, i.e. floors each max at 0; its inference code drops padding, as
here), so a score does not depend on how the batch was padded.

The heads are saved beside the encoder as `m3_heads.safetensors` + `m3_heads.json`
(`M3Heads.save_pretrained` / `from_pretrained`); FlagEmbedding writes `sparse_linear.pt` and
`colbert_linear.pt` instead, with the same layer shapes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from embedkit.models.encoder import TextEncoder, pool

log = logging.getLogger(__name__)

HEADS_WEIGHTS = "m3_heads.safetensors"
HEADS_CONFIG = "m3_heads.json"


def special_token_ids(tokenizer) -> list[int]:
    """The ids whose lexical weight is always 0: CLS, SEP/EOS, PAD and UNK (BOS is CLS for XLM-R)."""
    ids = set()
    for name in ("cls_token_id", "sep_token_id", "eos_token_id", "bos_token_id", "pad_token_id",
                 "unk_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            ids.add(int(value))
    return sorted(ids)


def dense_from_hidden(encoder: TextEncoder, hidden: torch.Tensor,
                      attention_mask: torch.Tensor) -> torch.Tensor:
    """What `encoder(input_ids, attention_mask)` returns, from hidden states already computed."""
    emb = pool(hidden, attention_mask, encoder.pooling)
    if encoder.projection is not None:
        emb = encoder.projection(emb)
    return F.normalize(emb, dim=-1) if encoder.normalize else emb


class M3Heads(nn.Module):
    """`sparse_linear` (D → 1) and `colbert_linear` (D → colbert_dim); either can be left out.

    A head that is not trained is not built, so no parameter sits without a gradient (DDP would
    otherwise need find_unused_parameters).
    """

    def __init__(self, hidden_size: int, special_ids: Iterable[int] = (), sparse: bool = True,
                 multivec: bool = True, colbert_dim: int | None = None):
        super().__init__()
        if colbert_dim is not None and colbert_dim <= 0:
            colbert_dim = None  # FlagEmbedding: -1 means the hidden size
        self.hidden_size = int(hidden_size)
        self.colbert_dim = int(colbert_dim or hidden_size)
        self.sparse_linear = nn.Linear(hidden_size, 1) if sparse else None
        self.colbert_linear = nn.Linear(hidden_size, self.colbert_dim) if multivec else None
        self.register_buffer("special_ids", torch.tensor(sorted(set(int(i) for i in special_ids)),
                                                         dtype=torch.long), persistent=False)

    @property
    def has_sparse(self) -> bool:
        return self.sparse_linear is not None

    @property
    def has_multivec(self) -> bool:
        return self.colbert_linear is not None

    def token_weights(self, hidden: torch.Tensor, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) lexical weights ReLU(linear(H)), zero on special tokens and padding."""
        if self.sparse_linear is None:
            raise RuntimeError("this M3Heads was built without the sparse head")
        weights = torch.relu(self.sparse_linear(hidden)).squeeze(-1)
        keep = attention_mask.bool() & ~torch.isin(input_ids, self.special_ids)
        return weights * keep.to(weights.dtype)

    def colbert_vectors(self, hidden: torch.Tensor,
                        attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L−1, colbert_dim) unit vectors for tokens 1.. (CLS dropped), zero on padding; and
        the (B, L−1) mask of real tokens."""
        if self.colbert_linear is None:
            raise RuntimeError("this M3Heads was built without the multi-vector head")
        mask = attention_mask[:, 1:]
        vecs = self.colbert_linear(hidden[:, 1:]) * mask.unsqueeze(-1).to(hidden.dtype)
        return F.normalize(vecs, dim=-1), mask

    # ------------------------------------------------------------------ save / load

    def config(self) -> dict:
        return {"hidden_size": self.hidden_size, "colbert_dim": self.colbert_dim,
                "sparse": self.has_sparse, "multivec": self.has_multivec,
                "special_ids": self.special_ids.tolist()}

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Write `m3_heads.safetensors` (the linears) and `m3_heads.json` (their shapes)."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(out / HEADS_WEIGHTS))
        (out / HEADS_CONFIG).write_text(json.dumps(self.config(), indent=2))
        return out

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "M3Heads":
        path = Path(path)
        if not (path / HEADS_CONFIG).exists():
            raise FileNotFoundError(f"{path}: no {HEADS_CONFIG} (M3 heads are saved by M3Heads.save_pretrained)")
        cfg = json.loads((path / HEADS_CONFIG).read_text())
        heads = cls(cfg["hidden_size"], special_ids=cfg.get("special_ids", ()),
                    sparse=cfg.get("sparse", True), multivec=cfg.get("multivec", True),
                    colbert_dim=cfg.get("colbert_dim"))
        heads.load_weights(path)
        return heads

    def load_weights(self, path: str | Path) -> bool:
        """Load the saved linears this module has from `path`; False (and fresh heads) if none are
        saved there, as FlagEmbedding does when `sparse_linear.pt`/`colbert_linear.pt` are absent."""
        from safetensors.torch import load_file

        weights = Path(path) / HEADS_WEIGHTS
        if not weights.exists():
            return False
        state = load_file(str(weights))
        own = self.state_dict()
        missing = [k for k in own if k not in state]
        if missing:
            raise ValueError(f"{weights} lacks {missing}: it was saved without a head this model trains")
        self.load_state_dict({k: state[k] for k in own})
        return True


def load_m3(path: str | Path, device: str = "cpu") -> tuple[TextEncoder, M3Heads]:
    """Reload an encoder and its M3 heads from one `save_pretrained` folder."""
    from embedkit.models.build import load_encoder

    return load_encoder(path, device=device), M3Heads.from_pretrained(path).to(device)


# ---------------------------------------------------------------------- scores


def dense_scores(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """(B, D) × (N, D) → (B, N) inner products of the (normalised) CLS vectors."""
    return q @ p.T


def lexical_vectors(weights: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """Scatter (R, L) token weights to (R, size) at `index`, keeping the max of repeated tokens.

    Weights are ≥ 0 (ReLU), so starting from zeros and reducing with amax is the max over the
    occurrences; the gradient goes to the occurrence that holds the max (split between ties).
    """
    out = weights.new_zeros(weights.shape[0], size)
    return out.scatter_reduce(1, index, weights, reduce="amax", include_self=True)


def sparse_scores(q_weights: torch.Tensor, q_ids: torch.Tensor, p_weights: torch.Tensor,
                  p_ids: torch.Tensor) -> torch.Tensor:
    """(B, N) lexical matching scores Σ_{shared tokens} w_q · w_p.

    q_weights/q_ids: (B, Lq) weights and token ids; p_weights/p_ids: (N, Lp). Weights must already
    be 0 on special tokens and padding (`M3Heads.token_weights`).
    """
    ids = torch.cat([q_ids.reshape(-1), p_ids.reshape(-1)])
    vocab, inverse = torch.unique(ids, return_inverse=True)
    q_index = inverse[:q_ids.numel()].view_as(q_ids)
    p_index = inverse[q_ids.numel():].view_as(p_ids)
    q_vec = lexical_vectors(q_weights, q_index, len(vocab))
    p_vec = lexical_vectors(p_weights, p_index, len(vocab))
    return q_vec @ p_vec.T


def multivec_scores(q_vecs: torch.Tensor, q_mask: torch.Tensor, p_vecs: torch.Tensor,
                    p_mask: torch.Tensor) -> torch.Tensor:
    """(B, N) late-interaction scores: mean over query tokens of the best passage-token match.

    q_vecs: (B, Lq, d) with mask (B, Lq); p_vecs: (N, Lp, d) with mask (N, Lp) (CLS already
    dropped, `M3Heads.colbert_vectors`). Padded passage tokens never win the max; padded query
    tokens are left out of the mean.
    """
    b, lq, dim = q_vecs.shape
    n, lp, _ = p_vecs.shape
    # one (B·Lq) × (N·Lp) matrix product, then the max over each passage's tokens
    sim = (q_vecs.reshape(b * lq, dim) @ p_vecs.reshape(n * lp, dim).T).view(b, lq, n, lp)
    pad = ~p_mask.bool()[None, None]
    if torch.is_grad_enabled() and sim.requires_grad:
        sim = sim.masked_fill(pad, torch.finfo(sim.dtype).min)
    else:
        sim.masked_fill_(pad, torch.finfo(sim.dtype).min)  # evaluation: no second copy
    best = sim.amax(-1)  # (B, Lq, N)
    q_real = q_mask.bool()[:, :, None] & p_mask.bool().any(-1)[None, None, :]
    best = best.masked_fill(~q_real, 0.0)
    return best.sum(1) / q_mask.sum(-1, keepdim=True).clamp(min=1).to(best.dtype)
