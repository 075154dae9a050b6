"""RetroMAE pre-training data: single texts, tokenised once, masked per example and epoch.

Each batch carries two views of the same texts (Xiao et al. 2022, RetroMAE, §3; FlagEmbedding
`retromae_pretrain/data.py`):

Encoder view (`input_ids`, `attention_mask`, `labels`)
    A whole-word mask at `encoder_mask_ratio` (0.3) over the maskable tokens, then BERT's
    corruption of the selected positions: 80% `[MASK]`, 10% a random non-special token, 10% kept.
    `labels` hold the original id on selected positions and -100 elsewhere.

Decoder view (`decoder_input_ids`, `decoder_attention`, `decoder_labels`)
    `decoder_input_ids` are the original, uncorrupted ids. `decoder_attention[b, i, j]` says whether
    query row i may attend to key j in the enhanced decoder: for every row i an independent
    whole-word mask at `decoder_mask_ratio` (0.5) hides some tokens, position i is always hidden
    from itself, slot 0 (where the model puts the sentence embedding) is visible to every other row,
    and padding is never visible. `decoder_labels` are the original ids except on special tokens,
    position 0 and padding (-100): the decoder reconstructs every real token.

Plain masked-LM pre-training (embedkit/objectives/mlm.py, the mini base) sets `decoder_views=False`:
batches then hold the encoder view only.

Maskable tokens are the non-special ones (checked by id against `tokenizer.all_special_ids`, so
RoBERTa's `<s>`/`</s>` are caught as well as `[CLS]`/`[SEP]`; `[UNK]` counts as special too), never
position 0. Words are WordPiece groups: a `##` piece joins the token before it. Our character-level
`tiny_zh` tokenizer gives one word per CJK character; SentencePiece/BPE vocabularies without `##`
pieces are masked token by token.

The number of tokens to mask is `ratio × maskable tokens`, rounded stochastically (floor plus a
Bernoulli of the remainder) so that the expected ratio is exact even for short texts; whole words
are then taken in random order while they fit. Special tokens that are not position 0 (`[SEP]`)
are never hidden from the decoder: they carry only their position.

Everything is a pure function of (seed, epoch, example index), as in the contrastive module: the
batch sampler yields (index, epoch) pairs, and the collator seeds one generator per example.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from embedkit.data.base import TextDataModule
from embedkit.data.batching import GroupBatchSampler, TokenTable, pad_rows, tokenize_table

log = logging.getLogger(__name__)

__all__ = [
    "MLMDataModule",
    "MLMCollator",
    "TextDataset",
    "word_ids",
    "sample_word_masks",
    "corrupt_bert",
    "decoder_attention_matrix",
]

IGNORE = -100


# ---------------------------------------------------------------- pure masking functions

def word_ids(ids: np.ndarray, special: np.ndarray, continuation: np.ndarray) -> np.ndarray:
    """Word index of every token, -1 where it may not be masked (special tokens and position 0).

    `special` and `continuation` are boolean lookups over the vocabulary. A `##` piece joins the
    word of the token before it, unless that token is not maskable.
    """
    ids = np.asarray(ids)
    maskable = ~special[ids]
    if len(ids):
        maskable[0] = False
    joins = continuation[ids] & np.r_[False, maskable[:-1]]
    starts = maskable & ~joins
    wid = np.cumsum(starts) - 1
    wid[~maskable] = -1
    return wid


def sample_word_masks(wid: np.ndarray, ratio: float, rng: np.random.Generator,
                      rows: int = 1) -> np.ndarray:
    """`rows` independent whole-word masks over the tokens with `wid >= 0`: bool (rows, len(wid)).

    Per row the budget is `ratio × maskable tokens`, rounded stochastically; whole words are taken in
    a random order while the running total stays within the budget.
    """
    wid = np.asarray(wid)
    out = np.zeros((rows, len(wid)), dtype=bool)
    maskable = wid >= 0
    n_tokens = int(maskable.sum())
    if n_tokens == 0 or ratio <= 0:
        return out
    sizes = np.bincount(wid[maskable])
    budget = np.floor(n_tokens * ratio + rng.random(rows))
    order = np.argsort(rng.random((rows, len(sizes))), axis=1)
    take = np.cumsum(sizes[order], axis=1) <= budget[:, None]
    chosen = np.zeros((rows, len(sizes)), dtype=bool)
    np.put_along_axis(chosen, order, take, axis=1)
    out[:, maskable] = chosen[:, wid[maskable]]
    return out


def corrupt_bert(ids: np.ndarray, mask: np.ndarray, rng: np.random.Generator, mask_id: int,
                 replacement_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """BERT's 80/10/10 corruption of the selected positions; returns (input ids, labels)."""
    ids = np.asarray(ids, dtype=np.int64)
    u = rng.random(len(ids))
    out = ids.copy()
    out[mask & (u < 0.8)] = mask_id
    rand = mask & (u >= 0.8) & (u < 0.9)
    out[rand] = rng.choice(replacement_ids, size=int(rand.sum()))
    labels = np.where(mask, ids, IGNORE)
    return out, labels


