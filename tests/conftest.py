import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as run.py: steady timings with 2 cores

import pytest


@pytest.fixture(autouse=True)
def _offline_wandb(monkeypatch, tmp_path):
    # Tests must never need a W&B key or network, and must not write into the user's wandb dirs.
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of tiny-model tests (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`):
    a second thread gains them nothing, and on a shared 2-core machine OpenMP threads waiting for
    a busy core made every step ~50x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def compose_run(tmp_path):
    """`compose_run([overrides])`: conf/train.yaml composed as `python run.py overrides` would, with
    the run folder (tmp_path/run) and the cache (tmp_path/cache) under tmp_path, and Hydra's runtime
    config set, so `${hydra:...}` resolves and the recipe's `ablation_rows` works outside an app."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from helpers import compose

    def _compose(overrides=()):
        cfg = compose([f"paths.cache_dir={tmp_path}/cache", *overrides], return_hydra_config=True)
        cfg.hydra.runtime.output_dir = str(tmp_path / "run")
        HydraConfig.instance().set_config(cfg)
        return cfg

    yield _compose
    HydraConfig.instance().cfg = None
    GlobalHydra.instance().clear()
