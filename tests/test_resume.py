"""Resuming: a SIGKILLed run restarted with `resume=true` ends exactly where an uninterrupted one does;
checkpoint writes are atomic; the sampler, the RNG streams and finished rows are restored or kept."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from embedkit.checkpointing import (AtomicCheckpointIO, RngState, atomic_torch_save, latest_checkpoint,
                                    safe_torch_load)
from embedkit.data.batching import GroupBatchSampler
from embedkit.folders import run_dir
from embedkit.recipes.recovery import finished_results, inside
from helpers import fake_recipe_rows

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- data order mid-epoch

def _batches(sampler):
    return [[i for i, _ in b] for b in sampler]


@pytest.mark.parametrize("group_by_length", [True, False])
def test_sampler_resumed_mid_epoch_yields_the_rest_of_that_epoch_only(group_by_length):
    lengths = np.random.default_rng(0).integers(1, 50, size=103)
    full = GroupBatchSampler(lengths, 8, seed=3, group_by_length=group_by_length)
    full.set_epoch(2)
    whole_epoch = _batches(full)
    resumed = GroupBatchSampler(lengths, 8, seed=3, group_by_length=group_by_length)
    resumed.skip_batches(epoch=2, batches=5)
    resumed.set_epoch(2)
    assert _batches(resumed) == whole_epoch[5:]
    assert len(resumed) == len(whole_epoch)          # Lightning counts the resumed batches itself
    assert _batches(resumed) == whole_epoch          # the next pass is whole again
    other = GroupBatchSampler(lengths, 8, seed=3, group_by_length=group_by_length)
    other.skip_batches(epoch=2, batches=5)
    other.set_epoch(3)                               # a checkpoint taken at an epoch's very end
    full.set_epoch(3)
    assert _batches(other) == _batches(full)


def test_rng_state_comes_back_before_the_first_resumed_batch():
    cb = RngState()
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    saved = cb.state_dict()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(2), np.random.seed(2), random.seed(2)
    restored = RngState()
    restored.load_state_dict(saved)
    torch.rand(5)   # e.g. the dataloader iterator drawing its base seed after the restore
    restored.on_train_batch_start(None, object(), None, 0)
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


# ---------------------------------------------------------------- atomic, safe checkpoints

def test_a_crash_while_saving_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 10, "w": torch.ones(4)}, tmp_path / "step=000010.ckpt")

    real_save = torch.save

    def dies_half_way(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.seek(0), f.truncate(40)   # part of the bytes reached the disk, then the process died
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 20, "w": torch.zeros(4)}, tmp_path / "step=000020.ckpt")
    monkeypatch.setattr(torch, "save", real_save)
    # A SIGKILL would also leave the temporary file behind: it must not pass for a checkpoint.
    (tmp_path / ".step=000030.ckpt.tmp-999").write_bytes(b"\x80\x02partial")

    latest = latest_checkpoint(tmp_path)
    assert latest == tmp_path / "step=000010.ckpt"
    assert io.load_checkpoint(latest)["global_step"] == 10
    assert not (tmp_path / "step=000020.ckpt").exists()


def test_atomic_save_replaces_and_highest_step_wins(tmp_path):
    atomic_torch_save({"a": torch.tensor(1)}, tmp_path / "step=000009.ckpt")
    atomic_torch_save({"a": torch.tensor(2)}, tmp_path / "step=000011.ckpt")
    atomic_torch_save({"a": torch.tensor(3)}, tmp_path / "step=000011.ckpt")
    assert latest_checkpoint(tmp_path).name == "step=000011.ckpt"
    assert int(safe_torch_load(tmp_path / "step=000011.ckpt")["a"]) == 3
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert latest_checkpoint(tmp_path / "missing") is None


class _Payload:
    def __reduce__(self):
        return (os.getcwd, ())


def test_checkpoint_loading_never_unpickles_code(tmp_path):
    torch.save({"state": _Payload()}, tmp_path / "step=000001.ckpt")
    with pytest.raises(Exception, match="[Ww]eights only|weights_only"):
        AtomicCheckpointIO().load_checkpoint(tmp_path / "step=000001.ckpt", weights_only=False)


# ---------------------------------------------------------------- run folders and finished rows

def test_resume_picks_the_newest_run_folder(tmp_path, monkeypatch):
    import embedkit.folders as folders

    monkeypatch.setattr(folders, "_chosen", {})   # each call below plays a new process
    base = tmp_path / "runs"
    assert run_dir(str(base), "2026-01-03_00-00-00", True) == f"{base}/2026-01-03_00-00-00"  # nothing yet
    shutil.rmtree(base)
    folders._chosen.clear()
    for name in ("2026-01-01_10-00-00", "2026-01-02_09-00-00"):
        (base / name).mkdir(parents=True)
    assert run_dir(str(base), "2026-01-03_00-00-00", True) == str(base / "2026-01-02_09-00-00")
    assert run_dir(str(base), "x", str(base / "2026-01-01_10-00-00")) == str(base / "2026-01-01_10-00-00")
    with pytest.raises(FileNotFoundError, match="no such run folder"):
        run_dir(str(base), "x", str(base / "nope"))


def test_only_rows_with_clean_results_count_as_done(tmp_path):
    assert finished_results(tmp_path, "32") is None
    (tmp_path / "results.json").write_text('{"label": "32", "Avg": 1')          # cut short by a kill
    assert finished_results(tmp_path, "32") is None
    (tmp_path / "results.json").write_text(json.dumps({"label": "32", "error": "ValueError: x"}))
    assert finished_results(tmp_path, "32") is None
    (tmp_path / "results.json").write_text(json.dumps({"label": "32", "variant": "", "Avg": 50.0}))
    assert finished_results(tmp_path, "32") == {"": {"label": "32", "variant": "", "Avg": 50.0}}
    with pytest.raises(RuntimeError, match="another run or sweep"):
        finished_results(tmp_path, "128")
    # A variant-only objective (Matryoshka): a summary at the root, one results.json per variant.
    (tmp_path / "results.json").write_text(json.dumps({"label": "32", "variants": {"dim 8": {}}}))
    (tmp_path / "variants" / "dim_8").mkdir(parents=True)
    (tmp_path / "variants" / "dim_8" / "results.json").write_text(json.dumps({"label": "32", "variant": "dim 8"}))
    assert list(finished_results(tmp_path, "32")) == ["dim 8"]


@pytest.mark.parametrize("name", ["..", "../elsewhere", "/tmp/abs", "rows/../../x"])
def test_config_named_folders_stay_inside_the_run_folder(tmp_path, name):
    with pytest.raises(ValueError, match="outside the run folder"):
        inside(tmp_path / "run", "rows", name)
    assert inside(tmp_path / "run", "rows", "batch=32") == tmp_path / "run" / "rows" / "batch=32"


def test_a_symlink_out_of_the_run_folder_is_refused(tmp_path):
    (tmp_path / "run" / "rows").mkdir(parents=True)
    (tmp_path / "run" / "rows" / "link").symlink_to(tmp_path / "outside", target_is_directory=True)
    with pytest.raises(ValueError, match="outside the run folder"):
        inside(tmp_path / "run", "rows", "link")


def test_the_recipe_refuses_a_row_label_that_escapes(tmp_path, monkeypatch):
    """A row label from an experiment file names a folder: `..` must not write beside the run."""
    import embedkit.recipes.train_eval as recipe

    monkeypatch.setattr(recipe, "run_row", lambda *a, **k: pytest.fail("run_row must not be reached"))
    monkeypatch.setattr(recipe, "ablation_rows", lambda cfg: [
        {"label": "ok", "paper_row": None, "overrides": {}, "stages": None},
        {"label": "..", "paper_row": None, "overrides": {}, "stages": None}])
    monkeypatch.setattr(recipe, "finished_results", lambda row_dir, label: {"": {"Avg": 1.0}})
    monkeypatch.setattr(recipe.Examples, "get", lambda self, data_cfg: ([], ["字"]))
    monkeypatch.setattr(recipe.Examples, "key", lambda self, data_cfg: "rows")
    monkeypatch.setattr(recipe, "instantiate", lambda node, **kw: None)
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"paths": {"output_dir": str(tmp_path / "run")}, "model": {"tokenizer": {}},
                            "data": {}, "eval": {}, "experiment_name": "x", "scale": {"name": "mini"}})
    with pytest.raises(ValueError, match="outside the run folder"):
        recipe.run(cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


# ---------------------------------------------------------------- the real thing: SIGKILL, resume

ARGS = ["experiment_name=resume", "debug=smoke", "logger=csv", "trainer.deterministic=true",
        "trainer.max_steps=120", "trainer.max_epochs=4", "data.batch_size=16",   # 37 batches an epoch
        "checkpoint.every_n_train_steps=10", "eval.tasks=[STSB]", "eval.max_rows=32"]


def _env(tmp_path):
    env = dict(os.environ, EMBEDKIT_CACHE_DIR=str(tmp_path / "cache"), WANDB_MODE="offline",
               OMP_NUM_THREADS="1")
    env.pop("WANDB_API_KEY", None)
    return env


def _cmd(log_dir, *extra):
    return [sys.executable, "run.py", *ARGS, f"paths.log_dir={log_dir}", *extra]


def _weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "model" / "model.safetensors")


@pytest.mark.slow
def test_a_run_killed_mid_epoch_resumes_to_the_same_result(tmp_path):
    env = _env(tmp_path)
    straight = subprocess.run(_cmd(tmp_path / "a"), cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=300)
    assert straight.returncode == 0, straight.stderr[-4000:]
    (run_a,) = (tmp_path / "a" / "resume" / "runs").iterdir()

    # Kill (SIGKILL: no cleanup, no handler) once the 3rd checkpoint is on disk: step 30, epoch 0.
    proc = subprocess.Popen(_cmd(tmp_path / "b"), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    runs = tmp_path / "b" / "resume" / "runs"
    while time.time() < deadline and proc.poll() is None:
        if list(runs.glob("*/checkpoints/step=0000[3-9]*.ckpt")):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed"
    (run_b,) = runs.iterdir()
    killed_at = latest_checkpoint(run_b / "checkpoints")
    assert not (run_b / "results.json").exists() and killed_at is not None
    step = int(killed_at.stem.split("=")[1])
    assert 30 <= step < 120, killed_at

    resumed = subprocess.run(_cmd(tmp_path / "b", "resume=true"), cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resuming from {killed_at}" in resumed.stdout + resumed.stderr
    assert list(runs.iterdir()) == [run_b]          # the same folder, not a new one

    a = json.loads((run_a / "results.json").read_text())
    b = json.loads((run_b / "results.json").read_text())
    assert b["steps"] == a["steps"] == 120
    assert b["final_train_loss"] == a["final_train_loss"]
    assert b["tasks"] == a["tasks"] and b["Avg"] == a["Avg"]
    wa, wb = _weights(run_a), _weights(run_b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not (run_b / "checkpoints").exists()      # the row is done: its checkpoints are dropped

    # Resuming a finished run redoes nothing.
    before = (run_b / "results.json").stat().st_mtime_ns
    again = subprocess.run(_cmd(tmp_path / "b", "resume=true"), cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "done in an earlier run" in again.stdout + again.stderr
    assert (run_b / "results.json").stat().st_mtime_ns == before


def test_a_resumed_run_keeps_finished_rows_and_runs_the_rest(tmp_path, monkeypatch):
    """Rows with a clean results.json in the run folder are kept; a failed or missing one is run."""
    import embedkit.recipes.train_eval as recipe

    rows = [{"label": lab, "paper_row": None, "overrides": {}, "stages": None} for lab in ("32", "128", "512")]
    ran = []

    def run_row(cfg, row, *args):
        ran.append(row["label"])
        return {"": {"label": row["label"], "categories": {"STS": 2.0}, "Avg": 2.0}}

    fake_recipe_rows(monkeypatch, recipe, rows, run_row)
    out = tmp_path / "run"
    for label, results in (("32", {"label": "32", "variant": "", "categories": {"STS": 1.0}, "Avg": 1.0}),
                           ("128", {"label": "128", "error": "killed"})):
        (out / "rows" / label).mkdir(parents=True)
        (out / "rows" / label / "results.json").write_text(json.dumps(results))
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"paths": {"output_dir": str(out)}, "model": {"tokenizer": {}}, "data": {},
                            "eval": {}, "experiment_name": "x", "scale": {"name": "mini"}, "ablation": None})
    assert recipe.run(cfg) == 2.0
    assert ran == ["128", "512"]
    table = json.loads((out / "table.json").read_text())
    assert [(r["label"], r["Avg"]) for r in table] == [("32", 1.0), ("128", 2.0), ("512", 2.0)]