def decoder_attention_matrix(wid: np.ndarray, ratio: float, rng: np.random.Generator,
                             width: int | None = None) -> np.ndarray:
    """The enhanced decoder's (width × width) permission matrix for one sequence of len(wid) tokens.

    Row i: an independent whole-word mask at `ratio` hides tokens; i never sees itself; every row
    but 0 sees slot 0 (the sentence embedding); columns at or past len(wid) (padding) are never
    visible. Padding rows see slot 0 only, so that no softmax row is empty (they carry no loss).
    """
    n = len(wid)
    width = n if width is None else width
    allow = np.zeros((width, width), dtype=bool)
    if n == 0:
        return allow
    allow[:n, :n] = ~sample_word_masks(wid, ratio, rng, rows=n)
    allow[np.arange(n), np.arange(n)] = False
    allow[1:, 0] = True  # slot 0 for every row but its own (row 0); padding rows included
    return allow


# ---------------------------------------------------------------- dataset and collator

class TextDataset(Dataset):
    """Items are (example index, epoch); returns the token row with them, for per-example seeding."""

    def __init__(self, table: TokenTable):
        self.table = table

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, item: tuple[int, int]) -> tuple[np.ndarray, int, int]:
        index, epoch = item
        return self.table.row(index), int(index), int(epoch)


class MLMCollator:
    """Pads a batch and builds the encoder and decoder views (see the module docstring).

    Holds only numpy lookups, no tokenizer, so it pickles cheaply into DataLoader workers.
    """

    def __init__(self, pad_id: int, mask_id: int, special: np.ndarray, continuation: np.ndarray,
                 encoder_mask_ratio: float = 0.3, decoder_mask_ratio: float = 0.5, seed: int = 0,
                 decoder_views: bool = True):
        for name, r in (("encoder_mask_ratio", encoder_mask_ratio),
                        ("decoder_mask_ratio", decoder_mask_ratio)):
            if not 0 <= r < 1:
                raise ValueError(f"{name} must be in [0, 1), got {r}")
        self.pad_id = pad_id
        self.mask_id = mask_id
        self.special = special
        self.continuation = continuation
        self.replacement_ids = np.flatnonzero(~special)
        self.encoder_mask_ratio = encoder_mask_ratio
        self.decoder_mask_ratio = decoder_mask_ratio
        self.seed = seed
        # Plain MLM (embedkit/objectives/mlm.py) reads only the encoder view; the decoder's
        # L x L attention per text is most of the collator's work, so it is not built then.
        self.decoder_views = decoder_views

    @classmethod
    def from_tokenizer(cls, tokenizer, **kwargs) -> "MLMCollator":
        if tokenizer.mask_token_id is None or tokenizer.pad_token_id is None:
            raise ValueError("RetroMAE needs a tokenizer with a mask and a pad token")
        vocab = tokenizer.get_vocab()
        size = max(max(vocab.values()), *tokenizer.all_special_ids) + 1
        special = np.zeros(size, dtype=bool)
        special[tokenizer.all_special_ids] = True
        continuation = np.zeros(size, dtype=bool)
        for token, i in vocab.items():
            if token.startswith("##") and len(token) > 2:
                continuation[i] = True
        return cls(tokenizer.pad_token_id, tokenizer.mask_token_id, special, continuation, **kwargs)

    def example(self, ids: np.ndarray, index: int, epoch: int, width: int):
        """(encoder ids, labels, decoder attention (width × width), decoder labels) of one text."""
        rng = np.random.default_rng((self.seed, epoch, index))
        wid = word_ids(ids, self.special, self.continuation)
        enc_mask = sample_word_masks(wid, self.encoder_mask_ratio, rng)[0]
        enc_ids, labels = corrupt_bert(ids, enc_mask, rng, self.mask_id, self.replacement_ids)
        if not self.decoder_views:
            return enc_ids, labels, None, None
        attention = decoder_attention_matrix(wid, self.decoder_mask_ratio, rng, width)
        dec_labels = np.where(wid >= 0, ids, IGNORE)
        return enc_ids, labels, attention, dec_labels

    def __call__(self, items: Sequence[tuple[np.ndarray, int, int]]) -> dict[str, torch.Tensor]:
        rows = [np.asarray(r, dtype=np.int64) for r, _, _ in items]
        padded = pad_rows(rows, self.pad_id)
        width = padded["input_ids"].shape[1]
        b = len(rows)
        input_ids = padded["input_ids"].clone()
        labels = torch.full((b, width), IGNORE, dtype=torch.long)
        dec_labels = torch.full((b, width), IGNORE, dtype=torch.long)
        attention = np.zeros((b, width, width), dtype=bool) if self.decoder_views else None
        for k, (row, index, epoch) in enumerate(items):
            enc_ids, lab, att, dlab = self.example(rows[k], index, epoch, width)
            n = len(rows[k])
            input_ids[k, :n] = torch.from_numpy(enc_ids)
            labels[k, :n] = torch.from_numpy(lab)
            if self.decoder_views:
                dec_labels[k, :n] = torch.from_numpy(dlab)
                attention[k] = att
        if not self.decoder_views:
            return {"input_ids": input_ids, "attention_mask": padded["attention_mask"], "labels": labels}
        return {
            "input_ids": input_ids,
            "attention_mask": padded["attention_mask"],
            "labels": labels,
            "decoder_input_ids": padded["input_ids"],
            "decoder_attention": torch.from_numpy(attention),
            "decoder_labels": dec_labels,
        }


