"""What a run prints: a smoke run's console in a file stays short and clean, run.log keeps the
warnings; and the routing rule itself (category AND raising file) on single warnings."""

import io
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The console of `python run.py debug=smoke` with one check during training, measured at 15 lines:
# per stage "training ..." + "contrastive data ..." + the check's line + the summary line, per eval
# one "mteb tasks: 12/12" line, the vocabulary line, the table (7 lines with blanks) and "Tables
# written". 30 leaves room for a line or two more per part; the run before issue 15 printed ~70
# lines of bar fragments and 20 sklearn warnings per classification task for one row.
LINE_BUDGET = 30


@pytest.mark.slow
def test_smoke_console_in_a_file_is_short_clean_and_run_log_keeps_the_warnings(tmp_path):
    env = dict(os.environ, EMBEDKIT_CACHE_DIR=str(tmp_path / "cache"), WANDB_MODE="offline",
               WANDB_DIR=str(tmp_path))
    env.pop("WANDB_API_KEY", None)
    env.pop("WANDB_SILENT", None)   # the recipe must silence W&B itself, as under `make run`
    console = tmp_path / "console.txt"
    with open(console, "w", encoding="utf-8") as out:   # a file, not a TTY
        proc = subprocess.run([sys.executable, "run.py", "debug=smoke", "eval.during_training.every_n_steps=2",
                               f"paths.log_dir={tmp_path}/logs"], cwd=REPO, env=env, stdout=out,
                              stderr=subprocess.STDOUT, timeout=300)
    text = console.read_text(encoding="utf-8")
    assert proc.returncode == 0, text[-5000:]
    lines = text.splitlines()
    assert len(lines) <= LINE_BUDGET, f"{len(lines)} lines:\n{text}"
    assert "\r" not in text and "\x1b[" not in text, "progress-bar fragments in a log file"
    for noise in ("Warning", "warn(", "wandb:", "litlogger", "GPU available"):
        assert noise not in text, f"{noise!r} on the console:\n{text}"
    # what a person reads: the stage's summary line, the check, the task bar's line, the table
    assert "steps in" in text and "samples/s" in text and "final train/loss" in text
    assert "step 2, val/" in text and "mteb tasks: 12/12" in text and "| run | Retrieval |" in text

    (run_dir,) = (tmp_path / "logs" / "default" / "runs").iterdir()
    log = (run_dir / "run.log").read_text(encoding="utf-8")
    assert "UndefinedMetricWarning" in log          # sklearn, via mteb's classification probe
    assert "LeafSpec" in log                        # Lightning's pytree deprecation
    assert "litlogger" in log and "GPU available" in log


@pytest.fixture
def routed(monkeypatch):
    """console.setup() on a logger pair like Hydra's (a console stream and a run.log file)."""
    from embedkit import console

    root = logging.getLogger()
    screen, file = io.StringIO(), io.StringIO()
    screen_handler, file_handler = logging.StreamHandler(screen), logging.FileHandler(os.devnull)
    file_handler.stream = file   # a FileHandler (what setup leaves unfiltered) writing to memory
    monkeypatch.setattr(root, "handlers", [screen_handler, file_handler])
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)
    console.setup()
    yield screen, file
    file_handler.stream = open(os.devnull, "w")
    file_handler.close()


def _warn(category, filename, text="message"):
    warnings.warn_explicit(text, category, filename, 7, module="x", registry={})


def test_noise_goes_to_the_file_only_and_other_warnings_to_both(routed):
    from sklearn.exceptions import UndefinedMetricWarning

    screen, file = routed
    sklearn_file = "/venv/site-packages/sklearn/metrics/_classification.py"
    _warn(UndefinedMetricWarning, sklearn_file, "Precision is ill-defined")
    _warn(FutureWarning, "/venv/site-packages/pytorch_lightning/utilities/_pytree.py", "LeafSpec is deprecated")
    assert screen.getvalue() == ""
    assert "UndefinedMetricWarning: Precision is ill-defined" in file.getvalue()
    assert "LeafSpec is deprecated" in file.getvalue()
    # the same category from another file, and another category from the same file: both shown
    _warn(UndefinedMetricWarning, "/work/embedkit/eval/mine.py", "ours")
    _warn(RuntimeWarning, sklearn_file, "overflow")
    _warn(FutureWarning, "/venv/site-packages/pytorch_lightning/trainer/trainer.py", "other")
    shown = screen.getvalue()
    assert "ours" in shown and "overflow" in shown and "other" in shown
    assert all(w in file.getvalue() for w in ("ours", "overflow", "other"))


def test_lightning_stage_chatter_is_file_only(routed):
    screen, file = routed
    rank_zero = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    rank_zero.setLevel(logging.INFO)
    rank_zero.info("GPU available: False, used: False")
    rank_zero.info("💡 Tip: For seamless cloud logging ... install [litlogger](https://pypi.org/project/litlogger/)")
    rank_zero.info("Restoring states from the checkpoint path at x.ckpt")
    rank_zero.warning("GPU available but not used")   # a warning is never dropped
    assert "GPU available: False" not in screen.getvalue() and "litlogger" not in screen.getvalue()
    assert "Restoring states" in screen.getvalue() and "but not used" in screen.getvalue()
    assert "GPU available: False" in file.getvalue() and "litlogger" in file.getvalue()


def test_task_progress_outside_a_terminal_logs_one_line(caplog):
    from embedkit.console import progress

    caplog.set_level(logging.INFO, logger="embedkit.console")
    bar = progress(["a", "b", "c"], desc="mteb tasks", tty=False)
    for item in bar:
        bar.set_postfix_str(item)
    assert [r.getMessage().split(" in ")[0] for r in caplog.records] == ["mteb tasks: 3/3"]
    caplog.clear()
    assert list(progress(["a"], desc="off", enabled=False, tty=False)) == ["a"] and not caplog.records
