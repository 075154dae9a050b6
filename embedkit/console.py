"""What a run prints: one progress bar and one summary line per stage, one bar per evaluation, the
table; third-party noise goes to run.log only.

`setup()` is called once, from run.py, after Hydra has configured logging (a console handler on
stdout, a file handler on run.log: conf/hydra/default.yaml). It

- routes every Python warning through the `py.warnings` logger (as `logging.captureWarnings` does),
  so run.log keeps each one, and keeps the known-noise ones (`NOISE`: matched by category AND the
  file that raised it, never a global filter) off the console;
- keeps a few of Lightning's per-stage INFO lines (`LOG_NOISE`) off the console, likewise;
- turns off transformers' one-step "Writing model shards" bar.

Progress: in a terminal, tqdm bars; when stderr is not a terminal (a log file, CI), bars would
leave carriage-return fragments, so `StageProgress` and `progress` log one plain line instead,
at most every `LINE_EVERY_S` seconds, and one at the end.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
import warnings
from datetime import timedelta
from typing import Any, Iterable, Iterator

log = logging.getLogger(__name__)

# A plain-text progress line at most this often when stderr is not a terminal: a 10-hour stage
# then logs ~1,200 lines, a mini stage only its summary.
LINE_EVERY_S = 30.0

#: Warnings that tell the user nothing: (category name, regex on the raising file, why).
#: They still go to run.log.
NOISE: tuple[tuple[str, str, str], ...] = (
    # mteb's classification tasks score a logistic-regression probe with sklearn's precision/f1;
    # a small model predicts few of TNews' 15 labels, sklearn counts the others as precision 0 (as
    # C-MTEB's score should) and says so on every one of the probe's 10 fits.
    ("UndefinedMetricWarning", r"[/\\]sklearn[/\\]metrics[/\\]", "sklearn precision 0 on unpredicted labels"),
    # Lightning 2.6's own pytree copy (pytorch_lightning/utilities/_pytree.py) builds torch's
    # deprecated LeafSpec at every fit: Lightning's to change, not ours or the user's.
    ("FutureWarning", r"[/\\]pytorch_lightning[/\\]utilities[/\\]_pytree\.py$", "Lightning's LeafSpec"),
)

#: Log lines that tell the user nothing, printed at every stage: (logger name, regex on the message).
LOG_NOISE: tuple[tuple[str, str], ...] = (
    # Lightning's device report: always "False" on CPU; the trainer config says which devices run.
    ("pytorch_lightning.utilities.rank_zero", r"^(GPU|TPU|HPU|IPU) available"),
    # Lightning's advertisement for its hosted logger (litlogger), once per Trainer.
    ("pytorch_lightning.utilities.rank_zero", r"litlogger"),
    ("pytorch_lightning.utilities.rank_zero", r"^Loading `train_dataloader` to estimate"),
    # `StageProgress` prints the stage's summary line instead.
    ("pytorch_lightning.utilities.rank_zero", r"^`Trainer\.fit` stopped"),
)

_CONSOLE = "embedkit_console"   # LogRecord attribute: False keeps the record out of the console


def is_tty(stream=None) -> bool:
    """Whether progress bars can redraw in place: tqdm writes to stderr."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):   # a closed or stand-in stream
        return False


def is_noise(category: type, filename: str) -> bool:
    """A warning in `NOISE`: its category (or a base class) by name and the file raising it."""
    names = {c.__name__ for c in getattr(category, "__mro__", (category,))}
    return any(cat in names and re.search(where, filename or "") for cat, where, _ in NOISE)


class ConsoleFilter(logging.Filter):
    """On console handlers: drops records marked file-only and Lightning's per-stage `LOG_NOISE`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, _CONSOLE, True) is False:
            return False
        if record.levelno <= logging.INFO:
            message = record.getMessage()
            if any(record.name == name and re.search(pattern, message) for name, pattern in LOG_NOISE):
                return False
        return True


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """`warnings.showwarning`: into the `py.warnings` logger (run.log and, unless noise, the console)."""
    text = warnings.formatwarning(message, category, filename, lineno, line).rstrip()
    logging.getLogger("py.warnings").warning(
        "%s", text, extra={_CONSOLE: not is_noise(category, filename)})


def _console_handlers(logger: logging.Logger) -> list[logging.Handler]:
    return [h for h in logger.handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]


def setup() -> None:
    """Route warnings and filter the console once per process (a second call changes nothing)."""
    root = logging.getLogger()
    handlers = _console_handlers(root)
    if not handlers:
        # No Hydra logging (a plain script or a test): a console handler of our own, so that
        # routed warnings are not lost.
        handler = logging.StreamHandler(sys.stderr)
        root.addHandler(handler)
        handlers = [handler]
    for handler in handlers:
        if not any(isinstance(f, ConsoleFilter) for f in handler.filters):
            handler.addFilter(ConsoleFilter())
    warnings.showwarning = _show_warning
    # save_pretrained's "Writing model shards" bar: one shard, one step, at every export.
    # transformers reads huggingface_hub's switch when it is imported; importing it here would
    # pull torch into `plan=true`, which must stay light (tests/test_plan.py). Set
    # HF_HUB_DISABLE_PROGRESS_BARS=0 to keep the hub's bars (e.g. checkpoint downloads).
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def quiet_wandb() -> None:
    """Silence W&B's terminal output (banner, sync hints) unless WANDB_SILENT=false.

    WANDB_SILENT alone comes too late: PyTorch Lightning's WandbLogger passes `anonymous=None` to
    `wandb.init`, and W&B warns that the setting is deprecated while validating it, before it reads
    WANDB_SILENT. `wandb.setup` with silent settings applies first; W&B's debug log keeps it all."""
    import os

    if os.environ.get("WANDB_SILENT", "true").lower() not in ("true", "1"):
        return
    import wandb

    wandb.setup(settings=wandb.Settings(silent=True))


