import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as run.py: steady timings with 2 cores

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("EMBEDKIT_DATA_DIR", REPO.parent / "shared" / "data" / "zh-mini"))


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