# ---------------------------------------------------------------- the data module

class MLMDataModule(TextDataModule):
    """Serves RetroMAE batches of single texts; sources return `{"text": ...}` rows.

    The mask ratios are the data's (`data.encoder_mask_ratio`, `data.decoder_mask_ratio`): only the
    collator applies them, the RetroMAE loss never reads them. Plain text has no queries, so no
    query instruction.
    """

    serving_args = TextDataModule.serving_args | {
        "max_len", "encoder_mask_ratio", "decoder_mask_ratio", "group_by_length", "decoder_views"}

    def __init__(self, sources: Sequence[Callable[[], list[dict]]], batch_size: int = 32,
                 max_len: int = 128, encoder_mask_ratio: float = 0.3, decoder_mask_ratio: float = 0.5,
                 group_by_length: bool = True, seed: int = 0, cache_dir: str | None = None,
                 num_workers: int = 0, max_examples: int | None = None, on_bad_row: str = "error",
                 decoder_views: bool = True):
        super().__init__(sources, batch_size=batch_size, seed=seed, cache_dir=cache_dir,
                         num_workers=num_workers, max_examples=max_examples, on_bad_row=on_bad_row)
        if max_len < 3:
            raise ValueError(f"max_len must leave room for a token between the specials, got {max_len}")
        self.max_len = max_len
        self.encoder_mask_ratio = encoder_mask_ratio
        self.decoder_mask_ratio = decoder_mask_ratio
        self.group_by_length = group_by_length
        self.decoder_views = decoder_views
        self.dataset: TextDataset | None = None
        self.collator: MLMCollator | None = None

    def texts_of(self, example: dict) -> list[str]:
        return [example["text"]]

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        if self.tokenizer is None:
            raise RuntimeError("call attach_tokenizer(tokenizer) before setup()")
        table = tokenize_table([ex["text"] for ex in self.examples], self.tokenizer, self.max_len,
                               self.cache_dir)
        self.dataset = TextDataset(table)
        self.collator = MLMCollator.from_tokenizer(
            self.tokenizer, encoder_mask_ratio=self.encoder_mask_ratio,
            decoder_mask_ratio=self.decoder_mask_ratio, seed=self.seed, decoder_views=self.decoder_views)
        log.info("MLM data: %d texts, %d tokens (max_len %d)", len(table), int(table.lengths().sum()),
                 self.max_len)

    def batch_sampler(self) -> GroupBatchSampler:
        return self.group_batch_sampler(self.dataset.table.lengths(), self.group_by_length)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_sampler=self.batch_sampler(), collate_fn=self.collator,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)