def _eta(seconds: float) -> str:
    return str(timedelta(seconds=int(max(seconds, 0))))


class progress:
    """`for x in progress(items, desc)`: a tqdm bar in a terminal; otherwise a plain line at most
    every `LINE_EVERY_S` seconds and one at the end ("desc: 12/12 in 8.5 s"). `enabled=False`
    prints nothing."""

    def __init__(self, iterable: Iterable, desc: str, total: int | None = None, enabled: bool = True,
                 tty: bool | None = None):
        self.iterable, self.desc, self.enabled = iterable, desc, enabled
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.tty = is_tty() if tty is None else tty
        self.postfix = ""
        self._bar = None
        if enabled and self.tty:
            from tqdm.auto import tqdm

            self._bar = tqdm(iterable, desc=desc, total=self.total)

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text
        if self._bar is not None:
            self._bar.set_postfix_str(text)

    def __iter__(self) -> Iterator:
        if self._bar is not None:
            yield from self._bar
            return
        start = last = time.perf_counter()
        done = 0
        for item in self.iterable:
            yield item
            done += 1
            now = time.perf_counter()
            if self.enabled and now - last >= LINE_EVERY_S:
                last = now
                eta = f", ETA {_eta((now - start) / done * (self.total - done))}" if self.total else ""
                log.info("%s: %d/%s (%s)%s", self.desc, done, self.total or "?", self.postfix, eta)
        if self.enabled:
            log.info("%s: %d/%s in %.1f s", self.desc, done, self.total or "?", time.perf_counter() - start)


def batch_examples(batch: Any) -> int:
    """Examples in a batch: the first dimension of its first tensor (a contrastive batch's queries,
    an STS batch's first sentences); 0 when there is none."""
    import torch

    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    for value in values:
        n = batch_examples(value)
        if n:
            return n
    return 0


def __getattr__(name: str):
    # StageProgress subclasses Lightning's ProgressBar: built on first use, so that importing this
    # module (run.py, before any config is read) does not load Lightning.
    if name == "StageProgress":
        global StageProgress
        StageProgress = _stage_progress()
        return StageProgress
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _stage_progress():
    from pytorch_lightning.callbacks.progress import ProgressBar

    return type("StageProgress", (_StageProgress, ProgressBar), {"__module__": __name__})


class _StageProgress:
    """Lightning's progress bar for a training stage, over optimizer steps (not batches: with
    gradient accumulation, several batches make one step): steps, train/loss, samples/s and the
    ETA; a tqdm bar in a terminal, plain lines otherwise (module docstring). At the end of fit one
    summary line: "<name>: N steps in S s (R samples/s), final train/loss L". Samples count every
    rank's batch (`batch_examples` x world size). Rank 0 only prints."""

    def __init__(self, name: str = "train", tty: bool | None = None, line_every_s: float = LINE_EVERY_S):
        super().__init__()   # Lightning's ProgressBar (the class `StageProgress` adds it)
        self.name = name
        self.tty = tty
        self.line_every_s = line_every_s
        self._enabled = True
        self._bar = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def _printing(self, trainer) -> bool:
        return self._enabled and trainer.is_global_zero

    def on_train_start(self, trainer, pl_module) -> None:
        total = trainer.estimated_stepping_batches
        self.total = int(total) if total not in (None, float("inf")) else None
        self.first_step = self.last_step = int(trainer.global_step)   # a resumed fit starts later
        self.samples = 0
        self.start = self.last_line = time.perf_counter()
        tty = is_tty() if self.tty is None else self.tty
        if self._printing(trainer) and tty:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, initial=self.first_step, desc=self.name, unit="step",
                             dynamic_ncols=True)

    def _loss(self, trainer) -> float | None:
        value = trainer.callback_metrics.get("train/loss")
        return None if value is None else float(value)

    def rate(self) -> float:
        elapsed = time.perf_counter() - self.start
        return self.samples / elapsed if elapsed > 0 else 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.samples += batch_examples(batch) * trainer.world_size
        step = int(trainer.global_step)
        if step == self.last_step or not self._printing(trainer):
            self.last_step = step
            return
        loss = self._loss(trainer)
        if self._bar is not None:
            self._bar.update(step - self.last_step)
            self._bar.set_postfix_str(
                (f"loss {loss:.4f}, " if loss is not None else "") + f"{self.rate():.1f} samples/s")
        else:
            now = time.perf_counter()
            if now - self.last_line >= self.line_every_s:
                self.last_line = now
                done = step - self.first_step
                eta = (f", ETA {_eta((now - self.start) / done * (self.total - step))}"
                       if self.total and done else "")
                log.info("%s: step %d/%s, loss %s, %.1f samples/s%s", self.name, step,
                         self.total or "?", "-" if loss is None else f"{loss:.4f}", self.rate(), eta)
        self.last_step = step

    def on_train_end(self, trainer, pl_module) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if not self._printing(trainer):
            return
        loss = self._loss(trainer)
        steps = int(trainer.global_step) - self.first_step
        log.info("%s: %d step%s in %.1f s (%.1f samples/s), final train/loss %s", self.name,
                 steps, "" if steps == 1 else "s", time.perf_counter() - self.start,
                 self.rate(), "-" if loss is None else f"{loss:.4f}")
