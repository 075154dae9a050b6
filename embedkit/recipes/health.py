"""Did a stage train at all? Counts what each training batch did, and stops a stage that learned nothing.

A run that took no optimiser step, skipped most of its batches as non-finite, or saw a loss of
exactly 0 on every batch would otherwise export its (untrained) encoder and put it in the results
table beside real rows. `TrainingHealth` is a Lightning callback that counts, per stage:

- `batches`: training batches run; `skipped_nonfinite`: those the objective left out
  (`objective.on_nonfinite_loss=skip`); `zero_loss`: batches whose loss was exactly 0.0, which
  carry no gradient (batch 1 with train_group_size 1: a softmax over one candidate);
- `optimizer_steps`: the trainer's global step at the end.

`verdict(stage)` raises `NothingTrained` after fit when there were no optimiser steps, when more
than `max_skipped_fraction` of the batches were skipped, or when every batch's loss was 0. The
counts go into the stage's `model/.done` and the row's results.json (`training`).
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch


class NothingTrained(RuntimeError):
    """A stage ended without having trained its model; the message says why."""


class TrainingHealth(pl.Callback):
    def __init__(self, max_skipped_fraction: float = 0.1):
        if not 0.0 <= float(max_skipped_fraction) <= 1.0:
            raise ValueError(f"checks.max_skipped_fraction must be in [0, 1], got {max_skipped_fraction!r}")
        self.max_skipped_fraction = float(max_skipped_fraction)
        self.batches = 0
        self.zero_loss = 0
        self.skipped_nonfinite = 0
        self.optimizer_steps = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches += 1
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if torch.is_tensor(loss) and loss.numel() == 1 and float(loss.detach()) == 0.0:
            self.zero_loss += 1

    def on_train_end(self, trainer, pl_module) -> None:
        self.skipped_nonfinite = int(getattr(pl_module, "skipped_nonfinite", 0))
        self.optimizer_steps = int(trainer.global_step)

    def summary(self) -> dict:
        return {"batches": self.batches, "optimizer_steps": self.optimizer_steps,
                "skipped_nonfinite": self.skipped_nonfinite, "zero_loss": self.zero_loss}

    def verdict(self, stage: str) -> None:
        """Raise NothingTrained if the stage's counts say it learned nothing."""
        s = self.summary()
        if s["optimizer_steps"] == 0:
            raise NothingTrained(
                f"{stage}: 0 optimizer steps were taken ({s['batches']} batch(es) ran, "
                f"{s['skipped_nonfinite']} skipped as non-finite). The data gave no usable training "
                f"batch: check the data log above (e.g. 'No training batches': too few distinct "
                f"queries/positives for data.batch_size under no-duplicate batching), or the "
                f"trainer's max_steps / limit_train_batches.")
        if s["batches"] and s["skipped_nonfinite"] / s["batches"] > self.max_skipped_fraction:
            raise NothingTrained(
                f"{stage}: {s['skipped_nonfinite']} of {s['batches']} training batches had a non-finite "
                f"loss and were skipped, more than checks.max_skipped_fraction="
                f"{self.max_skipped_fraction:g}. Lower the learning rate or check the data; raise "
                f"the limit only if such batches are expected.")
        if s["batches"] and s["zero_loss"] == s["batches"]:
            raise NothingTrained(
                f"{stage}: the training loss was exactly 0 on all {s['batches']} batches, so no "
                f"gradient reached the model. A contrastive batch needs candidates to contrast: "
                f"with data.batch_size=1 and data.train_group_size=1 the softmax has one entry.")
