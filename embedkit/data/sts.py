"""STS training data: (sentence1, sentence2, score) pairs in batches, for CoSENT.

A batch is {"sentence1": tokens, "sentence2": tokens, "labels": float scores}, each side padded to
its own longest row. Texts are tokenised once (shared with the contrastive data's on-disk cache,
`tokenize_table`), and the order of batches is a pure function of the seed and the epoch
(`GroupBatchSampler`), so two runs with the same seed see the same batches.

Batches are random by default, not grouped by length: CoSENT ranks the pairs of a batch against each
other, so which pairs share a batch matters, and STS sentences are short enough that padding costs
little. The last incomplete batch is dropped, as a ranking loss needs at least two pairs.
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


def sts_jsonl(data_dir: str, file: str, on_bad_row: str = "error",
              score_range: Sequence[float] | None = None, max_rows: int | None = None) -> list[dict]:
    """An STS jsonl file ({"sentence1", "sentence2", "score"}) of the zh-mini bundle, e.g.
    `train/stsb_pairs.jsonl` (scores 0..5)."""
    from embedkit.data.paths import data_file
    from embedkit.data.readers import read_sts_jsonl

    return read_sts_jsonl(data_file(data_dir, file), on_bad_row=on_bad_row,
                          score_range=tuple(score_range) if score_range is not None else None).head(max_rows)


def sts_files(pattern: str, on_bad_row: str = "error",
              score_range: Sequence[float] | None = None) -> list[dict]:
    """Every STS jsonl file ({"sentence1", "sentence2", "score"}) matching a glob: the STS data at
    paper scale."""
    import glob

    from embedkit.data.readers import ReadResult, read_sts_jsonl

    files = sorted(glob.glob(pattern))
    if not files:
        raise FileNotFoundError(f"no STS files match {pattern!r}; set the stage's data sources or "
                                f"EMBEDKIT_PAPER_DATA_DIR (conf/paths/default.yaml)")
    scores = tuple(score_range) if score_range is not None else None
    return ReadResult.concat([read_sts_jsonl(f, on_bad_row=on_bad_row, score_range=scores) for f in files])


class PairDataset(Dataset):
    """Items are (example index, epoch); the epoch is unused (kept for the shared batch sampler)."""

    def __init__(self, texts: TokenTable, first: np.ndarray, second: np.ndarray, scores: np.ndarray):
        self.texts = texts
        self.first = first
        self.second = second
        self.scores = scores

    def __len__(self) -> int:
        return len(self.scores)

    def __getitem__(self, item: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, float]:
        index, _epoch = item
        return (self.texts.row(int(self.first[index])), self.texts.row(int(self.second[index])),
                float(self.scores[index]))


class PairCollator:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items):
        return {"sentence1": pad_rows([a for a, _, _ in items], self.pad_id),
                "sentence2": pad_rows([b for _, b, _ in items], self.pad_id),
                "labels": torch.tensor([s for _, _, s in items], dtype=torch.float32)}


class StsDataModule(TextDataModule):
    """Reads the configured STS sources, tokenises once, serves batches of scored pairs.

    `sources` are callables returning {"sentence1", "sentence2", "score"} rows (Hydra builds them
    from `conf/data/sts_pairs.yaml`). No query instruction: STS pairs are symmetric and BGE's rule
    gives them none.
    """

    serving_args = TextDataModule.serving_args | {"max_len", "group_by_length"}

    def __init__(self, sources: Sequence[Callable[[], list[dict]]], batch_size: int = 32,
                 max_len: int = 128, group_by_length: bool = False, seed: int = 0,
                 cache_dir: str | None = None, num_workers: int = 0,
                 max_examples: int | None = None, on_bad_row: str = "error"):
        super().__init__(sources, batch_size=batch_size, seed=seed, cache_dir=cache_dir,
                         num_workers=num_workers, max_examples=max_examples, on_bad_row=on_bad_row)
        if batch_size < 2:
            raise ValueError(f"CoSENT ranks pairs against each other; batch_size must be >= 2, got {batch_size}")
        self.max_len = max_len
        self.group_by_length = group_by_length
        self.dataset: PairDataset | None = None

    def texts_of(self, example: dict) -> list[str]:
        return [example["sentence1"], example["sentence2"]]

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        if self.tokenizer is None:
            raise RuntimeError("call attach_tokenizer(tokenizer) before setup()")
        index: dict[str, int] = {}
        for ex in self.examples:
            for text in self.texts_of(ex):
                index.setdefault(text, len(index))
        texts = tokenize_table(list(index), self.tokenizer, self.max_len, self.cache_dir)
        self.dataset = PairDataset(
            texts,
            np.array([index[ex["sentence1"]] for ex in self.examples], dtype=np.int64),
            np.array([index[ex["sentence2"]] for ex in self.examples], dtype=np.int64),
            np.array([float(ex["score"]) for ex in self.examples], dtype=np.float32))
        log.info("STS data: %d pairs, %d distinct sentences", len(self.dataset), len(texts))

    def batch_sampler(self) -> GroupBatchSampler:
        ds = self.dataset
        return self.group_batch_sampler(ds.texts.lengths()[ds.first] + ds.texts.lengths()[ds.second],
                                        self.group_by_length)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_sampler=self.batch_sampler(),
                          collate_fn=PairCollator(self.tokenizer.pad_token_id),
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)
