"""Contrastive data whose negatives are mined when the data is read, so the mining settings are
data settings and sweep with `-m` like any other (`data=zh_mini_mined`).

The rows of `sources` are mined with `HardNegativeMiner` (embedkit/mining/ann.py) by
`mining.model_path` (a saved encoder folder, e.g. a finished general stage) or, when null, by a
fresh tiny_zh over the rows' characters (mean-pooled random embeddings rank by shared
characters), then served as ContrastiveDataModule serves any rows. The mined rows are cached on
disk under `cache_dir`, keyed by the input rows and the settings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Callable, Mapping, Sequence

from embedkit.data.contrastive import ContrastiveDataModule

log = logging.getLogger(__name__)


def mine_rows(rows: list[dict], range_for_sampling="10-210", negative_number: int = 15,
              model_path: str | None = None, keep_candidates: int = 0,
              query_instruction: str | None = None, cache_dir: str | None = None,
              seed: int = 0, index: str = "flat", use_gpu="auto") -> list[dict]:
    from embedkit.mining.ann import HardNegativeMiner

    settings = dict(range_for_sampling=str(range_for_sampling), negative_number=negative_number,
                    model_path=model_path, keep_candidates=keep_candidates,
                    query_instruction=query_instruction, seed=seed, index=index)
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode())
    for r in rows:
        digest.update(json.dumps([r["query"], r["pos"], r.get("neg", [])], ensure_ascii=False).encode())
    path = Path(cache_dir) / "mined" / f"{digest.hexdigest()[:20]}.jsonl" if cache_dir else None
    if path is not None and path.exists():
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f]
    encoder = _encoder(rows, model_path, seed)
    miner = HardNegativeMiner(range_for_sampling=range_for_sampling, negative_number=negative_number,
                              query_instruction=query_instruction, keep_candidates=keep_candidates,
                              index=index, use_gpu=use_gpu, seed=seed)
    mined, report = miner(rows, encoder)
    log.info("mined the training data: %s", report)
    if path is not None:
        from embedkit.data.weak_pairs import write_jsonl

        write_jsonl(mined, path)
    return mined


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


class MinedContrastiveDataModule(ContrastiveDataModule):
    # The miner embeds instructed queries: the instruction changes the mined rows.
    serving_args = ContrastiveDataModule.serving_args - {"query_instruction"}

    def __init__(self, sources: Sequence[Callable[[], list[dict]]], mining: Mapping | None = None,
                 **kwargs):
        super().__init__(sources, **kwargs)
        self.mining = dict(mining or {})

    @property
    def examples(self) -> list[dict]:
        if self._examples is None:
            rows = ContrastiveDataModule.examples.fget(self)
            self._examples = mine_rows(rows, query_instruction=self.query_instruction or None,
                                       cache_dir=self.cache_dir, seed=self.seed, **self.mining)
        return self._examples
