"""BGE-M3: dense, sparse and multi-vector retrieval from one encoder, with self-knowledge distillation.

Paper: Chen, Xiao, Zhang, Luo, Lian, Liu, "BGE M3-Embedding: Multi-Lingual, Multi-Functionality,
Multi-Granularity Text Embeddings Through Self-Knowledge Distillation" (2024, arXiv:2402.03216),
§3.2-3.3. Code: FlagEmbedding `research/BGE_M3/modeling.py` and
`FlagEmbedding/finetune/embedder/encoder_only/m3/modeling.py` (paraphrased in
/work/shared/reference/flagembedding.md §4; nothing is copied).

Heads (embedkit/models/m3_heads.py): s_dense = ⟨e_q, e_p⟩ on the normalised pooled vectors (CLS in the
paper and with model=hf; mean for the mini tiny_zh model, see its config); s_lex = Σ over
shared tokens of w_q·w_p with w = ReLU(Linear(D,1)(h)), max over repeats, specials zeroed;
s_mul = mean over query tokens of the max ⟨E_q[i], E_p[j]⟩ with E = normalize(Linear(D,D)(h))
on every token but CLS. Every score is divided by the temperature τ in training.

For B queries and the flattened passages (B·G rows; row i·G is query i's positive, the other
rows of its group its hard negatives, as `info_nce_loss`), each head scores the full (B, B·G)
in-batch matrix. With InfoNCE(s) = −(1/B) Σ_i log softmax_j(s_ij / τ)[i·G]:

    s_inter = w_dense·s_dense + w_lex·s_lex + w_mul·s_mul           (w = 1, 0.3, 1)
    L  = (λ_dense·L_dense + L_inter + λ_lex·L_lex + λ_mul·L_mul) / 4  (λ = 1, 0.1, 1)
    L'_x = −(1/B) Σ_i Σ_j p*_ij · log softmax_j(s_x,ij / τ),  p* = softmax(stopgrad(s_inter) / τ)
    L' = (λ_dense·L'_dense + λ_lex·L'_lex + λ_mul·L'_mul) / 3
    loss = (L + L') / 2             (self-distillation on; L alone when it is off)

Negatives: the official code scores sparse, multi-vector and the ensemble over the local in-batch
matrix (every query against all B·G passages of the device's batch) and gathers passages across
devices only for dense (reference §4.2). Here too: with `negatives_cross_device=True` under DDP,
L_dense is the cross-entropy of this rank's queries against every rank's passages (all-gathered
with gradient, as InfoNCE's switch), while sparse, multi-vector, s_inter and L' use the local
(B, B·G) matrices, the dense one being the local block of the gathered scores (FlagEmbedding slices
it back the same way). On one device, or with the switch off, every term is local.
The external-teacher "m3_kd_loss" (reranker scores in the data) is not implemented either.

Switches, for ablations:
- `heads`: any non-empty subset of [dense, sparse, multivec]. With k heads, s_inter sums the
  trained heads, L divides by k + 1 and L' by k. With a single head, L = L_head (the ensemble
  would be the head itself) and there is no self-distillation.
- `self_distill`: false gives L only; `self_distill_start_step` delays it (FlagEmbedding's
  `self_distill_start_step`; here distillation is on once global_step ≥ that value).

Defaults (reference §4): τ = 0.02, ensemble weights 1/0.3/1 and loss weights 1/0.1/1 (hard-coded
in FlagEmbedding's `ensemble_score` / loss), train_group_size 8 in the paper's fine-tuning
(7 negatives). The official unified fine-tune script trains at lr 5e-6 (README: 1e-5); the mini
scale here uses a larger one for a fresh tiny BERT (conf/objective/m3.yaml).

Evaluation (`eval_targets`): the dense encoder on the whole suite (label ""), then the retrieval
modes on the suite's Retrieval and Reranking tasks through an mteb search model
(embedkit/eval/m3_search.py): "sparse", "multivec", "dense+sparse" and "all", each a weighted sum
w1·dense + w2·sparse + w3·multi-vector. Defaults: "all" = [0.4, 0.2, 0.4], the BGE-M3 README's
example of `compute_score` weights; "dense+sparse" = (1, 0.3), as FlagEmbedding's MKQA evaluation
(`research/C_MTEB/MKQA`, reference §4.5). A mode needing a head that was not trained is skipped.
The heads are saved beside the encoder (`save_extras` → `save_heads`).

`embed` returns the dense vectors as "query" / "passages" (as InfoNCE), plus per-token tensors
("*_sparse", "*_colbert", ...). Wrapped in Matryoshka, set `truncate_keys: [query, passages]` so
that only the dense vectors are cut.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from embedkit.models.encoder import TextEncoder
from embedkit.models.m3_heads import (
    M3Heads,
    dense_from_hidden,
    dense_scores,
    multivec_scores,
    sparse_scores,
    special_token_ids,
)
from embedkit.objectives.base import EmbeddingObjective

log = logging.getLogger(__name__)

HEADS = ("dense", "sparse", "multivec")
DEFAULT_ENSEMBLE_WEIGHTS = {"dense": 1.0, "sparse": 0.3, "multivec": 1.0}
DEFAULT_LOSS_WEIGHTS = {"dense": 1.0, "sparse": 0.1, "multivec": 1.0}
# label -> (w_dense, w_sparse, w_multivec) of the eval-time hybrid score
DEFAULT_EVAL_VARIANTS = {
    "sparse": (0.0, 1.0, 0.0),
    "multivec": (0.0, 0.0, 1.0),
    "dense+sparse": (1.0, 0.3, 0.0),   # FlagEmbedding research/C_MTEB/MKQA
    "all": (0.4, 0.2, 0.4),            # BGE-M3 README example of compute_score weights
}
EVAL_TASK_TYPES = ("Retrieval", "Reranking")


def _check_heads(heads: Sequence[str]) -> tuple[str, ...]:
    heads = tuple(dict.fromkeys(str(h) for h in heads))
    unknown = [h for h in heads if h not in HEADS]
    if unknown or not heads:
        raise ValueError(f"heads must be a non-empty subset of {list(HEADS)}, got {list(heads)}")
    return tuple(h for h in HEADS if h in heads)


def m3_loss(scores: Mapping[str, torch.Tensor], group_size: int, temperature: float,
            ensemble_weights: Mapping[str, float] = DEFAULT_ENSEMBLE_WEIGHTS,
            loss_weights: Mapping[str, float] = DEFAULT_LOSS_WEIGHTS,
            self_distill: bool = True,
            dense_cross: tuple[torch.Tensor, torch.Tensor] | None = None,
            ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The M3 loss from raw (B, B·G) score matrices of the trained heads (keys from HEADS).

    dense_cross: (raw dense scores against every rank's passages, target columns); when given,
    L_dense is their cross-entropy instead of the local matrix's (cross-device negatives).

    Returns (loss, terms): terms holds every component, e.g. "dense", "inter", "main" (L),
    "distill_dense", "distill" (L').
    """
    heads = [h for h in HEADS if h in scores]
    if not heads:
        raise ValueError("m3_loss needs the score matrix of at least one head")
    first = scores[heads[0]]
    target = torch.arange(first.shape[0], device=first.device) * group_size
    scaled = {h: scores[h] / temperature for h in heads}
    terms = {h: F.cross_entropy(scaled[h], target) for h in heads}
    if dense_cross is not None and "dense" in terms:
        terms["dense"] = F.cross_entropy(dense_cross[0] / temperature, dense_cross[1])
    if len(heads) == 1:
        terms["main"] = terms[heads[0]]
        return terms["main"], terms
    inter = sum(ensemble_weights[h] * scaled[h] for h in heads)
    terms["inter"] = F.cross_entropy(inter, target)
    main = (sum(loss_weights[h] * terms[h] for h in heads) + terms["inter"]) / (len(heads) + 1)
    terms["main"] = main
    if not self_distill:
        return main, terms
    teacher = torch.softmax(inter.detach(), dim=-1)
    for h in heads:
        terms[f"distill_{h}"] = -(teacher * torch.log_softmax(scaled[h], dim=-1)).sum(-1).mean()
    distill = sum(loss_weights[h] * terms[f"distill_{h}"] for h in heads) / len(heads)
    terms["distill"] = distill
    return (main + distill) / 2, terms


