"""What every training data module shares, so the recipe treats them alike.

The recipe reads the sources once (`examples`), builds the tokenizer from `vocab_texts()`, hands it
over with `attach_tokenizer`, and lets ablation rows share already-read rows with `use_examples`.
Subclasses say which texts an example holds (`texts_of`) and how to batch them.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import pytorch_lightning as pl


class TextDataModule(pl.LightningDataModule):
    def __init__(self, sources: Sequence[Callable[[], list[dict]]], batch_size: int = 32,
                 seed: int = 0, cache_dir: str | None = None, num_workers: int = 0,
                 max_examples: int | None = None):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.sources = list(sources)
        self.batch_size = batch_size
        self.seed = seed
        self.cache_dir = cache_dir
        self.num_workers = num_workers
        self.max_examples = max_examples
        self.tokenizer = None
        self._examples: list[dict] | None = None

    def texts_of(self, example: dict) -> list[str]:
        raise NotImplementedError

    @property
    def examples(self) -> list[dict]:
        if self._examples is None:
            examples = [row for source in self.sources for row in source()]
            if not examples:
                raise ValueError("the configured training sources produced no examples")
            if self.max_examples and len(examples) > self.max_examples:
                keep = np.random.default_rng(self.seed).choice(len(examples), self.max_examples,
                                                               replace=False)
                examples = [examples[i] for i in np.sort(keep)]
            self._examples = examples
        return self._examples

    def use_examples(self, examples: list[dict]) -> None:
        """Share rows already read by another module (ablation rows differ in batching, not data)."""
        self._examples = examples

    def vocab_texts(self) -> list[str]:
        """Every training text, for building a character vocabulary."""
        return [t for ex in self.examples for t in self.texts_of(ex)]

    def attach_tokenizer(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def group_batch_sampler(self, lengths: np.ndarray, group_by_length: bool):
        """Fixed-size, seeded, epoch-aware batches; under DDP each rank takes its slice of a global batch."""
        import torch

        from embedkit.data.contrastive import GroupBatchSampler

        num_replicas, rank = 1, 0
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            num_replicas, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        if len(lengths) < self.batch_size * num_replicas:
            raise ValueError(
                f"batch size {self.batch_size} x {num_replicas} device(s) is larger than the "
                f"{len(lengths)} training examples; lower data.batch_size or add data")
        return GroupBatchSampler(lengths, self.batch_size, self.seed, group_by_length,
                                 drop_last=True, num_replicas=num_replicas, rank=rank)
