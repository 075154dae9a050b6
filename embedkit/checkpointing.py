"""Checkpoints a killed run can resume from: atomic writes, safe loads, RNG and data order restored.

A stage trained by the recipe keeps Lightning checkpoints in `<stage dir>/checkpoints/`, written
every `checkpoint.every_n_train_steps` optimizer steps by Lightning's own `ModelCheckpoint` (only
the newest is kept). Restarting the same command with `resume=true` finds the newest one and hands
it to `trainer.fit(ckpt_path=...)`, which restores the weights, the optimiser, the LR scheduler,
the loop counters and the callbacks. What Lightning does not restore by itself is added here:

- the data order mid-epoch: the data module stores how many batches of which epoch were consumed
  (`TextDataModule.state_dict`), and the batch sampler skips exactly those on resume. Batches are
  a pure function of (seed, epoch, index), so the remaining batches are the ones an uninterrupted
  run would have seen;
- the global RNG streams (torch, numpy, python `random`; dropout draws from torch's): saved with
  the checkpoint by `RngState` and put back right before the first batch after resuming, not at
  load time, because building the dataloader iterator in between draws from torch's generator.

Writes are atomic (`AtomicCheckpointIO`): the checkpoint goes to a temporary file in the same
folder, is fsync'ed, then `os.replace`d over the final name, so a kill during a save leaves the
previous checkpoint in place and loadable; the temporary name does not end in `.ckpt`, so a
leftover is never taken for a checkpoint. Loads go through `torch.load(weights_only=True)`: a
checkpoint is data, never code.
"""

from __future__ import annotations

import logging
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import Callback, ModelCheckpoint

from embedkit.atomic_files import write_atomic

log = logging.getLogger(__name__)

CKPT_DIR = "checkpoints"
_STEP = re.compile(r"step=(\d+)")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to `path` so that a crash at any point leaves either the old file or the new one."""
    write_atomic(path, lambda fh: torch.save(obj, fh), binary=True)


def safe_torch_load(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    return torch.load(path, map_location=map_location, weights_only=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with crash-atomic, fsync'ed saves and weights-only loads."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        if not Path(path).exists():
            raise FileNotFoundError(f"checkpoint file not found: {path}")
        # Whatever the caller asks for: embedkit never unpickles code from a checkpoint.
        return safe_torch_load(path, map_location=map_location or (lambda storage, loc: storage))


def checkpoint_step(path: Path) -> int:
    match = _STEP.search(path.name)
    return int(match.group(1)) if match else -1


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The checkpoint with the highest global step in `folder` (None if there is none)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = sorted(folder.glob("*.ckpt"), key=lambda p: (checkpoint_step(p), p.stat().st_mtime))
    return found[-1] if found else None


def step_checkpoint(folder: str | os.PathLike, every_n_train_steps: int) -> ModelCheckpoint:
    """Lightning's ModelCheckpoint saving every n optimizer steps, newest only, named by step."""
    return ModelCheckpoint(dirpath=str(folder), filename="{step:06d}", every_n_train_steps=every_n_train_steps,
                           save_top_k=1, save_last=False, save_on_train_epoch_end=False,
                           enable_version_counter=False)


class RngState(Callback):
    """Saves the global RNG streams with each checkpoint; restores them before the first resumed batch.

    Stored as tensors and lists (not numpy objects), so `torch.load(weights_only=True)` reads them.
    Also carries the objective's count of skipped non-finite batches, so `train/skipped_nonfinite`
    keeps counting across a restart.
    """

    def __init__(self):
        self._pending: dict | None = None
        self._module = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._module = pl_module

    def state_dict(self) -> dict[str, Any]:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        version, internal, gauss_next = random.getstate()
        return {
            "torch": torch.get_rng_state(),
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "skipped_nonfinite": int(getattr(self._module, "skipped_nonfinite", 0)),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._pending is None:
            return
        state, self._pending = self._pending, None
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        np_state = state["numpy"]
        np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                             np_state["has_gauss"], np_state["gauss"]))
        py = state["python"]
        random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
        if hasattr(pl_module, "skipped_nonfinite"):
            pl_module.skipped_nonfinite = state["skipped_nonfinite"]
