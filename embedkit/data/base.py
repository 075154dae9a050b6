"""What every training data module shares, so the recipe treats them alike.

The recipe reads the sources once (`examples`), builds the tokenizer from `vocab_texts()`, hands it
over with `attach_tokenizer`, and lets ablation rows share already-read rows with `use_examples`.
Subclasses say which texts an example holds (`texts_of`) and how to batch them.

Which rows a module reads is the module's to say (`examples_key`): by default every constructor
argument except those a class lists in `serving_args` (arguments that change how rows are served,
tokenised or batched, not which rows are read). Two data configs whose modules give the same key
share one read of the rows; an argument a new subclass adds is part of the key unless it says
otherwise, so a module whose rows depend on it never silently reuses another's rows.

`on_bad_row` ("error" or "skip") reaches every source that reads files (their `on_bad_row`
argument, unless the source's own config sets it); skipped rows are logged and kept in
`bad_rows` ({file: [(line, reason), ...]}), which the recipe writes into results.json.

The module is stateful for Lightning's checkpoints: `state_dict` records how many batches of the
current epoch were consumed, and after `load_state_dict` the batch sampler skips those, so a run
resumed mid-epoch sees the same remaining batches as an uninterrupted one.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
from typing import Callable, Iterator, Sequence

import numpy as np
import pytorch_lightning as pl

from embedkit.data.batching import GroupBatchSampler
from embedkit.data.sources import call_source

log = logging.getLogger(__name__)
BAD_ROW_POLICIES = ("error", "skip")


class TextDataModule(pl.LightningDataModule):
    #: Constructor arguments that do not change which rows `examples` reads (left out of
    #: `examples_key`); a subclass extends the set with its own such arguments.
    serving_args: frozenset[str] = frozenset({"batch_size", "cache_dir", "num_workers"})

    def __new__(cls, *args, **kwargs):
        self = super().__new__(cls)
        # The arguments the module was built with, for `examples_key` (a copy or an unpickled
        # module gets no arguments here: its __dict__ brings the recorded ones back).
        try:
            bound = inspect.signature(cls.__init__).bind(None, *args, **kwargs)
        except TypeError:
            self._init_args = {}
        else:
            bound.apply_defaults()
            named = dict(list(bound.arguments.items())[1:])
            for name, param in inspect.signature(cls.__init__).parameters.items():
                if param.kind is inspect.Parameter.VAR_KEYWORD:
                    named.update(named.pop(name, {}))
                elif param.kind is inspect.Parameter.VAR_POSITIONAL:
                    named[name] = list(named.get(name, ()))
            self._init_args = named
        return self

    def __init__(self, sources: Sequence[Callable[[], list[dict]]], batch_size: int = 32,
                 seed: int = 0, cache_dir: str | None = None, num_workers: int = 0,
                 max_examples: int | None = None, on_bad_row: str = "error"):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if on_bad_row not in BAD_ROW_POLICIES:
            raise ValueError(f"data.on_bad_row must be one of {BAD_ROW_POLICIES}, got {on_bad_row!r}")
        self.on_bad_row = on_bad_row
        self.bad_rows: dict[str, list[tuple[int, str]]] = {}
        self._resume: dict | None = None
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

    def examples_key(self) -> str:
        """Which rows this module reads, as a string: equal for two modules exactly when they read
        the same rows (the recipe then reads them once, `embedkit.recipes.train_eval.Examples`).

        The class and every constructor argument not in `serving_args`; sources (Hydra's
        `_partial_` callables) by their target and arguments. A subclass whose rows depend on
        something else overrides it."""
        args = {k: v for k, v in self._init_args.items() if k not in self.serving_args}
        return json.dumps({"module": f"{type(self).__module__}.{type(self).__qualname__}",
                           "args": plain(args)}, sort_keys=True, ensure_ascii=False, default=repr)

    @property
    def examples(self) -> list[dict]:
        if self._examples is None:
            examples, source_ids, file_ids = [], [], []
            for s, source in enumerate(self.sources):
                rows = self._read(source)
                examples.extend(rows)
                source_ids.append(np.full(len(rows), s, dtype=np.int32))
                for n in getattr(rows, "file_rows", None) or [len(rows)]:
                    file_ids.append(np.full(n, len(file_ids), dtype=np.int32))
            if not examples:
                raise ValueError("the configured training sources produced no examples")
            source_ids, file_ids = np.concatenate(source_ids), np.concatenate(file_ids)
            if self.max_examples and len(examples) > self.max_examples:
                keep = np.sort(np.random.default_rng(self.seed).choice(len(examples), self.max_examples,
                                                                       replace=False))
                examples, source_ids, file_ids = [examples[i] for i in keep], source_ids[keep], file_ids[keep]
            self._examples = SourcedRows(examples, source_ids, file_ids)
        return self._examples

    def _read(self, source: Callable[[], list[dict]]) -> list[dict]:
        rows = call_source(source, self.on_bad_row)
        for path, skipped in (getattr(rows, "skipped_by_path", None) or {}).items():
            if skipped:
                self.bad_rows.setdefault(path, []).extend(skipped)
                line, reason = skipped[0]
                log.warning("skipped %d bad row(s) of %s (data.on_bad_row=skip); first: line %d: %s",
                            len(skipped), path, line, reason)
        return rows

    def use_examples(self, examples: list[dict]) -> None:
        """Share rows already read by another module (ablation rows differ in batching, not data)."""
        self._examples = examples

    def vocab_texts(self) -> Iterator[str]:
        """Every training text, streamed row by row, for building a character vocabulary (the
        store's rows are read from disk as they are iterated, never all held)."""
        for ex in self.examples:
            yield from self.texts_of(ex)

    def source_ids(self, unit: str = "source") -> np.ndarray:
        """Each example's source (its index in `sources`), or its file (`unit="file"`: numbered
        across sources in reading order; a source made in Python is one "file"), for multi-source
        sampling."""
        ids = getattr(self.examples, f"{unit}_ids", None)
        if ids is None:
            raise ValueError("these examples carry no source ids (rows shared with use_examples() "
                             "from a plain list); multi-source sampling needs the module's own read")
        return np.asarray(ids() if callable(ids) else ids)

    def attach_tokenizer(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def group_batch_sampler(self, lengths: np.ndarray, group_by_length: bool):
        """Fixed-size, seeded, epoch-aware batches; under DDP each rank takes its slice of a global batch."""
        import torch

        num_replicas, rank = 1, 0
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            num_replicas, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        if len(lengths) < self.batch_size * num_replicas:
            raise ValueError(
                f"batch size {self.batch_size} x {num_replicas} device(s) is larger than the "
                f"{len(lengths)} training examples; lower data.batch_size or add data")
        sampler = GroupBatchSampler(lengths, self.batch_size, self.seed, group_by_length,
                                    drop_last=True, num_replicas=num_replicas, rank=rank)
        if self._resume is not None:
            sampler.skip_batches(self._resume["epoch"], self._resume["batches"])
            self._resume = None
        return sampler

    # ------------------------------------------------------------------ resuming mid-epoch

    def state_dict(self) -> dict:
        """Batches of the current epoch consumed so far; Lightning saves it in every checkpoint."""
        trainer = self.trainer
        if trainer is None:
            return {}
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        # Checkpoints are written at the end of a training batch: it counts as processed.
        return {"epoch": int(trainer.current_epoch), "batches": int(progress.processed)}

    def load_state_dict(self, state_dict: dict) -> None:
        # Restored before train_dataloader() is built; the sampler picks it up there.
        self._resume = dict(state_dict) if state_dict else None


class SourcedRows(list):
    """The examples (this object is the list) and, per row, the index of the source and of the
    file it came from: shared by reference between modules (`use_examples`), the ids travel with
    the rows."""

    def __init__(self, rows, source_ids: np.ndarray, file_ids: np.ndarray):
        super().__init__(rows)
        self.source_ids, self.file_ids = np.asarray(source_ids), np.asarray(file_ids)


def plain(value):
    """`value` as JSON-able data, for keys: configs as containers, a `functools.partial` (a
    configured source) as its target and arguments, a function as its qualified name."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, functools.partial):
        return {"_target_": plain(value.func), "args": plain(list(value.args)),
                "kwargs": plain(dict(value.keywords))}
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "examples_key") and not isinstance(value, type):   # a task's data module
        return json.loads(value.examples_key())
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    return value
