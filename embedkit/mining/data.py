"""Contrastive data whose negatives are mined when the stage's training sets the data up, so the
mining settings are data settings and sweep with `-m` like any other (`data=zh_mini_mined`).

The rows of `sources` are mined with `HardNegativeMiner` (embedkit/mining/ann.py: FlagEmbedding's
`hn_mine.py` on faiss) by `mining.model_path` (a saved encoder folder, e.g. the previous stage's
`model/`: C-Pack §4.3 mines the task data with the stage-1 model) or, when null, by a fresh tiny_zh
over the rows' characters (mean-pooled random embeddings rank by shared characters), then served as
ContrastiveDataModule serves any rows.

When mining happens: `examples` are the rows as read until `setup()` (or `mine()`) replaces them by
the mined rows. A staged run reads every stage's rows up front, for one vocabulary
(embedkit/recipes/train_eval.py `Examples`), before the stage whose model mines exists; mining only
changes which of those rows' texts are negatives, so the vocabulary needs the rows as read, and
mining waits for `trainer.fit`: Lightning calls `prepare_data` (one process per node) and then
`setup` (every process) once the previous stage has finished and exported its model. Neither the
plan (`plan=true`) nor the preflight checks build a trainer, so neither mines.

The mined rows are cached under `cache_dir/mined/`, keyed by the rows as read (query, pos, neg,
prompt), the mining settings and the content of the model folder (`model_digest`); a stage resumed
or re-run with the same model reads them back instead of mining again. `prepare_data` mines and
fills that cache on one process, so under DDP the other processes read the same rows from it.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import tempfile
from pathlib import Path
from typing import Callable, Mapping, Sequence

from embedkit.data.base import SourcedRows
from embedkit.data.contrastive import ContrastiveDataModule
from embedkit.runs import DONE

log = logging.getLogger(__name__)


def mine_rows(rows: list[dict], range_for_sampling="10-210", negative_number: int = 15,
              model_path: str | None = None, keep_candidates: int = 0,
              query_instruction: str | None = None, cache_dir: str | None = None,
              seed: int = 0, index: str = "flat", use_gpu="auto", device: str = "cpu") -> list[dict]:
    """`rows` with `neg` replaced by hard negatives mined from the rows' own pos/neg texts.

    Per row, FlagEmbedding's rule (embedkit/mining/ann.py): rank the pool by cos(E(instruction +
    query), E(passage)), keep the slice [a:b] of `range_for_sampling = "a-b"` without the query and
    the positives, sample `negative_number` of it, fill a shortfall with random pool texts.
    `model_path` is the encoder E (null: a fresh tiny_zh seeded by `seed`); `device` is where it
    embeds (not part of the cache key: it changes no ranking beyond float rounding).
    """
    from embedkit.mining.ann import HardNegativeMiner

    if model_path:
        _check_model_folder(model_path)
    settings = dict(range_for_sampling=str(range_for_sampling), negative_number=negative_number,
                    model=model_digest(model_path) if model_path else None,
                    keep_candidates=keep_candidates, query_instruction=query_instruction or None,
                    seed=seed, index=index)
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode())
    for r in rows:
        # `prompt` is the row's own instruction (embedkit/data/instructions.py): it changes the
        # query the miner embeds.
        digest.update(json.dumps([r["query"], r["pos"], r.get("neg", []), r.get("prompt")],
                                 ensure_ascii=False).encode())
    path = Path(cache_dir) / "mined" / f"{digest.hexdigest()[:20]}.jsonl" if cache_dir else None
    if path is not None and path.exists():
        log.info("mined rows read from the cache: %s", path)
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f]
    encoder = _encoder(rows, model_path, seed).to(device)
    miner = HardNegativeMiner(range_for_sampling=range_for_sampling, negative_number=negative_number,
                              query_instruction=query_instruction, keep_candidates=keep_candidates,
                              index=index, use_gpu=use_gpu, seed=seed)
    mined, report = miner(rows, encoder)
    log.info("mined the training data with %s: %s", model_path or "a fresh tiny_zh", report)
    if path is not None:
        from embedkit.data.weak_pairs import write_jsonl

        write_jsonl(mined, path)
    return mined


def model_digest(model_path: str | Path) -> str:
    """sha1 over the names and bytes of a saved encoder folder's files: rows mined with one model
    are never served for another saved under the same path later (a stage deleted and trained
    again). The stage's `.done` record is left out: its timings differ between equal models."""
    root = Path(model_path)
    digest = hashlib.sha1()
    for file in sorted(p for p in root.rglob("*") if p.is_file() and p.name != DONE):
        digest.update(f"{file.relative_to(root).as_posix()}\0{file.stat().st_size}\0".encode())
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _check_model_folder(model_path) -> None:
    path = Path(model_path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"data.mining.model_path: no encoder folder at {path}; it must exist when the stage's "
            f"data is set up for training (in a staged run, `${{model.init_from}}` is the previous "
            f"stage's model/ folder, written when that stage finishes)")
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"data.mining.model_path: {path} holds no saved encoder "
                                f"(config.json missing); did the stage that writes it finish?")


