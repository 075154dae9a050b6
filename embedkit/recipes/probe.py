"""A Lightning callback that records what a stage's training steps really ran with.

`python run.py ... +stages.<name>.callbacks.probe={_target_: embedkit.recipes.probe.SettingsProbe,
out_dir: DIR}` (or `callbacks.probe` for a single-stage run) writes, on every rank and for every
stage it is attached to, `DIR/fit-<k>-rank<r>.json` (k counts this rank's stages, in training
order) with:

- `world_size`, `rank`, the trainer's `precision`, `strategy` and `max_steps`;
- `lr`: each optimiser parameter group's `initial_lr` and the scheduler's `base_lrs` (the lr of
  step 0 is the warm-up's 0, so the base is what the config set);
- `batch`: this rank's rows per task in the first batch holding the task, and `global_batch`:
  their sum over ranks;
- `losses`: per loss module (`named_modules` of the objective's loss, "" the loss itself) the
  settings it holds (temperature, negatives_cross_device, Matryoshka dims, M3 and multi-task
  weights, ...), and, from its first forward call with passages, `queries` and `passages` on this rank and
  `candidates_per_query`: the passages each query is scored against, summed over ranks when the
  loss gathers them (negatives_cross_device), so `negatives_per_query = candidates − 1`;
- `embedding_dim`: the encoder's output width; `data`: the data module's masking ratios, group
  size, batching by source and multi-task mode, where it has them.

It changes nothing in training: it reads settings and shapes only. The recipe's tests read it
back to check that the paper configs' values reach the live objects (tests/test_paper_path.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytorch_lightning as pl
import torch

#: The loss attributes recorded, where a loss module has them.
SETTINGS = ("temperature", "negatives_cross_device", "dims", "weights", "loss_weights", "ensemble_weights",
            "self_distill", "self_distill_start_step", "retrieval_ranks_share_queries", "retrieval_shards",
            "scale", "query_stream")
#: The data module's settings recorded, where it has them.
DATA_SETTINGS = ("encoder_mask_ratio", "decoder_mask_ratio", "train_group_size", "same_source_within_batch", "mode")


def _plain(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value if isinstance(value, (bool, int, float, str)) or value is None else repr(value)


def _rows(batch) -> dict[str, int]:
    """Rows per task of one batch: {"": n} for a single-task batch, {task: n} for a multi-task one."""
    if not isinstance(batch, dict):
        return {}
    for key in ("query", "sentence1"):
        if key in batch:
            return {"": int(batch[key]["input_ids"].shape[0])}
    if "input_ids" in batch:
        return {"": int(batch["input_ids"].shape[0])}
    return {name: rows[""] for name, part in batch.items() if (rows := _rows(part)).get("") is not None}


def _sum_over_ranks(value: int) -> int:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.long)
    torch.distributed.all_reduce(t)
    return int(t.item())


class SettingsProbe(pl.Callback):
    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)
        self.record: dict = {}
        self._hooks: list = []

    def on_train_start(self, trainer, pl_module) -> None:
        scheduler = trainer.lr_scheduler_configs[0].scheduler if trainer.lr_scheduler_configs else None
        self.record = {
            "world_size": trainer.world_size, "rank": trainer.global_rank,
            "precision": str(trainer.precision), "strategy": type(trainer.strategy).__name__,
            "max_steps": trainer.max_steps, "objective": type(pl_module).__name__,
            "lr": {"initial_lr": [g.get("initial_lr", g["lr"]) for opt in trainer.optimizers for g in opt.param_groups],
                   "base_lrs": list(getattr(scheduler, "base_lrs", []))},
            "embedding_dim": getattr(pl_module.encoder, "dim", None),
            "data": {k: _plain(getattr(trainer.datamodule, k)) for k in DATA_SETTINGS
                     if hasattr(trainer.datamodule, k)},
            "losses": {},
        }
        for name, module in pl_module.loss.named_modules():
            found = {k: _plain(getattr(module, k)) for k in SETTINGS if hasattr(module, k)
                     and not isinstance(getattr(module, k), torch.nn.Module)}
            if not found:
                continue
            self.record["losses"][name] = {"class": type(module).__name__, **found}
            self._hooks.append(module.register_forward_hook(self._forward_hook(name)))

    def _forward_hook(self, name: str):
        def hook(module, args, output):
            entry = self.record["losses"][name]
            batch = args[1] if len(args) > 1 else None
            if "candidates_per_query" in entry or not isinstance(batch, dict) or "passages" not in batch:
                return
            queries, passages = int(batch["query"]["input_ids"].shape[0]), int(batch["passages"]["input_ids"].shape[0])
            # the passages this rank's queries are scored against: every rank's when gathered
            candidates = _sum_over_ranks(passages) if getattr(module, "negatives_cross_device", False) else passages
            entry.update(queries=queries, passages=passages, candidates_per_query=candidates)
        return hook

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # each task's first batch (sequential multi-task steps hold one task each)
        rows = {k: v for k, v in _rows(batch).items() if k not in self.record.setdefault("batch", {})}
        self.record["batch"].update(rows)
        self.record.setdefault("global_batch", {}).update({k: _sum_over_ranks(v) for k, v in rows.items()})

    def on_train_end(self, trainer, pl_module) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.out_dir.mkdir(parents=True, exist_ok=True)
        rank = trainer.global_rank
        k = len(list(self.out_dir.glob(f"fit-*-rank{rank}.json")))
        (self.out_dir / f"fit-{k:02d}-rank{rank}.json").write_text(json.dumps(self.record, indent=1))
