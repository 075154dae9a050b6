"""Launcher and sweeper configs: every one composes (joblib, submitit SLURM, the cluster example,
the Optuna search), the Optuna search space parses into the distributions it means, and a small
joblib sweep runs for real (slow)."""

import csv
import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from omegaconf import OmegaConf

from embedkit.config import REPO_ROOT
from helpers import compose
from embedkit.provenance import git_commit

REPO = Path(__file__).resolve().parents[1]


_compose = functools.partial(compose, return_hydra_config=True)


@pytest.mark.parametrize("launcher, target", [
    ("joblib", "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"),
    ("submitit_slurm", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"),
    ("submitit_local", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"),
    ("slurm_cluster", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"),
])
def test_launcher_configs_compose(launcher, target):
    cfg = _compose(["+experiment=bge_ablation_batchsize", f"hydra/launcher={launcher}"])
    assert cfg.hydra.launcher._target_ == target
    # the launcher's class imports: the plugin is installed, not only its config
    module, name = target.rsplit(".", 1)
    assert hasattr(__import__(module, fromlist=[name]), name)


def test_slurm_cluster_example_sets_the_cluster_fields():
    launcher = _compose(["+experiment=bge_ablation_batchsize", "hydra/launcher=slurm_cluster",
                         "hydra.launcher.partition=a100"]).hydra.launcher
    assert launcher.partition == "a100"   # editable from the command line
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.timeout_min) == (1, 1, 720)
    # submitit's logs and scripts sit in the sweep folder, one per SLURM job id
    assert launcher.submitit_folder.endswith("/multiruns/" + launcher.submitit_folder.split("/multiruns/")[1])
    assert launcher.submitit_folder.endswith("/.submitit/%j")


def test_optuna_search_composes_into_a_multirun_maximising_avg():
    cfg = _compose(["+experiment=bge_ablation_batchsize", "+hparams_search=optuna_temperature_lr"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_ == "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    assert cfg.hydra.mode.name == "MULTIRUN"
    assert sweeper.direction == "maximize" and sweeper.n_trials == 20
    assert set(sweeper.params) == {"objective.temperature", "objective.lr"}
    # the searched keys exist in the experiment's objective (a typo would search nothing)
    assert "temperature" in cfg.objective and "lr" in cfg.objective


def test_optuna_search_space_is_what_it_says():
    from hydra_plugins.hydra_optuna_sweeper._impl import create_optuna_distribution_from_override
    from optuna.distributions import LogUniformDistribution, UniformDistribution

    params = _compose(["+experiment=bge_ablation_batchsize", "+hparams_search=optuna_temperature_lr"]
                      ).hydra.sweeper.params
    parser = OverridesParser.create()
    dist = {k: create_optuna_distribution_from_override(parser.parse_override(f"{k}={v}"))
            for k, v in params.items()}
    assert dist["objective.temperature"] == UniformDistribution(0.01, 0.1)
    assert dist["objective.lr"] == LogUniformDistribution(1e-5, 1e-3)


def test_optuna_sampler_config_runs_a_study():
    # optuna 2.10 (the sweeper's pin) on this numpy: the configured TPE sampler really optimises.
    import optuna

    cfg = _compose(["+experiment=bge_ablation_batchsize", "+hparams_search=optuna_temperature_lr", "seed=3"])
    sampler = instantiate(OmegaConf.to_container(cfg.hydra.sweeper.sampler, resolve=True))
    assert isinstance(sampler, optuna.samplers.TPESampler)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    study.optimize(lambda t: -(t.suggest_float("x", 0.0, 1.0) - 0.3) ** 2, n_trials=25)
    assert abs(study.best_params["x"] - 0.3) < 0.1


def test_wandb_runs_are_grouped_and_tagged_with_scale_and_commit():
    cfg = _compose(["+experiment=mrl_dims", "logger=wandb", "scale=paper"])
    logger = OmegaConf.to_container(cfg.logger, resolve=False)
    assert logger["group"] == "${experiment_name}"
    cfg.hydra.runtime.output_dir = "/tmp/embedkit-compose"
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().set_config(cfg)
    resolved = OmegaConf.to_container(cfg.logger, resolve=True)
    assert resolved["group"] == "mrl_dims"
    sha = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short=10", "HEAD"],
                         capture_output=True, text=True).stdout.strip()
    assert resolved["tags"][0] == "paper"
    assert sha, "the tests run from a git checkout"
    assert resolved["tags"][1] in (f"commit:{sha}", f"commit:{sha}-dirty")


def test_git_commit_outside_a_checkout_is_unknown(tmp_path):
    assert git_commit(tmp_path) == "unknown"


@pytest.mark.slow
def test_joblib_sweep_runs_two_jobs_in_parallel(tmp_path):
    env = dict(os.environ, EMBEDKIT_CACHE_DIR=str(tmp_path / "cache"), WANDB_MODE="offline")
    env.pop("WANDB_API_KEY", None)
    args = ["-m", "+experiment=bge_ablation_batchsize", "debug=smoke", "logger=csv",
            "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "data.batch_size=16,32",
            f"paths.log_dir={tmp_path}/logs"]
    proc = subprocess.run([sys.executable, "run.py", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout + proc.stderr   # the joblib launcher ran them
    (sweep,) = (tmp_path / "logs" / "bge_ablation_batchsize" / "multiruns").iterdir()
    with open(sweep / "sweep_table.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["job"] for r in rows) == ["data.batch_size=16", "data.batch_size=32"]
    assert all(math.isfinite(float(r["Avg"])) for r in rows)
    for job in ("0", "1"):
        results = json.loads((sweep / job / "results.json").read_text())
        assert "error" not in results and results["steps"] >= 1
