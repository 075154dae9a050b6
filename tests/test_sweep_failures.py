"""A failing sweep job costs no other job its results, shows in the sweep table with its error, makes
the sweep exit non-zero, and a re-run (`resume=true`) redoes only failed or missing jobs."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from embedkit.reporting.sweep import SweepTable, aggregate

REPO = Path(__file__).resolve().parents[1]


def _job(sweep: Path, num: int, overrides: list[str], results: dict | None):
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if results is not None:
        (job / "results.json").write_text(json.dumps(results))


def test_the_table_shows_failed_and_missing_jobs_and_the_sweep_exits_non_zero(tmp_path):
    ok = {"label": "a", "categories": {"STS": 60.0}, "Avg": 60.0}
    _job(tmp_path, 0, ["data.batch_size=16"], ok)
    _job(tmp_path, 1, ["data.batch_size=0"], {"label": "b", "error": "ValueError: batch_size must be >= 1, got 0"})
    _job(tmp_path, 2, ["data.batch_size=8"], None)
    markdown = aggregate(tmp_path)
    assert "| data.batch_size=16 | – | 60.00 |" in markdown
    assert "ValueError: batch_size must be >= 1, got 0" in markdown
    assert "no results.json in 2/" in markdown
    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    with pytest.raises(SystemExit, match=r"2 sweep job\(s\) failed: data.batch_size=0, data.batch_size=8"):
        SweepTable().on_multirun_end(cfg)
    (tmp_path / "1" / "results.json").write_text(json.dumps(ok))
    (tmp_path / "2" / "results.json").write_text(json.dumps(ok))
    SweepTable().on_multirun_end(cfg)   # all clean: no exit


def _sweep(tmp_path, *extra):
    env = dict(os.environ, EMBEDKIT_CACHE_DIR=str(tmp_path / "cache"), WANDB_MODE="offline",
               OMP_NUM_THREADS="1")
    env.pop("WANDB_API_KEY", None)
    # Job 1 gets a bad value (batch size 0) for that job only; job 0 is fine.
    return subprocess.run([sys.executable, "run.py", "-m", "experiment_name=sweepfail", "debug=smoke",
                           "logger=csv", "eval.tasks=[STSB]", "eval.max_rows=32", "data.batch_size=16,0",
                           f"paths.log_dir={tmp_path}/logs", *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=400)


@pytest.mark.slow
def test_a_real_sweep_with_one_bad_job(tmp_path):
    first = _sweep(tmp_path)
    assert first.returncode != 0, first.stdout[-3000:]
    assert "1 sweep job(s) failed: data.batch_size=0" in first.stderr
    (sweep,) = (tmp_path / "logs" / "sweepfail" / "multiruns").iterdir()
    good = json.loads((sweep / "0" / "results.json").read_text())
    bad = json.loads((sweep / "1" / "results.json").read_text())
    assert "error" not in good and good["steps"] == 3 and 0 <= good["Avg"] <= 100
    assert "batch_size must be >= 1, got 0" in bad["error"] and "Traceback" in bad["traceback"]
    with open(sweep / "sweep_table.csv", newline="") as f:
        table = {r["job"]: r for r in csv.DictReader(f)}
    assert table["data.batch_size=16"]["Avg"] and not table["data.batch_size=16"]["error"]
    assert "batch_size must be >= 1" in table["data.batch_size=0"]["error"]

    # The same command with resume=true: the clean job is kept, the failed one is redone.
    good_mtime = (sweep / "0" / "results.json").stat().st_mtime_ns
    bad_mtime = (sweep / "1" / "results.json").stat().st_mtime_ns
    second = _sweep(tmp_path, "resume=true")
    assert second.returncode != 0
    assert list((tmp_path / "logs" / "sweepfail" / "multiruns").iterdir()) == [sweep]
    assert "done in an earlier run" in second.stdout + second.stderr
    assert (sweep / "0" / "results.json").stat().st_mtime_ns == good_mtime
    assert (sweep / "1" / "results.json").stat().st_mtime_ns != bad_mtime

    # A missing results.json (a job that never finished) is redone too.
    (sweep / "0" / "results.json").unlink()
    third = _sweep(tmp_path, "resume=true")
    assert third.returncode != 0
    assert json.loads((sweep / "0" / "results.json").read_text())["Avg"] == good["Avg"]
