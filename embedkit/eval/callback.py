"""Evaluation during training: a fast subset of the suite every N optimizer steps.

`eval.during_training` (conf/eval/mini_cmteb.yaml):

- `every_n_steps`: null (off, the default) or N: after every N-th optimizer step the stage's
  encoder is scored on `tasks` (folder names; null: the suite's own selection) with at most
  `max_rows` rows per task, and `val/<category>` and `val/Avg` (the C-MTEB mean over the subset's
  tasks, embedkit/eval/cmteb.py `summarize`) go to the stage's loggers at that step (the CSV's
  `step` column, W&B's `trainer/global_step`), the step the final `eval/*` metrics use too.
- `keep_best`: null (off) or a logged metric (`val/Avg`, `val/Retrieval`, ...): Lightning's
  `ModelCheckpoint(monitor=keep_best, mode="max", save_top_k=1)` keeps the weights of the best
  check in `<stage folder>/best/step=N.ckpt` (the LightningModule's state_dict, weights only;
  `model/.done` records its path, step and score under `best`). The exported `model/` and the
  final evaluation are always of the LAST step.

The check forks the RNG streams (torch, numpy, python) and puts them back: a run with checks trains
exactly as one without. Under DDP rank 0 scores, the other ranks wait in the broadcast of its
scores, and every rank then holds the same monitored value (ModelCheckpoint saves collectively).
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any, Mapping

from pytorch_lightning.callbacks import Callback

log = logging.getLogger(__name__)

PREFIX = "val/"
BEST_DIR = "best"
KEYS = ("every_n_steps", "tasks", "max_rows", "keep_best")


class EvalDuringTraining(Callback):
    """Scores `suite` (a ready subset: `_Suite.subset`) on the training module's encoder after
    every `every_n_steps`-th optimizer step; `history` lists {"step", "seconds", val/...}."""

    def __init__(self, suite, every_n_steps: int, name: str, output_dir: str | Path,
                 model_name: str = "embedkit/during-training"):
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"eval.during_training.every_n_steps must be a positive integer or null, "
                             f"got {every_n_steps!r}")
        self.suite, self.every, self.name = suite, every_n_steps, name
        self.output_dir, self.model_name = Path(output_dir), model_name
        self.history: list[dict[str, Any]] = []

    def setup(self, trainer, pl_module, stage: str) -> None:
        strategy = trainer.strategy
        if type(strategy).__name__.startswith("FSDP") or getattr(strategy, "zero_stage_3", False):
            # Rank 0 encodes alone; sharded parameters would wait for the other ranks' all-gather.
            raise ValueError(f"eval.during_training: the checks run on rank 0 alone, which "
                             f"{type(strategy).__name__}'s sharded parameters do not allow; train with "
                             "DDP (trainer=ddp) or set eval.during_training.every_n_steps=null")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = int(trainer.global_step)
        # Called per batch: with gradient accumulation the step repeats until the optimizer steps.
        if step == 0 or step % self.every or any(h["step"] == step for h in self.history):
            return
        self.check(trainer, pl_module, step)

    def check(self, trainer, pl_module, step: int) -> dict[str, float]:
        metrics = None
        if trainer.is_global_zero:
            start = time.perf_counter()
            metrics = self.score(pl_module.encoder, step)
            seconds = time.perf_counter() - start
            log.info("%s: step %d, %s", self.name, step,
                     ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()) + f" ({seconds:.1f} s)")
        else:
            seconds = 0.0
        metrics = trainer.strategy.broadcast(metrics, src=0)
        import torch

        for key, value in metrics.items():
            # ModelCheckpoint(monitor=...) reads callback_metrics; it runs after this callback
            # (Lightning moves checkpoint callbacks last).
            trainer.callback_metrics[key] = torch.tensor(value)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)   # rank 0 only: Lightning's loggers are rank-zero
        self.history.append({"step": step, "seconds": round(seconds, 2), **metrics})
        return metrics

    def score(self, encoder, step: int) -> dict[str, float]:
        """{val/<category>: mean, val/Avg: mean over tasks} of `encoder` on the suite, with the
        RNG streams left as they were."""
        import numpy as np
        import torch

        py_state, np_state = random.getstate(), np.random.get_state()
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        try:
            with torch.random.fork_rng(devices=devices):
                results = self.suite.evaluate(encoder, model_name=self.model_name,
                                              revision=f"{self.name.replace('/', '-')}-step{step}",
                                              output_dir=self.output_dir / f"step={step:06d}")
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
        return {f"{PREFIX}{k}": float(v) for k, v in results["categories"].items()} | \
            {f"{PREFIX}Avg": float(results["Avg"])}

    def summary(self) -> dict[str, Any]:
        return {"every_n_steps": self.every, "checks": self.history}

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))


def settings(eval_cfg) -> dict[str, Any]:
    """`eval.during_training` as a dict with every key (null when the node is absent)."""
    from omegaconf import OmegaConf

    node = (eval_cfg.get("during_training") if eval_cfg is not None else None) or {}
    node = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
    unknown = sorted(set(node) - set(KEYS))
    if unknown:
        raise ValueError(f"eval.during_training: unknown key(s) {unknown}; it takes {list(KEYS)}")
    return {k: node.get(k) for k in KEYS}


def from_config(cfg, name: str, out_dir: str | Path) -> tuple[EvalDuringTraining | None, Any]:
    """The stage's (callback, best-checkpoint callback) from `cfg.eval.during_training`; (None,
    None) when `every_n_steps` is null. The subset's tasks are loaded here, before training."""
    from hydra.utils import instantiate

    from embedkit.eval.cmteb import CATEGORIES

    opts = settings(cfg.get("eval"))
    if opts["every_n_steps"] is None:
        if opts["keep_best"] is not None:
            raise ValueError("eval.during_training.keep_best needs eval.during_training.every_n_steps")
        return None, None
    suite = instantiate(cfg.eval).subset(opts["tasks"], opts["max_rows"])
    suite.check()
    out_dir = Path(out_dir)
    callback = EvalDuringTraining(suite, opts["every_n_steps"], name, out_dir / "eval_during_training")
    best = None
    if opts["keep_best"] is not None:
        from pytorch_lightning.callbacks import ModelCheckpoint

        known = [f"{PREFIX}Avg"] + sorted({f"{PREFIX}{CATEGORIES[t.metadata.type]}" for t in suite.tasks()})
        if opts["keep_best"] not in known:
            raise ValueError(f"eval.during_training.keep_best: {opts['keep_best']!r} is not logged by "
                             f"these checks; one of {known}")
        best = ModelCheckpoint(dirpath=out_dir / BEST_DIR, filename="step={step}", monitor=opts["keep_best"],
                               mode="max", save_top_k=1, every_n_train_steps=opts["every_n_steps"],
                               save_weights_only=True, auto_insert_metric_name=False, save_last=False)
    return callback, best


def best_record(best) -> dict[str, Any] | None:
    """What `model/.done` keeps of the best check: {path, metric, score, step}."""
    if best is None or not best.best_model_path:
        return None
    from embedkit.checkpointing import checkpoint_step

    path = Path(best.best_model_path)
    return {"path": str(path), "metric": best.monitor, "step": checkpoint_step(path),
            "score": None if best.best_model_score is None else float(best.best_model_score)}