def _encoder(rows, model_path, seed):
    import torch

    from embedkit.models.build import char_level_tokenizer, load_encoder, tiny_zh_encoder

    if model_path:
        return load_encoder(model_path)
    torch.manual_seed(seed)
    texts = [t for r in rows for t in (r["query"], *r["pos"], *r.get("neg", ()))]
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = char_level_tokenizer(texts, out_dir=tmp, corpora=())
    return tiny_zh_encoder(tokenizer, hidden_size=128, num_layers=2, num_heads=2,
                           intermediate_size=512, pooling="mean")


#: What `mining:` may set: `mine_rows`' settings; the module passes the rows, cache_dir, seed and
#: device itself.
MINING_SETTINGS = tuple(p for p in inspect.signature(mine_rows).parameters
                        if p not in ("rows", "cache_dir", "seed", "device"))


def check_mining(mining: Mapping) -> None:
    """Refuse unknown or malformed `data.mining` settings when the module is built, which a run
    does before training any stage: a typo must not surface only after the previous stage trained."""
    from embedkit.mining.ann import INDEX_KINDS, parse_range

    unknown = sorted(set(mining) - set(MINING_SETTINGS))
    if unknown:
        raise ValueError(f"data.mining: unknown setting(s) {unknown}; it takes {', '.join(MINING_SETTINGS)}")
    try:
        parse_range(mining.get("range_for_sampling", "10-210"))
    except ValueError as err:
        raise ValueError(f"data.mining.{err}") from None
    for key in ("negative_number", "keep_candidates"):
        value = mining.get(key, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"data.mining.{key} must be an integer >= 0, got {value!r}")
    if mining.get("index", "flat") not in INDEX_KINDS:
        raise ValueError(f"data.mining.index must be one of {INDEX_KINDS}, got {mining['index']!r}")
    model_path = mining.get("model_path")
    if model_path is not None and not isinstance(model_path, (str, Path)):
        raise ValueError(f"data.mining.model_path must be a folder path or null, got {model_path!r}")


class MinedContrastiveDataModule(ContrastiveDataModule):
    """ContrastiveDataModule whose rows get mined negatives in `setup()` (see the module docstring).

    `mining`: `mine_rows`' settings (`MINING_SETTINGS`): range_for_sampling, negative_number,
    model_path, keep_candidates, query_instruction (the miner's, FlagEmbedding hn_mine's
    `--query_instruction_for_retrieval`; not the training's `query_instruction`), index, use_gpu.
    """

    # `mining` and `query_instruction` stay in `examples_key`, though the rows as read depend on
    # neither (mining happens in setup(), cached under `mine_rows`' own key): a key finer than the
    # rows costs one more read of the files, never wrong rows.
    serving_args = ContrastiveDataModule.serving_args - {"query_instruction"}

    def __init__(self, sources: Sequence[Callable[[], list[dict]]], mining: Mapping | None = None,
                 **kwargs):
        super().__init__(sources, **kwargs)
        if self.store != "memory":
            # The miner ranks and rewrites rows held in memory (C-MTP labeled, 838k rows, fits);
            # a store-sized set is mined offline (python -m embedkit.mining) into a jsonl that
            # data=mined_file then trains from the store.
            raise ValueError(f"data.store={self.store} cannot mine at setup; set data.store=memory, or "
                             f"mine offline with `python -m embedkit.mining` and train data=mined_file")
        self.mining = dict(mining or {})
        check_mining(self.mining)
        self._mined: list[dict] | None = None

    @property
    def examples(self) -> list[dict]:
        """The rows as served: as read until `setup()` / `mine()`, mined from then on."""
        return self._mined if self._mined is not None else super().examples

    def use_examples(self, examples: list[dict]) -> None:
        super().use_examples(examples)
        self._mined = None

    def mine(self) -> list[dict]:
        """The rows with mined negatives (mined once, or read from the cache), served from now on."""
        if self._mined is None:
            rows = super().examples
            mined = mine_rows(rows, cache_dir=self.cache_dir, seed=self.seed,
                              device=self._device(), **self.mining)
            # Mining keeps the rows and their order: their sources carry over (same-source batches).
            if isinstance(rows, SourcedRows) and len(mined) == len(rows):
                mined = SourcedRows(mined, rows.source_ids, rows.file_ids)
            self._mined = mined
        return self._mined

    def prepare_data(self) -> None:
        # Lightning runs this on one process per node, before every process's setup(): mining here
        # fills the cache that the others then read. Without a cache each process mines in setup().
        if self.cache_dir:
            self.mine()

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is None:
            self.mine()
        super().setup(stage)

    def _device(self) -> str:
        # The trainer's device (this process's GPU under DDP) once fit() runs; the CPU otherwise.
        trainer = getattr(self, "trainer", None)
        return str(trainer.strategy.root_device) if trainer is not None else "cpu"
