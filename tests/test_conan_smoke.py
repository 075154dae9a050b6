"""The Conan ablation end to end at smoke size: five rows, the DHNM and per-task loss records."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_conan_ablation_smoke(tmp_path):
    env = dict(os.environ, EMBEDKIT_CACHE_DIR=str(tmp_path / "cache"), WANDB_MODE="offline")
    env.pop("WANDB_API_KEY", None)
    # debug=smoke alone: the Matryoshka widths follow the 32-wide smoke model (4, 8, 16, 32)
    args = ["+experiment=conan_ablation", "debug=smoke", "logger=csv", f"paths.log_dir={tmp_path}/logs"]
    proc = subprocess.run([sys.executable, "run.py", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "DHNM and CBB Loss each clearly beat Vanilla" in proc.stdout
    (run_dir,) = (tmp_path / "logs" / "conan_ablation" / "runs").iterdir()
    with open(run_dir / "table.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["Baseline", "Vanilla", "+DHNM", "+CBB", "Conan dim=32"]
    for row in rows:
        assert math.isfinite(float(row["Avg"]))
    # the general stage is trained once and shared by every row
    assert len(list((run_dir / "stages").iterdir())) == 1
    # DHNM tracked the retrieval steps: every step under CBB, the retrieval ones under sequential
    for label, tracked in (("+DHNM", range(1, 3)), ("Conan", [3])):
        dhnm = json.loads((run_dir / "rows" / label / "callback_dhnm.json").read_text())
        assert dhnm["samples"] == 600 and len(dhnm["curve"]) in tracked
    # per-task loss curves: CBB steps log both tasks, sequential steps one
    for label, both in (("+CBB", True), ("Vanilla", False)):
        (metrics,) = (run_dir / "rows" / label).rglob("metrics.csv")
        with open(metrics, newline="") as f:
            steps = [r for r in csv.DictReader(f) if r.get("train/tasks_in_step")]
        assert steps and all(float(r["train/tasks_in_step"]) == (2.0 if both else 1.0) for r in steps)
