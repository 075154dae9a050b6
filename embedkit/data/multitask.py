"""Several training tasks in one run: retrieval groups and STS pairs, mixed per optimizer step.

`mode="cbb"` (Conan-Embedding's cross-GPU batch balance, Li et al. 2024, arXiv:2408.15710 §3.4):
every step holds one batch of *every* task, `{task: batch}`, through Lightning's `CombinedLoader`
in `max_size_cycle` mode (an epoch is the longest task's batches; shorter tasks start over).

`mode="sequential"`: the "sequential random task" training Conan compares against: every step
holds one batch of *one* task, `{task: batch}`; the order of all tasks' batches is a seeded
shuffle per epoch, so an epoch still covers every task's data once.

Each task is an ordinary data module (ContrastiveDataModule, StsDataModule) with its own batch
size: Conan's STS batch is larger than its per-GPU retrieval batch (32 vs 4). Each task applies
its own query instruction (the contrastive task: `query_instruction`).
"""

from __future__ import annotations

import json
from typing import Mapping

import numpy as np
import pytorch_lightning as pl

MODES = ("cbb", "sequential")


class SequentialTasks:
    """One task's batch per step, the tasks' batches in a seeded random order per epoch."""

    def __init__(self, loaders: Mapping, seed: int = 0):
        self.loaders = dict(loaders)
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return sum(len(dl) for dl in self.loaders.values())

    def order(self, epoch: int) -> list[str]:
        names = [name for name, dl in self.loaders.items() for _ in range(len(dl))]
        return [names[i] for i in np.random.default_rng((self.seed, epoch)).permutation(len(names))]

    def __iter__(self):
        epoch, self.epoch = self.epoch, self.epoch + 1
        iters = {}
        for name, dl in self.loaders.items():
            sampler = getattr(dl, "batch_sampler", None)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            iters[name] = iter(dl)
        for name in self.order(epoch):
            yield {name: next(iters[name])}


class MultiTaskDataModule(pl.LightningDataModule):
    def __init__(self, tasks: Mapping[str, pl.LightningDataModule], mode: str = "cbb", seed: int = 0,
                 max_examples: int | None = None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not tasks:
            raise ValueError("MultiTaskDataModule needs at least one task")
        self.tasks = dict(tasks)
        self.mode = mode
        self.seed = seed
        self.max_examples = max_examples
        if max_examples:
            for dm in self.tasks.values():   # a run-wide cap (debug=smoke) caps every task
                dm.max_examples = min(dm.max_examples or max_examples, max_examples)
        self.tokenizer = None

    def examples_key(self) -> str:
        """Which rows the tasks read: each task's own key, and the run-wide cap applied to them
        (`mode` and `seed` only order the tasks' batches)."""
        return json.dumps({"module": f"{type(self).__module__}.{type(self).__qualname__}",
                           "tasks": {name: json.loads(dm.examples_key()) for name, dm in self.tasks.items()},
                           "max_examples": self.max_examples}, sort_keys=True, ensure_ascii=False)

    @property
    def examples(self) -> dict[str, list[dict]]:
        return {name: dm.examples for name, dm in self.tasks.items()}

    @property
    def bad_rows(self) -> dict[str, list[tuple[int, str]]]:
        """Every task's skipped rows ({file: [(line, reason), ...]}), for the run's results.json."""
        merged: dict[str, list[tuple[int, str]]] = {}
        for dm in self.tasks.values():
            for path, rows in getattr(dm, "bad_rows", {}).items():
                merged.setdefault(path, []).extend(rows)
        return merged

    def use_examples(self, examples: Mapping[str, list[dict]]) -> None:
        for name, dm in self.tasks.items():
            dm.use_examples(examples[name])

    def vocab_texts(self):
        for dm in self.tasks.values():
            yield from dm.vocab_texts()

    def attach_tokenizer(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        for dm in self.tasks.values():
            dm.attach_tokenizer(tokenizer)

    def setup(self, stage: str | None = None) -> None:
        for dm in self.tasks.values():
            dm.setup(stage)

    def train_dataloader(self):
        loaders = {name: dm.train_dataloader() for name, dm in self.tasks.items()}
        if self.mode == "sequential":
            return SequentialTasks(loaders, seed=self.seed)
        from pytorch_lightning.utilities import CombinedLoader

        return CombinedLoader(loaders, mode="max_size_cycle")