class M3(EmbeddingObjective):
    def __init__(self, encoder: TextEncoder, temperature: float = 0.02, train_group_size: int = 1,
                 heads: Sequence[str] = HEADS, self_distill: bool = True,
                 self_distill_start_step: int = 0,
                 ensemble_weights: Mapping[str, float] | None = None,
                 loss_weights: Mapping[str, float] | None = None,
                 colbert_dim: int | None = None,
                 eval_variants: Mapping[str, Sequence[float]] | None = None,
                 query_instruction: str | None = None, heads_init_from: str | None = None,
                 lr: float = 3e-4, weight_decay: float = 0.01, warmup_ratio: float = 0.1,
                 on_nonfinite_loss: str = "error", grad_cache=None,
                 negatives_cross_device: bool = False):
        """
        heads: the heads to train (a subset of dense, sparse, multivec).
        self_distill / self_distill_start_step: L' on or off, and from which optimiser step.
        ensemble_weights: w of s_inter per head (default 1 / 0.3 / 1).
        loss_weights: λ of each head in L and L' (default 1 / 0.1 / 1).
        colbert_dim: output width of the multi-vector head; None or −1 = the hidden size.
        eval_variants: {label: [w_dense, w_sparse, w_multivec]} of the retrieval modes to evaluate;
            None = sparse, multivec, dense+sparse (1, 0.3), all (0.4, 0.2, 0.4).
        query_instruction: prepended to retrieval / re-ranking queries by the search model (the
            suite's own instruction only reaches the dense MtebEncoder).
        heads_init_from: a folder saved with `save_heads` to start the heads from; fresh heads if
            it holds none (FlagEmbedding's behaviour when the head files are absent).
        """
        super().__init__(encoder, lr=lr, weight_decay=weight_decay, warmup_ratio=warmup_ratio,
                         on_nonfinite_loss=on_nonfinite_loss, grad_cache=grad_cache)
        if not 0 < temperature <= 1:
            raise ValueError(f"temperature must be in (0, 1], got {temperature}")
        self.temperature = float(temperature)
        self.train_group_size = int(train_group_size)
        self.heads_trained = _check_heads(heads)
        self.self_distill = bool(self_distill)
        self.self_distill_start_step = int(self_distill_start_step)
        self.negatives_cross_device = bool(negatives_cross_device)
        self.ensemble_weights = {**DEFAULT_ENSEMBLE_WEIGHTS, **dict(ensemble_weights or {})}
        self.loss_weights = {**DEFAULT_LOSS_WEIGHTS, **dict(loss_weights or {})}
        for name, weights in (("ensemble_weights", self.ensemble_weights),
                              ("loss_weights", self.loss_weights)):
            if set(weights) - set(HEADS):
                raise ValueError(f"{name} keys must be among {list(HEADS)}, got {list(weights)}")
        variants = DEFAULT_EVAL_VARIANTS if eval_variants is None else eval_variants
        self.eval_variants = {}
        for label, w in dict(variants).items():
            w = tuple(float(x) for x in w)
            if len(w) == 2:  # (dense, sparse)
                w = (*w, 0.0)
            if len(w) != 3 or not any(w):
                raise ValueError(f"eval variant {label!r}: give 3 weights (dense, sparse, multivec), "
                                 f"not all zero; got {list(w)}")
            self.eval_variants[str(label)] = w
        self.query_instruction = query_instruction or None
        self.heads = M3Heads(encoder.backbone.config.hidden_size,
                             special_ids=special_token_ids(encoder.tokenizer),
                             sparse="sparse" in self.heads_trained,
                             multivec="multivec" in self.heads_trained, colbert_dim=colbert_dim)
        if heads_init_from:
            if self.heads.load_weights(heads_init_from):
                log.info("M3 heads initialised from %s", heads_init_from)
            else:
                log.info("%s holds no M3 heads; they start fresh", heads_init_from)
        self._saved_dir: Path | None = None
        self.save_hyperparameters(ignore=["encoder"])

    # ------------------------------------------------------------------ training

    def _encode(self, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ids, mask = features["input_ids"], features["attention_mask"]
        hidden = self.encoder.hidden_states(ids, mask)
        out = {"": dense_from_hidden(self.encoder, hidden, mask)}
        if self.heads.has_sparse:
            out["_sparse"] = self.heads.token_weights(hidden, ids, mask)
            out["_ids"] = ids
        if self.heads.has_multivec:
            out["_colbert"], out["_colbert_mask"] = self.heads.colbert_vectors(hidden, mask)
        return out

    def embed(self, batch) -> dict[str, torch.Tensor]:
        """query / passages: dense vectors; *_sparse + *_ids: token weights and ids; *_colbert +
        *_colbert_mask: token vectors (CLS dropped) and their mask. Only trained heads appear."""
        out = {}
        for side in ("query", "passages"):
            out.update(self.embed_tokens(side, batch[side]))
        return out

    def embed_tokens(self, side, features) -> dict[str, torch.Tensor]:
        return {side + key: value for key, value in self._encode(features).items()}

    def scores(self, emb: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Raw (B, B·G) score matrices of the trained heads."""
        out = {}
        if "dense" in self.heads_trained:
            out["dense"] = dense_scores(emb["query"], emb["passages"])
        if "sparse" in self.heads_trained:
            out["sparse"] = sparse_scores(emb["query_sparse"], emb["query_ids"],
                                          emb["passages_sparse"], emb["passages_ids"])
        if "multivec" in self.heads_trained:
            out["multivec"] = multivec_scores(emb["query_colbert"], emb["query_colbert_mask"],
                                              emb["passages_colbert"], emb["passages_colbert_mask"])
        return out

    def distill_active(self) -> bool:
        if not self.self_distill:
            return False
        step = self.global_step if self._trainer is not None else 0
        return step >= self.self_distill_start_step

    def loss_from_embeddings(self, embeddings, batch) -> torch.Tensor:
        scores = self.scores(embeddings)
        first = next(iter(scores.values()))
        if first.shape[1] % first.shape[0]:
            raise ValueError(f"{first.shape[1]} passages do not split into groups for {first.shape[0]} queries")
        dense_cross = None
        if self.negatives_cross_device and "dense" in scores:
            from embedkit.objectives.cross_device import gather_rows

            q, p = embeddings["query"], embeddings["passages"]
            all_p, rank = gather_rows(p)
            if all_p is not p:
                full = dense_scores(q, all_p)
                group = p.shape[0] // q.shape[0]
                target = (rank * q.shape[0] + torch.arange(q.shape[0], device=q.device)) * group
                dense_cross = (full, target)
                scores["dense"] = full[:, rank * p.shape[0]:(rank + 1) * p.shape[0]]
        loss, terms = m3_loss(scores, first.shape[1] // first.shape[0], self.temperature,
                              self.ensemble_weights, self.loss_weights, self.distill_active(),
                              dense_cross=dense_cross)
        self._last_scores = {k: v.detach() for k, v in scores.items()}  # for log_extras
        if self._trainer is not None and self.trainer.training:
            for name, value in terms.items():
                key = f"train/loss_{name}" if not name.startswith("distill") else f"train/{name}"
                self.log(key, value.detach(), batch_size=first.shape[0])
        return loss

    def log_extras(self, embeddings, batch) -> None:
        scores = getattr(self, "_last_scores", None) or self.scores(embeddings)
        self._last_scores = None
        b, n = next(iter(scores.values())).shape
        g = n // b
        rows = torch.arange(b, device=embeddings["query"].device)
        for head, s in scores.items():
            self.log(f"train/pos_score_{head}", s[rows, rows * g].mean(), batch_size=b)

    # ------------------------------------------------------------------ saving

    def save_heads(self, out_dir) -> Path:
        """Write the trained heads beside the encoder (`m3_heads.safetensors` + `.json`)."""
        self._saved_dir = Path(out_dir)
        return self.heads.save_pretrained(out_dir)

    def save_extras(self, out_dir) -> None:
        self.save_heads(out_dir)

    def load_extras(self, out_dir) -> None:
        if not self.heads.load_weights(out_dir):
            raise FileNotFoundError(f"{out_dir}: no trained M3 heads to evaluate (m3_heads.safetensors)")
        self._saved_dir = Path(out_dir)

    # ------------------------------------------------------------------ evaluation

    def representer(self, batch_size: int = 64):
        from embedkit.eval.m3_search import M3Representer

        return M3Representer(self.encoder, self.heads, batch_size=batch_size)

    def sparse_weights(self, texts: Sequence[str]) -> list[dict[str, float]]:
        """{token: weight} per text (weights > 0 only, largest first), for inspection."""
        return self.representer().sparse_weights(texts)

    def fingerprint(self) -> str:
        """A short hash of the encoder and head weights: a revision that changes with training."""
        digest = hashlib.sha1()
        for name, tensor in sorted(self.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()[:12]

    def eval_targets(self, model_name: str | None = None, revision: str | None = None,
                     output_dir: str | Path | None = None) -> dict[str, dict]:
        """"" → the dense encoder on the full suite; each retrieval mode → an M3Search model on
        Retrieval and Reranking. The search models share one cache of text representations and
        component scores, so each text is encoded and each score matrix computed once.

        model_name / revision name the mteb results (default: embedkit/m3 and a hash of the
        weights, plus the variant label). A few {token: weight} examples go to
        `<output_dir>/sparse_weights.json`; output_dir defaults to the folder above the last
        `save_heads` folder (the recipe's row folder), or no dump if the heads were never saved.
        """
        from embedkit.eval.m3_search import M3Search

        targets: dict[str, dict] = {}
        if "dense" in self.heads_trained:
            targets[""] = {"encoder": self.encoder}
        name = model_name or "embedkit/m3"
        revision = revision or f"m3-{self.fingerprint()}"
        if output_dir is None and self._saved_dir is not None:
            output_dir = self._saved_dir.parent
        representer = self.representer()
        dumped = False
        for label, weights in self.eval_variants.items():
            needs = [h for h, w in zip(HEADS, weights) if w]
            missing = [h for h in needs if h not in self.heads_trained]
            if missing:
                log.info("M3: skipping eval variant %r, it needs untrained head(s) %s", label, missing)
                continue
            dump = None
            if output_dir is not None and weights[1] and not dumped:
                dump, dumped = Path(output_dir) / "sparse_weights.json", True
            search = M3Search(representer, weights=weights, model_name=name,
                              revision=f"{revision}-{label}", query_instruction=self.query_instruction,
                              sparse_examples_path=dump)
            targets[label] = {"mteb_model": search, "task_types": list(EVAL_TASK_TYPES)}
        return targets
