"""Masked-language-model pre-training: how the mini scale gets its pre-trained base.

Every paper row starts from a pre-trained LM (C-Pack: chinese-roberta-wwm-ext; BGE-M3: XLM-R via
RetroMAE; Conan: BGE). `MaskedLM` pre-trains the tiny encoder the same way those LMs were made, so
that the mini rows start from a language model too (`python run.py +experiment=mini_base`,
`make base`). The RetroMAE stage then continues from it, as BGE's RetroMAE continued from RoBERTa.

`MaskedLMLoss` is the loss (formula, paper, arguments, batch: its docstring); `MaskedLM` trains it
as a LightningModule with the shared optimisation of embedkit/objectives/base.py.

The head. Like RetroMAE's, a BERT prediction head (dense → activation → LayerNorm, then the word
embedding matrix, tied, plus its own bias), freshly initialised with BERT's init. `save_extras`
writes the encoder together with that head as a transformers `BertForMaskedLM` checkpoint into
`<model>/mlm_head/`, which `AutoModelForMaskedLM.from_pretrained` loads; the RetroMAE stage keeps
that head through `objective.mlm_head_init=<model folder>` (conf/recipe/bge.yaml at mini: the
row's `model.init_from`), as FlagEmbedding keeps the checkpoint's own head.
"""

from __future__ import annotations

from pathlib import Path

import torch

from embedkit.models.encoder import TextEncoder
from embedkit.objectives.base import EmbeddingLoss, EmbeddingObjective
from embedkit.objectives.retromae import MLM_HEAD_DIR, MLMHeadTransform, _masked_ce, bert_init


class MaskedLMLoss(EmbeddingLoss):
    """BERT's masked-LM loss over whole-word (here: character) masks.

    Formula:
        A text x is corrupted by a whole-word mask M (BERT's 80 % [MASK] / 10 % random / 10 % kept)
        into x̃; the encoder reads x̃ and the tied MLM head predicts every masked token:

            L = −(1/|M|) Σ_{t ∈ M} log p_head(x_t | encoder(x̃)_t)

        with p_head(· | h) = softmax(E · LN(act(W h + b)) + c), E the encoder's word embeddings.

    Paper:
        Devlin et al., "BERT", NAACL 2019 (arXiv:1810.04805), §3.1 (mask ratio 0.15, 80/10/10);
        whole-word masking for Chinese as in Cui et al., "Pre-Training with Whole Word Masking for
        Chinese BERT" (chinese-roberta-wwm-ext, the LM C-Pack starts from; arXiv:1906.08101). With a
        character vocabulary every word is one character, so whole-word masking is character masking.

    Arguments:
        encoder: the encoder the head is sized on; the output matrix is tied to its word embeddings.
        save_head: True: `MaskedLM.save_extras` writes the encoder and head as a BertForMaskedLM checkpoint.
        The mask ratio (BERT: 0.15) is the data's (`data.encoder_mask_ratio`, embedkit/data/mlm.py).

    Batch:
        `embedkit.data.mlm.MLMDataModule`'s: input_ids (corrupted), attention_mask, labels (−100
        off the mask). The decoder views RetroMAE reads are not needed (`data.decoder_views=false`).
    """

    def __init__(self, encoder: TextEncoder, save_head: bool = True):
        super().__init__()
        emb = getattr(encoder.backbone, "embeddings", None)
        if emb is None or not hasattr(emb, "word_embeddings"):
            raise TypeError(f"MaskedLM needs a BERT-style embedding module with word_embeddings; "
                            f"{type(encoder.backbone).__name__} has none")
        cfg = encoder.backbone.config
        self.save_head = save_head
        self.mlm_head = MLMHeadTransform(cfg.hidden_size, emb.word_embeddings.num_embeddings,
                                         cfg.hidden_act, cfg.layer_norm_eps)
        bert_init(self.mlm_head, getattr(cfg, "initializer_range", 0.02))

    def embed(self, encoder: TextEncoder, batch) -> dict[str, torch.Tensor]:
        """hidden (B, L, D) of the masked text and word_embeddings, the tied output matrix."""
        hidden = encoder.hidden_states(batch["input_ids"], batch["attention_mask"])
        return {"hidden": hidden, "word_embeddings": encoder.backbone.embeddings.word_embeddings.weight}

    def mlm_logits(self, hidden: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        return self.mlm_head(hidden, word_embeddings)

    def forward(self, embeddings: dict[str, torch.Tensor], batch) -> torch.Tensor:
        return _masked_ce(lambda h: self.mlm_logits(h, embeddings["word_embeddings"]),
                          embeddings["hidden"], batch["labels"])

    def batch_size_of(self, batch) -> int:
        return int(batch["input_ids"].shape[0])


@torch.no_grad()
def save_masked_lm(encoder: TextEncoder, head: MLMHeadTransform, out_dir: str | Path) -> Path:
    """The encoder's BERT backbone with `head` as a transformers BertForMaskedLM folder (weights,
    config, tokenizer), loadable by `AutoModelForMaskedLM.from_pretrained(out_dir)`."""
    from transformers import BertForMaskedLM

    backbone = encoder.backbone
    if getattr(backbone.config, "model_type", None) != "bert":
        raise TypeError(f"save_masked_lm writes a BertForMaskedLM; the backbone is "
                        f"{getattr(backbone.config, 'model_type', type(backbone).__name__)!r}")
    config = backbone.config.__class__.from_dict(backbone.config.to_dict())
    config.tie_word_embeddings = True
    lm = BertForMaskedLM(config)
    missing, unexpected = lm.bert.load_state_dict(backbone.state_dict(), strict=False)
    # BertForMaskedLM has no pooler; the backbone may or may not carry one.
    if [k for k in missing if "position_ids" not in k] or [k for k in unexpected if "pooler" not in k]:
        raise ValueError(f"backbone does not fit BertForMaskedLM: missing {missing[:3]}, unexpected {unexpected[:3]}")
    transform = lm.cls.predictions.transform
    transform.dense.load_state_dict(head.dense.state_dict())
    transform.LayerNorm.load_state_dict(head.LayerNorm.state_dict())
    lm.cls.predictions.bias.copy_(head.bias)
    lm.cls.predictions.decoder.bias = lm.cls.predictions.bias
    lm.tie_weights()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lm.save_pretrained(out_dir)
    encoder.tokenizer.save_pretrained(out_dir)
    return out_dir


class MaskedLM(EmbeddingObjective):
    """MaskedLMLoss as a LightningModule: `MaskedLM(encoder, <MaskedLMLoss's arguments>, <the shared
    settings of EmbeddingObjective>)`."""

    loss_class = MaskedLMLoss

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.loss.mlm_logits(hidden, self.encoder.backbone.embeddings.word_embeddings.weight)

    def save_extras(self, out_dir) -> None:
        # The head is saved with the encoder it is tied to, which the objective (not the loss) holds.
        if self.loss.save_head:
            save_masked_lm(self.encoder, self.loss.mlm_head, Path(out_dir) / MLM_HEAD_DIR)
