"""BGE-M3: dense, sparse and multi-vector retrieval from one encoder, with self-knowledge distillation.

`M3Loss` is the loss (formula, paper, arguments, batch: its docstring); `M3` trains it as a
LightningModule with the shared optimisation of embedkit/objectives/base.py. Code: FlagEmbedding
`research/BGE_M3/modeling.py` and `FlagEmbedding/finetune/embedder/encoder_only/m3/modeling.py`
(paraphrased in /work/shared/reference/flagembedding.md §4; nothing is copied). The official
unified fine-tune script trains at lr 5e-6 (README: 1e-5); the mini scale here uses a larger one
for a fresh tiny BERT (conf/objective/m3.yaml).

Negatives: the official code scores sparse, multi-vector and the ensemble over the local in-batch
matrix (every query against all B·G passages of the device's batch) and gathers passages across
devices only for dense (reference §4.2). Here too: with `negatives_cross_device=True` under DDP,
L_dense is the cross-entropy of this rank's queries against every rank's passages (all-gathered
with gradient, as InfoNCE's switch), while sparse, multi-vector, s_inter and L' use the local
(B, B·G) matrices, the dense one being the local block of the gathered scores (FlagEmbedding slices
it back the same way). On one device, or with the switch off, every term is local.

Teacher-score distillation (`kd_loss_type`, FlagEmbedding's `--knowledge_distillation` with
`--kd_loss_type`): FlagEmbedding's M3 (`EncoderOnlyEmbedderM3Model.forward`) hands the teacher
targets to every head's loss, so L_dense, L_lex, L_mul and L_inter each become the distillation loss
of embedkit/objectives/infonce.py `contrastive_loss` (kl_div: the teacher cross-entropy over the
row's group plus InfoNCE; m3_kd_loss: the listwise loss over the in-batch row, the M3 model's own
default) on that head's scores; L_dense keeps the cross-device columns when they are on. The
self-distillation L' is unchanged (its teacher is s_inter, not the external one).

Evaluation (`eval_targets`): the dense encoder on the whole suite (label ""), then the retrieval
modes on the suite's Retrieval and Reranking tasks through an mteb search model
(embedkit/eval/m3_search.py): "sparse", "multivec", "dense+sparse" and "all", each a weighted sum
w1·dense + w2·sparse + w3·multi-vector. A mode needing a head that was not trained is skipped.
The heads are saved beside the encoder (`save_extras` → `save_heads`).

Weights (`weights_from`, WEIGHT_PRESETS): the ensemble weights w of s_inter, the loss weights λ
and the eval modes' hybrid weights come as one named preset; a value given explicitly overrides it.
  official (default): FlagEmbedding's code. w = (1, 0.3, 1) and λ = (1, 0.1, 1) hard-coded in
      `research/BGE_M3/modeling.py` and `finetune/embedder/encoder_only/m3/modeling.py`
      (`ensemble_score`, the /4 and /3 sums); dense+sparse (1, 0.3, 0) and all (1, 0.3, 1), the
      weights of `research/C_MTEB/MKQA` (`hybrid_retrieval/step0-hybrid_search_results.py`,
      `multi_vector_rerank/step0-rerank_results.py`).
  paper: the published paper (ACL Findings 2024 = arXiv:2402.03216 v3 on, "M3-Embedding:
      Multi-Linguality, ..."). §3.3 sets w1 = 1, w2 = 0.3, w3 = 1 and λ1 = 1, λ2 = 0.1, λ3 = 1 for
      training (Eq. 3, 4, 6); §4.1-4.2 evaluate MIRACL and MKQA with Dense+Sparse (1, 0.3, 0) and
      All (1, 0.3, 1) in Eq. 1. The same numbers as `official`.
  preprint: the first preprint ("BGE M3-Embedding: Multi-Lingual, ...", the PDF FlagEmbedding ships
      as `research/BGE_M3/BGE_M3.pdf`). Plain sums throughout: s_rank = s_dense + s_lex + s_mul
      (§3.2; footnotes 7-8: Dense+Sparse and All re-rank by "the sum" of the scores), s_inter the
      same sum (Eq. 2), L' = (L'_dense + L'_lex + L'_mul)/3 (Eq. 4): w = λ = (1, 1, 1). It does
      not write how the heads' L combine and writes L_final = L + L' (not halved); the
      normalisation below is kept, a constant factor of the loss.
The default is the official code: it trained the released BAAI/bge-m3, and it fixes every number
(the published paper agrees with it; the preprint's plain sums were revised away). The MLDR
(long-document) weights of §4.3 (dense+sparse 0.2, 0.8; all 0.15, 0.5, 0.35) are not a preset:
the mini C-MTEB tasks are short texts, as MIRACL and MKQA. FlagEmbedding's `compute_score` defaults
to (1, 1, 1) and its README example uses (0.4, 0.2, 0.4) (this file's earlier default); neither
is what its evaluations ran.

Heads warm-up (paper App. B.1: about 6,000 steps warming up dense, sparse and multi-vector before
unified fine-tuning with self-distillation; FlagEmbedding #942: 1 epoch dense, then 1 epoch sparse
+ multi-vector, then 1 epoch unified) as a chain of stages, each initialised from the one before
(`model.init_from`, which also sets `heads_init_from`):
  dense:   heads: [dense]                           (FlagEmbedding unified_finetuning=False)
  heads:   fix_encoder: true, self_distill: false   (unified_finetuning=True, fix_encoder=True, #1074)
  unified: self_distill: true                       (unified_finetuning=True, use_self_distill=True)
A head the previous stage did not train (the dense stage saves none) starts fresh; the others load.
Whether the encoder was frozen in the paper's warm-up is not known (FlagEmbedding #1499, open);
`fix_encoder` is FlagEmbedding's switch for the heads-only stage.

`embed` returns the dense vectors as "query" / "passages" (as InfoNCE), plus per-token tensors
("*_sparse", "*_colbert", ...). Wrapped in Matryoshka, set `truncate_keys: [query, passages]` so
that only the dense vectors are cut.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from embedkit.models.encoder import TextEncoder
from embedkit.models.m3_heads import (
    HEADS_WEIGHTS,
    M3Heads,
    dense_from_hidden,
    dense_scores,
    multivec_scores,
    sparse_scores,
    special_token_ids,
)
from embedkit.objectives.base import EmbeddingLoss, EmbeddingObjective
from embedkit.objectives.infonce import (
    check_kd_loss_type,
    check_teacher_temperature,
    contrastive_loss,
    teacher_targets,
)

log = logging.getLogger(__name__)

HEADS = ("dense", "sparse", "multivec")
PRESET_KEYS = ("ensemble_weights", "loss_weights", "eval_variants")
# name -> the three weight settings; sources in the module docstring. Eval variants: label ->
# (w_dense, w_sparse, w_multivec) of the eval-time hybrid score.
WEIGHT_PRESETS = {
    "official": {   # FlagEmbedding's code and its MKQA evaluation scripts
        "ensemble_weights": {"dense": 1.0, "sparse": 0.3, "multivec": 1.0},
        "loss_weights": {"dense": 1.0, "sparse": 0.1, "multivec": 1.0},
        "eval_variants": {"sparse": (0.0, 1.0, 0.0), "multivec": (0.0, 0.0, 1.0),
                          "dense+sparse": (1.0, 0.3, 0.0), "all": (1.0, 0.3, 1.0)},
    },
    "paper": {      # ACL Findings 2024 (arXiv v3 on) §3.3 and §4.1-4.2
        "ensemble_weights": {"dense": 1.0, "sparse": 0.3, "multivec": 1.0},
        "loss_weights": {"dense": 1.0, "sparse": 0.1, "multivec": 1.0},
        "eval_variants": {"sparse": (0.0, 1.0, 0.0), "multivec": (0.0, 0.0, 1.0),
                          "dense+sparse": (1.0, 0.3, 0.0), "all": (1.0, 0.3, 1.0)},
    },
    "preprint": {   # the first preprint: plain sums (§3.2, Eq. 2 and 4, §4.1 footnotes 7-8)
        "ensemble_weights": {"dense": 1.0, "sparse": 1.0, "multivec": 1.0},
        "loss_weights": {"dense": 1.0, "sparse": 1.0, "multivec": 1.0},
        "eval_variants": {"sparse": (0.0, 1.0, 0.0), "multivec": (0.0, 0.0, 1.0),
                          "dense+sparse": (1.0, 1.0, 0.0), "all": (1.0, 1.0, 1.0)},
    },
}
DEFAULT_WEIGHTS_FROM = "official"
DEFAULT_ENSEMBLE_WEIGHTS = WEIGHT_PRESETS[DEFAULT_WEIGHTS_FROM]["ensemble_weights"]
DEFAULT_LOSS_WEIGHTS = WEIGHT_PRESETS[DEFAULT_WEIGHTS_FROM]["loss_weights"]
DEFAULT_EVAL_VARIANTS = WEIGHT_PRESETS[DEFAULT_WEIGHTS_FROM]["eval_variants"]
EVAL_TASK_TYPES = ("Retrieval", "Reranking")


def _check_heads(heads: Sequence[str]) -> tuple[str, ...]:
    heads = tuple(dict.fromkeys(str(h) for h in heads))
    unknown = [h for h in heads if h not in HEADS]
    if unknown or not heads:
        raise ValueError(f"heads must be a non-empty subset of {list(HEADS)}, got {list(heads)}")
    return tuple(h for h in HEADS if h in heads)


def _plain(value):
    """Plain Python for an OmegaConf node (Hydra passes nested config values as nodes)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def weight_preset(weights_from: str, presets: Mapping[str, Mapping] | None = None) -> dict:
    """The preset `weights_from` names: {"ensemble_weights", "loss_weights", "eval_variants"}, from
    `presets` (None: WEIGHT_PRESETS)."""
    presets = WEIGHT_PRESETS if presets is None else _plain(presets)
    if weights_from not in presets:
        raise ValueError(f"weights_from={weights_from!r} is not a weight preset; choose one of "
                         f"{list(presets)} (objective.weights_from)")
    preset = _plain(presets[weights_from])
    missing = [k for k in PRESET_KEYS if k not in (preset or {})]
    if missing:
        raise ValueError(f"weight preset {weights_from!r} lacks {missing} "
                         f"(objective.weight_presets.{weights_from} needs {list(PRESET_KEYS)})")
    return preset


