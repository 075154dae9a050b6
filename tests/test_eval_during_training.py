"""eval.during_training: checks every N optimizer steps logged as val/* at those steps, equal to
a direct suite evaluation of the same weights, the best kept by keep_best, training untouched."""

import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TASKS = "[STSB,CMRCRetrieval]"
SUBSET = ["eval.during_training.every_n_steps=2", "eval.during_training.keep_best=val/Avg",
          f"eval.during_training.tasks={TASKS}", "eval.during_training.max_rows=32"]


def _csv_rows(run_dir):
    (metrics,) = run_dir.glob("csv/version_*/metrics.csv")
    with open(metrics, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _direct(suite, encoder, tmp_path: Path, step: int) -> dict:
    """The subset's scores of `encoder`, computed here."""
    res = suite.evaluate(encoder, model_name="embedkit/direct", revision=f"step{step}",
                         output_dir=tmp_path / f"direct{step}")
    return {f"val/{k}": v for k, v in res["categories"].items()} | {"val/Avg": res["Avg"]}


@pytest.mark.slow
def test_checks_log_val_metrics_at_their_steps_equal_to_a_direct_evaluation(tmp_path, compose_run):
    env = dict(os.environ, EMBEDKIT_CACHE_DIR=str(tmp_path / "cache"), WANDB_MODE="offline")
    proc = subprocess.run([sys.executable, "run.py", "debug=smoke", "logger=csv", "trainer.max_steps=4",
                           f"eval.tasks={TASKS}", *SUBSET, f"paths.log_dir={tmp_path}/logs"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "logs" / "default" / "runs").iterdir()

    val = {int(r["step"]): {k: float(v) for k, v in r.items() if k.startswith("val/") and v}
           for r in _csv_rows(run_dir) if r.get("val/Avg")}
    assert sorted(val) == [2, 4]   # after optimizer steps 2 and 4 of 4
    assert all(set(v) == {"val/Avg", "val/Retrieval", "val/STS"} for v in val.values())
    assert all(v["val/Avg"] == pytest.approx((v["val/Retrieval"] + v["val/STS"]) / 2) for v in val.values())

    # the last check scored the last weights: the exported model's; on the suite the run configured
    from hydra.utils import instantiate

    from embedkit.models.build import load_encoder

    suite = instantiate(compose_run(["debug=smoke", *SUBSET]).eval).subset(["STSB", "CMRCRetrieval"], 32)
    model_dir = run_dir / "model"
    assert _direct(suite, load_encoder(model_dir), tmp_path, 4) == pytest.approx(val[4], abs=1e-9)

    # keep_best: one checkpoint, of the check with the highest val/Avg, recorded in model/.done
    best_step = max(val, key=lambda s: val[s]["val/Avg"])
    (ckpt,) = (run_dir / "best").glob("*.ckpt")
    assert ckpt.name == f"step={best_step}.ckpt"
    record = json.loads((model_dir / ".done").read_text())["best"]
    assert record["step"] == best_step and record["metric"] == "val/Avg"
    assert record["score"] == pytest.approx(val[best_step]["val/Avg"], rel=1e-6)
    weights = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    encoder = load_encoder(model_dir)
    encoder.load_state_dict({k[len("encoder."):]: v for k, v in weights.items() if k.startswith("encoder.")})
    assert _direct(suite, encoder, tmp_path, best_step) == pytest.approx(val[best_step], abs=1e-9)


class _RandomSuite:
    """A suite whose scoring draws from every RNG stream, as mteb's seeded tasks do."""

    def evaluate(self, encoder, **kwargs):
        torch.rand(3), np.random.rand(3), random.random()
        torch.manual_seed(0), np.random.seed(0), random.seed(0)
        return {"categories": {"STS": 50.0}, "Avg": 50.0}


def test_a_check_leaves_the_rng_streams_as_they_were(tmp_path):
    from embedkit.eval.callback import EvalDuringTraining

    check = EvalDuringTraining(_RandomSuite(), every_n_steps=1, name="t", output_dir=tmp_path)
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    expected = (torch.rand(2), np.random.rand(2), random.random())
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    assert check.score(None, step=1) == {"val/STS": 50.0, "val/Avg": 50.0}
    got = (torch.rand(2), np.random.rand(2), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_bad_settings_name_the_key(compose_run, tmp_path):
    from embedkit.eval.callback import EvalDuringTraining, from_config

    with pytest.raises(ValueError, match="every_n_steps"):
        EvalDuringTraining(_RandomSuite(), every_n_steps=0, name="t", output_dir=tmp_path)
    cfg = compose_run(["debug=smoke", "eval.during_training.every_n_steps=2",
                       "eval.during_training.keep_best=val/CLF", f"eval.during_training.tasks={TASKS}"])
    with pytest.raises(ValueError, match=r"keep_best: 'val/CLF'.*val/Avg.*val/Retrieval.*val/STS"):
        from_config(cfg, "t", tmp_path)
    cfg = compose_run(["debug=smoke", "eval.during_training.keep_best=val/Avg"])
    with pytest.raises(ValueError, match="keep_best needs eval.during_training.every_n_steps"):
        from_config(cfg, "t", tmp_path)
    assert from_config(compose_run(["debug=smoke"]), "t", tmp_path) == (None, None)


def test_sharded_strategies_are_refused(tmp_path):
    from types import SimpleNamespace

    from embedkit.eval.callback import EvalDuringTraining

    class FSDPStrategy:
        pass

    class DeepSpeedStrategy:
        zero_stage_3 = True

    check = EvalDuringTraining(_RandomSuite(), every_n_steps=1, name="t", output_dir=tmp_path)
    for strategy in (FSDPStrategy(), DeepSpeedStrategy()):
        with pytest.raises(ValueError, match="rank 0 alone.*every_n_steps=null"):
            check.setup(SimpleNamespace(strategy=strategy), None, "fit")
    DeepSpeedStrategy.zero_stage_3 = False   # ZeRO-1 shards the optimizer only: checks run
    check.setup(SimpleNamespace(strategy=DeepSpeedStrategy()), None, "fit")
