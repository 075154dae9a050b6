"""RetroMAE: retrieval-oriented pre-training with a masked auto-encoder (stage 1 of the BGE recipe).

`RetroMAELoss` is the loss (formula, paper, arguments, batch: its docstring); `RetroMAE` trains it
as a LightningModule with the shared optimisation of embedkit/objectives/base.py. RetroMAE README
(BERT-base): lr 1e-4, warm-up ratio 0.1, weight decay 0.01, AdamW with linear decay.

Query stream. `query_stream="position"` (default) is the original RetroMAE
(RetroMAE:src/pretrain/modeling.py: q_i = h + P[i], nothing else); `"embeddings"` is
FlagEmbedding's variant (FE:research/baai_general_embedding/retromae_pretrain/modeling.py, the code
BGE was pre-trained with), which passes h broadcast to every position through the encoder's
embedding module as `inputs_embeds` (FlagEmbedding passes no position ids, so positions are that
module's default numbering, which `query_stream_input` reproduces: BERT from 0, RoBERTa / XLM-R from
padding_idx + 1):

    q_i = Dropout(LayerNorm(h + P[i] + T[0]))      (P: position, T: token-type embeddings)

MLM head. The encoder is a `TextEncoder` around a backbone without an LM head, so the loss owns a
BERT prediction head (dense → activation → LayerNorm, then the output projection tied to the
encoder's word embeddings, plus its own bias). It and the decoder are freshly initialised with
BERT's init (normal(0, initializer_range), zero bias, unit LayerNorm): the only choice for a model
built from a config (model=tiny_zh), which has no head to keep. FlagEmbedding instead keeps the
checkpoint's own head (it trains `AutoModelForMaskedLM`'s `cls` / `lm_head`);
`mlm_head_init="from_model"` does that: it copies the transform and bias of the checkpoint the
encoder was loaded from (`model.name_or_path` with model=hf, at `mlm_head_revision`), and
`mlm_head_init=<name or folder>` those of another masked-LM checkpoint (BERT
`cls.predictions.*` or RoBERTa / XLM-R `lm_head.*`), or of an embedkit model folder made by
masked-LM pre-training (the mini base keeps its head in `mlm_head/`, embedkit/objectives/mlm.py). A checkpoint without a trained head (a plain
`BertModel` such as BAAI/bge-*-zh, or an embedkit model folder) or with an output matrix not tied to
its word embeddings is an error, not a silently random head. It is loaded with `trust_remote_code`
off unless the config turns it on (`model.trust_remote_code`).

What the encoder computes and what the loss does. `embed` runs everything that goes through the
encoder's modules: the final hidden states of the masked text, h = their [CLS] row, and the
decoder's two input streams (the original tokens and the query stream, both through the encoder's
embedding module), plus the tied output matrix. `forward` applies the loss's own decoder layer and
MLM head to them. The order of the dropout draws is that of one pass: encoder, decoder inputs,
decoder.

Output. Only the encoder is the stage's result (the recipe saves it and the next stage starts
from it). With `save_decoder_weights`, `save_extras` also writes the decoder layer and MLM head
(`save_decoder`, safetensors) into `retromae_decoder/` inside the encoder folder, for continuing
pre-training later (FlagEmbedding issues #633, #1480 ask for exactly that).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from embedkit.models.build import trust_remote_code_flag
from embedkit.models.encoder import TextEncoder
from embedkit.objectives.base import EmbeddingLoss, EmbeddingObjective

log = logging.getLogger(__name__)

QUERY_STREAMS = ("position", "embeddings")
#: `mlm_head_init` value meaning "the checkpoint the encoder itself was loaded from".
MLM_HEAD_FROM_MODEL = "from_model"
DECODER_DIR = "retromae_decoder"
DECODER_WEIGHTS = "decoder.safetensors"
DECODER_CONFIG = "decoder_config.json"
#: Where the masked-LM pre-training (embedkit/objectives/mlm.py) keeps its head, as a BertForMaskedLM
#: folder inside the model folder; `mlm_head_init=<model folder>` reads it from there.
MLM_HEAD_DIR = "mlm_head"


def bert_init(module: nn.Module, std: float) -> None:
    """BERT's weight init, applied to every Linear / LayerNorm inside `module`."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class EnhancedDecoderLayer(nn.Module):
    """One BERT layer whose attention takes queries and keys/values from different streams.

    The residual around attention comes from the query stream; then BERT's FFN
    (dense → activation → dense, dropout, residual, LayerNorm). No causal or cross attention.
    """

    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int,
                 hidden_act: str = "gelu", hidden_dropout: float = 0.1,
                 attention_dropout: float = 0.1, layer_norm_eps: float = 1e-12):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden size {hidden_size} is not a multiple of {num_heads} heads")
        from transformers.activations import ACT2FN

        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.attention_output = nn.Linear(hidden_size, hidden_size)
        self.attention_LayerNorm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.intermediate = nn.Linear(hidden_size, intermediate_size)
        self.act = ACT2FN[hidden_act]
        self.output = nn.Linear(intermediate_size, hidden_size)
        self.output_LayerNorm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.dropout = nn.Dropout(hidden_dropout)
        self.attention_dropout = attention_dropout

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, query: torch.Tensor, key_value: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
        """query, key_value: (B, L, D); attention_mask: (B, L, L), row i = query position i.

        A bool mask (True = may attend) becomes an additive bias (0 / the dtype's minimum) in the
        compute dtype; a float mask is taken as that additive bias already.
        """
        b, n, d = query.shape
        q = self._heads(self.query(query))
        k, v = self._heads(self.key(key_value)), self._heads(self.value(key_value))
        if attention_mask.dtype == torch.bool:
            bias = torch.zeros(attention_mask.shape, dtype=q.dtype, device=q.device)
            bias = bias.masked_fill(~attention_mask, torch.finfo(q.dtype).min)
        else:
            bias = attention_mask.to(q.dtype)
        ctx = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias.unsqueeze(1),
            dropout_p=self.attention_dropout if self.training else 0.0)
        ctx = ctx.transpose(1, 2).reshape(b, n, d)
        hidden = self.attention_LayerNorm(self.dropout(self.attention_output(ctx)) + query)
        ffn = self.dropout(self.output(self.act(self.intermediate(hidden))))
        return self.output_LayerNorm(ffn + hidden)