def m3_loss(scores: Mapping[str, torch.Tensor], group_size: int, temperature: float,
            ensemble_weights: Mapping[str, float] = DEFAULT_ENSEMBLE_WEIGHTS,
            loss_weights: Mapping[str, float] = DEFAULT_LOSS_WEIGHTS,
            self_distill: bool = True,
            dense_cross: tuple[torch.Tensor, int] | None = None,
            teacher: torch.Tensor | None = None, kd_loss_type: str | None = None,
            ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The M3 loss from raw (B, B·G) score matrices of the trained heads (keys from HEADS).

    dense_cross: (raw dense scores against every rank's passages, this rank's query offset, i.e.
    rank·B); when given, L_dense is taken over them instead of the local matrix (cross-device
    negatives). teacher, kd_loss_type: the (B, G) teacher distribution and the distillation loss
    that replaces InfoNCE in L_dense, L_lex, L_mul and L_inter (`contrastive_loss`); None: InfoNCE.

    Returns (loss, terms): terms holds every component, e.g. "dense", "inter", "main" (L),
    "distill_dense", "distill" (L').
    """
    heads = [h for h in HEADS if h in scores]
    if not heads:
        raise ValueError("m3_loss needs the score matrix of at least one head")

    def head_loss(s: torch.Tensor, query_offset: int = 0) -> torch.Tensor:
        return contrastive_loss(s, group_size, query_offset, teacher=teacher, kd_loss_type=kd_loss_type)

    scaled = {h: scores[h] / temperature for h in heads}
    terms = {h: head_loss(scaled[h]) for h in heads}
    if dense_cross is not None and "dense" in terms:
        terms["dense"] = head_loss(dense_cross[0] / temperature, dense_cross[1])
    if len(heads) == 1:
        terms["main"] = terms[heads[0]]
        return terms["main"], terms
    inter = sum(ensemble_weights[h] * scaled[h] for h in heads)
    terms["inter"] = head_loss(inter)
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


class M3Loss(EmbeddingLoss):
    """The BGE-M3 loss over its three heads (embedkit/models/m3_heads.py), with self-distillation.

    Formula:
        Scores: s_dense = ⟨e_q, e_p⟩ on the normalised pooled vectors (CLS in the paper and with
        model=hf; mean for the mini tiny_zh model, see its config); s_lex = Σ over shared tokens of
        w_q·w_p with w = ReLU(Linear(D,1)(h)), max over repeats, specials zeroed; s_mul = mean over
        query tokens of the max ⟨E_q[i], E_p[j]⟩ with E = normalize(Linear(D,D)(h)) on every token
        but CLS. Every score is divided by the temperature τ in training.

        For B queries and the flattened passages (B·G rows; row i·G is query i's positive, the
        other rows of its group its hard negatives, as `info_nce_loss`), each head scores the full
        (B, B·G) in-batch matrix. With InfoNCE(s) = −(1/B) Σ_i log softmax_j(s_ij / τ)[i·G]:

            s_inter = w_dense·s_dense + w_lex·s_lex + w_mul·s_mul           (w = 1, 0.3, 1)
            L  = (λ_dense·L_dense + L_inter + λ_lex·L_lex + λ_mul·L_mul) / 4  (λ = 1, 0.1, 1)
            L'_x = −(1/B) Σ_i Σ_j p*_ij · log softmax_j(s_x,ij / τ),  p* = softmax(stopgrad(s_inter) / τ)
            L' = (λ_dense·L'_dense + λ_lex·L'_lex + λ_mul·L'_mul) / 3
            loss = (L + L') / 2             (self-distillation on; L alone when it is off)

        With k trained heads, s_inter sums them, L divides by k + 1 and L' by k. With a single
        head, L = L_head (the ensemble would be the head itself) and there is no self-distillation.
        The w and λ above are the `official` preset's (`weights_from`; the module docstring lists
        the presets and their sources).

        fix_encoder: the same loss, but only the sparse and multi-vector heads are trained; the
        encoder (and its projection, if any) gets requires_grad False, so L_dense is a constant and
        L_inter, L_lex, L_mul (and L') reach only the heads.

    Paper:
        Chen, Xiao, Zhang, Luo, Lian, Liu, "BGE M3-Embedding: Multi-Lingual, Multi-Functionality,
        Multi-Granularity Text Embeddings Through Self-Knowledge Distillation" (2024,
        arXiv:2402.03216), §3.2-3.3.

    Arguments (paper defaults):
        temperature: τ = 0.02, the same for all three scores (the official examples).
        heads: the heads to train, any non-empty subset of [dense, sparse, multivec] (all three).
        self_distill: L' on (True) or off.
        self_distill_start_step: the optimiser step from which L' is on (0; FlagEmbedding's
            `self_distill_start_step`).
        ensemble_weights: w of s_inter per head; None = the preset's, a mapping overrides the
            preset per head (official: 1 / 0.3 / 1, FlagEmbedding's `ensemble_score`).
        loss_weights: λ of each head in L and L'; None = the preset's, a mapping overrides per head
            (official: 1 / 0.1 / 1, hard-coded in FlagEmbedding's loss).
        colbert_dim: output width of the multi-vector head; None or −1 = the hidden size
            (FlagEmbedding's default).
        eval_variants: {label: [w_dense, w_sparse, w_multivec]} of the retrieval modes to evaluate;
            None = the preset's (official: sparse, multivec, dense+sparse (1, 0.3, 0), all
            (1, 0.3, 1)); a mapping replaces that set of modes.
        query_instruction: prepended to retrieval / re-ranking queries by the search model (the
            suite's own instruction only reaches the dense MtebEncoder); None: no instruction, as M3.
        heads_init_from: a folder saved with `save_heads` to start the heads from. Each head it
            holds is loaded; a head it lacks (a dense-only stage saves none) or a folder with no
            heads file starts fresh, as FlagEmbedding does per head file (`sparse_linear.pt`,
            `colbert_linear.pt`).
        negatives_cross_device: False; True gathers passages over DDP ranks for L_dense only
            (see the module docstring).
        weights_from: the preset that fills ensemble_weights, loss_weights and eval_variants:
            "official" (FlagEmbedding's code, the default), "paper" or "preprint".
        weight_presets: {name: {ensemble_weights, loss_weights, eval_variants}} to pick from;
            None = WEIGHT_PRESETS (conf/objective/m3.yaml passes the same table).
        fix_encoder: False; True freezes the encoder and trains only the sparse / multi-vector
            heads (FlagEmbedding's `fix_encoder`: every parameter but `sparse_linear` and
            `colbert_linear` gets requires_grad False), the heads-only warm-up stage. Dropout stays
            as the trainer sets it, as there.
        kd_loss_type: None (no external teacher; teacher scores in the batch are ignored),
            "kl_div" or "m3_kd_loss": distil every head's L from the batch's teacher scores (see
            the module docstring; FlagEmbedding's `--kd_loss_type`: its CLI default is kl_div,
            the M3 model class's m3_kd_loss). Set, a batch without `teacher_scores` is an error
            naming this setting.
        teacher_temperature: T of softmax(teacher_scores / T) (1: FlagEmbedding has none).
        encoder: the encoder the heads are sized on (its hidden size and special tokens).

    Batch:
        {"query": tokens (B rows), "passages": tokens (B·G rows, query i's group at rows
        i·G .. i·G+G−1, its positive first)}, as InfoNCE's; G is read from the shapes and set by
        the data (`data.train_group_size`; the paper fine-tunes with 7 negatives, G = 8).
        With kd_loss_type set, also "teacher_scores" (B, G), as InfoNCE's.
    """

    def __init__(self, encoder: TextEncoder, temperature: float = 0.02,
                 heads: Sequence[str] = HEADS, self_distill: bool = True,
                 self_distill_start_step: int = 0,
                 ensemble_weights: Mapping[str, float] | None = None,
                 loss_weights: Mapping[str, float] | None = None,
                 colbert_dim: int | None = None,
                 eval_variants: Mapping[str, Sequence[float]] | None = None,
                 query_instruction: str | None = None, heads_init_from: str | None = None,
                 negatives_cross_device: bool = False, weights_from: str = DEFAULT_WEIGHTS_FROM,
                 weight_presets: Mapping[str, Mapping[str, Any]] | None = None,
                 fix_encoder: bool = False, kd_loss_type: str | None = None,
                 teacher_temperature: float = 1.0):
        super().__init__()
        if not 0 < temperature <= 1:
            raise ValueError(f"temperature must be in (0, 1], got {temperature}")
        self.temperature = float(temperature)
        self.heads_trained = _check_heads(heads)
        self.self_distill = bool(self_distill)
        self.self_distill_start_step = int(self_distill_start_step)
        self.negatives_cross_device = bool(negatives_cross_device)
        self.kd_loss_type = check_kd_loss_type(kd_loss_type)
        self.teacher_temperature = check_teacher_temperature(teacher_temperature)
        self.weights_from = str(weights_from)
        preset = weight_preset(self.weights_from, weight_presets)
        merged = {}
        for name, given in (("ensemble_weights", ensemble_weights), ("loss_weights", loss_weights)):
            weights = {**preset[name], **dict(_plain(given) or {})}   # given keys override the preset
            if set(weights) - set(HEADS):
                raise ValueError(f"{name} keys must be among {list(HEADS)}, got {list(weights)}")
            merged[name] = {h: float(w) for h, w in weights.items()}
        self.ensemble_weights, self.loss_weights = merged["ensemble_weights"], merged["loss_weights"]
        variants = preset["eval_variants"] if eval_variants is None else _plain(eval_variants)
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
            self._init_heads_from(Path(heads_init_from))
        self.fix_encoder = bool(fix_encoder)
        if self.fix_encoder:
            if not (self.heads.has_sparse or self.heads.has_multivec):
                raise ValueError(f"fix_encoder=True trains only the sparse and multi-vector heads, "
                                 f"but heads={list(self.heads_trained)} has neither: nothing would "
                                 f"train (objective.heads, objective.fix_encoder)")
            encoder.requires_grad_(False)
        self._saved_dir: Path | None = None
        self._last_scores: dict[str, torch.Tensor] | None = None
        self._last_terms: dict[str, torch.Tensor] = {}

    def _init_heads_from(self, path: Path) -> None:
        """Load each head `path` holds into this model's heads; the heads it lacks start fresh."""
        if not (path / HEADS_WEIGHTS).exists():
            log.info("%s holds no M3 heads; they start fresh", path)
            return
        saved = M3Heads.from_pretrained(path)
        for head, layer in (("sparse", "sparse_linear"), ("multivec", "colbert_linear")):
            mine, theirs = getattr(self.heads, layer), getattr(saved, layer)
            if mine is None:
                continue
            if theirs is None:
                log.info("M3 %s head: %s holds none (not trained there); it starts fresh", head, path)
                continue
            if mine.weight.shape != theirs.weight.shape:
                raise ValueError(f"{path / HEADS_WEIGHTS}: its {layer} is {tuple(theirs.weight.shape)}, "
                                 f"this model's {tuple(mine.weight.shape)} (objective.colbert_dim, "
                                 f"or an encoder of another width)")
            mine.load_state_dict(theirs.state_dict())
            log.info("M3 %s head initialised from %s", head, path)

    # ------------------------------------------------------------------ training

    def _encode(self, encoder: TextEncoder, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ids, mask = features["input_ids"], features["attention_mask"]
        hidden = encoder.hidden_states(ids, mask)
        out = {"": dense_from_hidden(encoder, hidden, mask)}
        if self.heads.has_sparse:
            out["_sparse"] = self.heads.token_weights(hidden, ids, mask)
            out["_ids"] = ids
        if self.heads.has_multivec:
            out["_colbert"], out["_colbert_mask"] = self.heads.colbert_vectors(hidden, mask)
        return out

    def embed(self, encoder, batch) -> dict[str, torch.Tensor]:
        """query / passages: dense vectors; *_sparse + *_ids: token weights and ids; *_colbert +
        *_colbert_mask: token vectors (CLS dropped) and their mask. Only trained heads appear."""
        out = {}
        for side in ("query", "passages"):
            out.update(self.embed_tokens(encoder, side, batch[side]))
        return out

    def embed_tokens(self, encoder, side, features) -> dict[str, torch.Tensor]:
        return {side + key: value for key, value in self._encode(encoder, features).items()}

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
        return self.self_distill and self.global_step >= self.self_distill_start_step

    def forward(self, embeddings, batch) -> torch.Tensor:
        scores = self.scores(embeddings)
        first = next(iter(scores.values()))
        if first.shape[1] % first.shape[0]:
            raise ValueError(f"{first.shape[1]} passages do not split into groups for {first.shape[0]} queries")
        group = first.shape[1] // first.shape[0]
        dense_cross = None
        if self.negatives_cross_device and "dense" in scores:
            from embedkit.objectives.cross_device import gather_rows

            q, p = embeddings["query"], embeddings["passages"]
            all_p, rank = gather_rows(p)
            if all_p is not p:
                full = dense_scores(q, all_p)
                dense_cross = (full, rank * q.shape[0])
                scores["dense"] = full[:, rank * p.shape[0]:(rank + 1) * p.shape[0]]
        teacher = None
        if self.kd_loss_type is not None:
            teacher = teacher_targets(batch, self.kd_loss_type, self.teacher_temperature,
                                      first.shape[0], group, torch.promote_types(first.dtype, torch.float32))
        loss, terms = m3_loss(scores, group, self.temperature,
                              self.ensemble_weights, self.loss_weights, self.distill_active(),
                              dense_cross=dense_cross, teacher=teacher, kd_loss_type=self.kd_loss_type)
        self._last_scores = {k: v.detach() for k, v in scores.items()}   # for diagnostics
        self._last_terms = {k: v.detach() for k, v in terms.items()}
        return loss

    def diagnostics(self, embeddings, batch) -> dict[str, torch.Tensor]:
        # Every term of the last loss (L, L', per head), then each head's mean positive score.
        out = {(f"loss_{name}" if not name.startswith("distill") else name): value
               for name, value in self._last_terms.items()}
        scores = self._last_scores or self.scores(embeddings)
        self._last_scores = None
        b, n = next(iter(scores.values())).shape
        g = n // b
        rows = torch.arange(b, device=embeddings["query"].device)
        for head, s in scores.items():
            out[f"pos_score_{head}"] = s[rows, rows * g].mean()
        return out

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

    def representer(self, encoder: TextEncoder, batch_size: int = 64):
        from embedkit.eval.m3_search import M3Representer

        return M3Representer(encoder, self.heads, batch_size=batch_size)

    def sparse_weights(self, encoder: TextEncoder, texts: Sequence[str]) -> list[dict[str, float]]:
        """{token: weight} per text (weights > 0 only, largest first), for inspection."""
        return self.representer(encoder).sparse_weights(texts)

    def fingerprint(self, encoder: TextEncoder) -> str:
        """A short hash of the encoder and head weights: a revision that changes with training."""
        state = {**{f"encoder.{k}": v for k, v in encoder.state_dict().items()},
                 **{f"heads.{k}": v for k, v in self.heads.state_dict().items()}}
        digest = hashlib.sha1()
        for name, tensor in sorted(state.items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()[:12]

    def eval_targets(self, encoder: TextEncoder, model_name: str | None = None,
                     revision: str | None = None,
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
            targets[""] = {"encoder": encoder}
        name = model_name or "embedkit/m3"
        revision = revision or f"m3-{self.fingerprint(encoder)}"
        if output_dir is None and self._saved_dir is not None:
            output_dir = self._saved_dir.parent
        representer = self.representer(encoder)
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


class M3(EmbeddingObjective):
    """M3Loss as a LightningModule: `M3(encoder, <M3Loss's arguments>, <the shared settings of
    EmbeddingObjective>)`. The heads are `self.loss.heads`."""

    loss_class = M3Loss