class MLMHeadTransform(nn.Module):
    """BERT's prediction head minus the output matrix (which is the tied word-embedding matrix)."""

    def __init__(self, hidden_size: int, vocab_size: int, hidden_act: str = "gelu",
                 layer_norm_eps: float = 1e-12):
        super().__init__()
        from transformers.activations import ACT2FN

        self.dense = nn.Linear(hidden_size, hidden_size)
        self.act = ACT2FN[hidden_act]
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, hidden: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        return F.linear(self.LayerNorm(self.act(self.dense(hidden))), word_embeddings, self.bias)


def _masked_ce(logits_fn, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean CE over positions with a label; head applied only there. Zero (with grad) if none:
    through the head on one position, so that under DDP a batch with nothing masked still gives
    every head parameter a (zero) gradient instead of failing DDP's unused-parameter check."""
    keep = labels != -100
    if not bool(keep.any()):
        return logits_fn(hidden.reshape(-1, hidden.shape[-1])[:1]).sum() * 0.0
    return F.cross_entropy(logits_fn(hidden[keep]), labels[keep])


def _position_ids(embeddings: nn.Module, length: int, device) -> torch.Tensor:
    # RoBERTa/XLM-R number positions from padding_idx + 1; BERT from 0.
    pad = getattr(embeddings, "padding_idx", None)
    offset = pad + 1 if pad is not None else 0
    return torch.arange(offset, offset + length, device=device)


def query_stream_input(embeddings: nn.Module, h_cls: torch.Tensor, length: int,
                       query_stream: str = "position") -> torch.Tensor:
    """(B, D) sentence embeddings -> (B, L, D) decoder queries: h plus each position, through the
    encoder's embedding module `embeddings`."""
    b, d = h_cls.shape
    positions = _position_ids(embeddings, length, h_cls.device)
    if query_stream == "position":
        return h_cls[:, None, :] + embeddings.position_embeddings(positions)[None]
    return embeddings(inputs_embeds=h_cls[:, None, :].expand(b, length, d),
                      position_ids=positions[None].expand(b, length))


def decoder_streams(embeddings: nn.Module, h_cls: torch.Tensor, decoder_input_ids: torch.Tensor,
                    query_stream: str = "position") -> tuple[torch.Tensor, torch.Tensor]:
    """The enhanced decoder's (query, key_value) inputs, (B, L, D) each: q_i = h + pos_i,
    k_0 = h and k_j = emb(x_j) of the original tokens."""
    length = decoder_input_ids.shape[1]
    content = embeddings(input_ids=decoder_input_ids)
    key_value = torch.cat([h_cls[:, None, :].to(content.dtype), content[:, 1:]], dim=1)
    query = query_stream_input(embeddings, h_cls, length, query_stream).to(content.dtype)
    return query, key_value


class RetroMAELoss(EmbeddingLoss):
    """Encoder MLM + enhanced-decoder reconstruction.

    Formula:
        For a text x = (x_0 = [CLS], x_1, ..., x_{L-1}):

        Encoder. x is corrupted by a whole-word mask (BERT's 80/10/10) into x̃_enc; the encoder
        reads x̃_enc, its final-layer [CLS] state is the sentence embedding h, and the shared MLM
        head predicts the masked tokens M_enc:

            L_enc = −(1/|M_enc|) Σ_{t ∈ M_enc} log p_head(x_t | encoder(x̃_enc)_t)

        Enhanced decoder. One freshly initialised transformer layer with two input streams:
            query stream   q_i = h + pos_i                     (i = 0..L-1; query_stream="embeddings":
                                                                Dropout(LN(h + pos_i + type_0)))
            key/value      k_0 = h,  k_j = emb(x_j) for j ≥ 1  (the ORIGINAL tokens through the
                                                                encoder's own embedding module:
                                                                word + position + type, LayerNorm,
                                                                dropout)
            attention      row i may see key j iff A[i, j] = 1, where A is drawn per row: a
                           whole-word mask hides keys, i never sees itself, 0 (h) is always
                           visible, padding never (built by embedkit.data.mlm).
            output         d_i = FFN(LN(q_i + MHA(q_i, k, v; A)))   with BERT's residual/LayerNorm layout

        and every non-special token is reconstructed through the same, weight-tied MLM head:

            L_dec = −(1/|T|) Σ_{i ∈ T} log p_head(x_i | d_i),   T = all non-special, non-pad positions

            L = L_enc + L_dec        (unweighted, as in RetroMAE and FlagEmbedding)

        Since q_i carries only h and a position, and i never sees x_i, reconstructing x_i forces h
        to carry the text's content: that is what makes the [CLS] vector a good retrieval
        embedding later.

    Paper:
        Xiao, Liu, Shao and Cao, "RetroMAE: Pre-Training Retrieval-oriented Language Models Via
        Masked Auto-Encoder", EMNLP 2022 (arXiv:2205.12035), §3; as used by FlagEmbedding's
        `research/baai_general_embedding/retromae_pretrain` to pre-train BGE (C-Pack §4.1).

    Arguments (paper defaults):
        query_stream: "position" (RetroMAE: h + position embedding) or "embeddings"
            (FlagEmbedding's variant, see the module docstring).
        save_decoder_weights: True: `save_extras` also writes the decoder and MLM head.
        mlm_head_init: None (fresh, BERT's init; the tiny_zh default); "from_model" (the head of
            the checkpoint the encoder was loaded from, as FlagEmbedding keeps it: the paper-scale
            setting with model=hf); or a masked-LM checkpoint (hub name or folder) whose head to copy.
        mlm_head_revision: None; the hub revision `mlm_head_init` is read at (the config passes
            `model.revision`, the encoder's own).
        trust_remote_code: False; for loading `mlm_head_init`.
        encoder: the encoder the decoder and head are sized on (its backbone config); the MLM
            output matrix is tied to its word embeddings.
        The mask ratios, 0.3 (encoder) and 0.5 (decoder) in the paper and FlagEmbedding's BGE
        recipe, are the data's (`data.encoder_mask_ratio`, `data.decoder_mask_ratio`,
        embedkit/data/mlm.py): only the collator applies them.

    Batch:
        `embedkit.data.mlm.MLMDataModule`'s: input_ids, attention_mask, labels (−100 off the
        encoder mask), decoder_input_ids, decoder_attention (B × L × L, True = may attend),
        decoder_labels.
    """

    def __init__(self, encoder: TextEncoder, query_stream: str = "position",
                 save_decoder_weights: bool = True, mlm_head_init: str | None = None,
                 mlm_head_revision: str | None = None, trust_remote_code: bool = False):
        super().__init__()
        if query_stream not in QUERY_STREAMS:
            raise ValueError(f"unknown query_stream {query_stream!r}; choose one of {QUERY_STREAMS}")
        self.query_stream = query_stream
        self.save_decoder_weights = save_decoder_weights
        emb = encoder.backbone.embeddings
        for attr in ("word_embeddings", "position_embeddings"):
            if not hasattr(emb, attr):
                raise TypeError(f"RetroMAE needs a BERT-style embedding module with {attr}; "
                                f"{type(emb).__name__} has none")
        cfg = encoder.backbone.config
        self.decoder_settings = dict(
            hidden_size=cfg.hidden_size, num_heads=cfg.num_attention_heads,
            intermediate_size=cfg.intermediate_size, hidden_act=cfg.hidden_act,
            hidden_dropout=cfg.hidden_dropout_prob, attention_dropout=cfg.attention_probs_dropout_prob,
            layer_norm_eps=cfg.layer_norm_eps)
        self.decoder = EnhancedDecoderLayer(**self.decoder_settings)
        self.mlm_head = MLMHeadTransform(cfg.hidden_size, emb.word_embeddings.num_embeddings,
                                         cfg.hidden_act, cfg.layer_norm_eps)
        std = getattr(cfg, "initializer_range", 0.02)
        bert_init(self.decoder, std)
        bert_init(self.mlm_head, std)
        self.trust_remote_code = trust_remote_code_flag(trust_remote_code)
        if mlm_head_init:
            self.init_mlm_head_from(mlm_head_source(encoder, mlm_head_init), revision=mlm_head_revision)
        self._last_parts: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------ the objective

    def embed(self, encoder: TextEncoder, batch) -> dict[str, torch.Tensor]:
        """hidden (B, L, D) and cls (B, D) of the masked text; decoder_query / decoder_key_value
        (B, L, D), the decoder's input streams; word_embeddings, the tied MLM output matrix."""
        hidden = encoder.hidden_states(batch["input_ids"], batch["attention_mask"])
        embeddings = encoder.backbone.embeddings
        query, key_value = decoder_streams(embeddings, hidden[:, 0], batch["decoder_input_ids"],
                                           self.query_stream)
        return {"hidden": hidden, "cls": hidden[:, 0], "decoder_query": query,
                "decoder_key_value": key_value, "word_embeddings": embeddings.word_embeddings.weight}

    def mlm_logits(self, hidden: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits of hidden states (any leading shape) through the tied MLM head."""
        return self.mlm_head(hidden, word_embeddings)

    def decoded(self, embeddings: dict[str, torch.Tensor], decoder_attention: torch.Tensor) -> torch.Tensor:
        """The enhanced decoder's output (B, L, D)."""
        return self.decoder(embeddings["decoder_query"], embeddings["decoder_key_value"],
                            decoder_attention.to(torch.bool))

    def loss_parts(self, embeddings: dict[str, torch.Tensor], batch) -> dict[str, torch.Tensor]:
        def logits(hidden):
            return self.mlm_logits(hidden, embeddings["word_embeddings"])

        encoder_loss = _masked_ce(logits, embeddings["hidden"], batch["labels"])
        decoder_loss = _masked_ce(logits, self.decoded(embeddings, batch["decoder_attention"]),
                                  batch["decoder_labels"])
        return {"encoder_mlm_loss": encoder_loss, "decoder_loss": decoder_loss,
                "loss": encoder_loss + decoder_loss}

    def forward(self, embeddings: dict[str, torch.Tensor], batch) -> torch.Tensor:
        parts = self.loss_parts(embeddings, batch)
        self._last_parts = {k: parts[k].detach() for k in ("encoder_mlm_loss", "decoder_loss")}
        return parts["loss"]

    def diagnostics(self, embeddings, batch) -> dict[str, torch.Tensor]:
        return dict(self._last_parts)

    def batch_size_of(self, batch) -> int:
        return int(batch["input_ids"].shape[0])

    # ------------------------------------------------------------ decoder weights

    def _decoder_state(self) -> dict[str, torch.Tensor]:
        state = {f"decoder.{k}": v for k, v in self.decoder.state_dict().items()}
        state.update({f"mlm_head.{k}": v for k, v in self.mlm_head.state_dict().items()})
        return {k: v.detach().cpu().contiguous() for k, v in state.items()}

    def save_decoder(self, out_dir: str | Path) -> Path:
        """Write the decoder layer and the MLM head (not the tied output matrix) as safetensors."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file(self._decoder_state(), str(out / DECODER_WEIGHTS))
        (out / DECODER_CONFIG).write_text(json.dumps(
            {**self.decoder_settings, "query_stream": self.query_stream,
             "vocab_size": int(self.mlm_head.bias.numel()),
             "mlm_output": "tied to the encoder's word embeddings"}, indent=2))
        return out

    def load_decoder(self, path: str | Path) -> None:
        """Load what `save_decoder` wrote (strict: the architecture must match)."""
        from safetensors.torch import load_file

        state = load_file(str(Path(path) / DECODER_WEIGHTS))
        self.decoder.load_state_dict({k[len("decoder."):]: v for k, v in state.items()
                                      if k.startswith("decoder.")})
        self.mlm_head.load_state_dict({k[len("mlm_head."):]: v for k, v in state.items()
                                       if k.startswith("mlm_head.")})

    def save_extras(self, out_dir) -> None:
        if self.save_decoder_weights:
            self.save_decoder(Path(out_dir) / DECODER_DIR)

    @torch.no_grad()
    def init_mlm_head_from(self, name_or_path: str, revision: str | None = None) -> None:
        """Copy the prediction-head transform and output bias of a masked-LM checkpoint.

        The bias is the output layer's (`decoder.bias`, tied to `cls.predictions.bias` /
        `lm_head.bias`), i.e. what the checkpoint's own forward adds to the logits."""
        from transformers import AutoModelForMaskedLM

        lm, info = AutoModelForMaskedLM.from_pretrained(
            name_or_path, revision=revision, trust_remote_code=self.trust_remote_code,
            output_loading_info=True)
        if hasattr(lm, "cls"):  # BERT family
            prefix, src = "cls.", lm.cls.predictions
            dense, norm = src.transform.dense, src.transform.LayerNorm
        elif hasattr(lm, "lm_head"):  # RoBERTa / XLM-R
            prefix, src = "lm_head.", lm.lm_head
            dense, norm = src.dense, src.layer_norm
        else:
            raise TypeError(f"{type(lm).__name__}: no BERT or RoBERTa style MLM head to copy")
        # transformers fills a head the checkpoint lacks with a fresh init and only logs it.
        missing = sorted(k for k in info["missing_keys"] if k.startswith(prefix))
        if missing:
            raise ValueError(f"mlm_head_init: {name_or_path} has no trained MLM head (missing "
                             f"{missing[:3]}); it is a plain encoder checkpoint. Set "
                             f"objective.mlm_head_init=null (a fresh head) or name a masked-LM checkpoint")
        if lm.get_output_embeddings().weight is not lm.get_input_embeddings().weight:
            raise ValueError(f"mlm_head_init: {name_or_path}'s MLM output matrix is not tied to its word "
                             f"embeddings (tie_word_embeddings=false); RetroMAE's head is tied to the "
                             f"encoder's word embeddings, so it cannot keep that head")
        bias = src.decoder.bias if src.decoder.bias is not None else src.bias
        head = self.mlm_head
        if bias.shape != head.bias.shape:
            raise ValueError(f"{name_or_path}: head bias has {bias.shape[0]} entries, the encoder's "
                             f"vocabulary {head.bias.shape[0]}")
        head.dense.load_state_dict(dense.state_dict())
        head.LayerNorm.load_state_dict(norm.state_dict())
        head.bias.copy_(bias)
        log.info("RetroMAE: MLM head copied from %s", name_or_path)


def mlm_head_source(encoder: TextEncoder, mlm_head_init: str) -> str:
    """The checkpoint `mlm_head_init` names: itself, or for "from_model" the one the encoder's
    backbone was loaded from (`from_pretrained` records it as `name_or_path`; a model built from a
    config has none). `model.init_from` replaces the weights but not that name, so with it set this
    is still the checkpoint model=hf started from."""
    if mlm_head_init != MLM_HEAD_FROM_MODEL:
        # An embedkit model folder made by masked-LM pre-training (the mini base) holds its head in
        # a BertForMaskedLM subfolder.
        inner = Path(mlm_head_init) / MLM_HEAD_DIR
        return str(inner) if inner.is_dir() else mlm_head_init
    source = getattr(encoder.backbone, "name_or_path", None) or ""
    if not source:
        raise ValueError(f"objective.mlm_head_init={MLM_HEAD_FROM_MODEL}: the encoder "
                         f"({type(encoder.backbone).__name__}) was built from a config (model=tiny_zh), "
                         f"so it has no checkpoint with an MLM head; use mlm_head_init=null (a fresh "
                         f"head) or name a masked-LM checkpoint")
    return source


class RetroMAE(EmbeddingObjective):
    """RetroMAELoss as a LightningModule: `RetroMAE(encoder, <RetroMAELoss's arguments>, <the shared
    settings of EmbeddingObjective>)`. The helpers below bind the loss's decoder and head to the
    encoder, for inspection and tests."""

    loss_class = RetroMAELoss

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.loss.mlm_logits(hidden, self.encoder.backbone.embeddings.word_embeddings.weight)

    def query_stream_input(self, h_cls: torch.Tensor, length: int) -> torch.Tensor:
        return query_stream_input(self.encoder.backbone.embeddings, h_cls, length, self.loss.query_stream)

    def decoder_hidden(self, h_cls: torch.Tensor, decoder_input_ids: torch.Tensor,
                       decoder_attention: torch.Tensor) -> torch.Tensor:
        """The enhanced decoder's output (B, L, D) given the sentence embeddings (B, D)."""
        query, key_value = decoder_streams(self.encoder.backbone.embeddings, h_cls,
                                           decoder_input_ids, self.loss.query_stream)
        return self.loss.decoder(query, key_value, decoder_attention.to(torch.bool))

    def forward(self, batch) -> dict[str, torch.Tensor]:
        """Full logits for inspection: encoder (B, L, V), decoder (B, L, V), and h_cls (B, D)."""
        emb = self.embed(batch)
        return {"encoder_logits": self.mlm_logits(emb["hidden"]),
                "decoder_logits": self.mlm_logits(self.loss.decoded(emb, batch["decoder_attention"])),
                "cls": emb["cls"]}
