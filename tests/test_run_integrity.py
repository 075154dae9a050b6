"""No finished result is lost, overwritten or mislabelled: exclusive run folders and their locks,
sweep jobs matched by overrides, rows finished only with all their variants, resumes refused on
changed settings, the vocabulary honouring `on_bad_row`, and stages that trained nothing stopped."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import embedkit.folders as run_folders
import embedkit.recipes.recovery as recovery
from embedkit.folders import FolderInUse, hydra_subdir, job_subdir, live_owner, run_dir
from embedkit.recipes.recovery import SettingsChanged, check_settings, finished_results, guarded

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("EMBEDKIT_DATA_DIR", REPO.parent / "shared" / "data" / "zh-mini"))


@pytest.fixture(autouse=True)
def _fresh_choices(monkeypatch):
    # Each process answers a folder question once; each test here plays a new process.
    monkeypatch.setattr(run_folders, "_chosen", {})
    monkeypatch.setattr(run_folders, "_held", set())


# ---------------------------------------------------------------- run folders and locks

def test_two_runs_started_in_the_same_second_get_their_own_folders(tmp_path):
    code = textwrap.dedent(f"""
        import sys, time
        from embedkit.folders import run_dir
        print(run_dir({str(tmp_path / "runs")!r}, "2026-01-01_00-00-00", False), flush=True)
        time.sleep(1.5)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    folders = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert sorted(Path(f).name for f in folders) == ["2026-01-01_00-00-00", "2026-01-01_00-00-00_2",
                                                     "2026-01-01_00-00-00_3"]
    assert all(Path(f).is_dir() for f in folders)
    assert not list((tmp_path / "runs").glob("*/.lock"))   # each process released its lock at exit


def test_resume_never_picks_a_folder_a_live_run_is_writing(tmp_path):
    base = tmp_path / "runs"
    older, newest = base / "2026-01-01_10-00-00", base / "2026-01-02_09-00-00"
    older.mkdir(parents=True), newest.mkdir()
    writer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from embedkit.folders import acquire
        from pathlib import Path
        assert acquire(Path({str(newest)!r}))
        print("locked", flush=True)
        time.sleep(60)
    """)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "locked"
        assert live_owner(newest) == f"pid {writer.pid} on {os.uname().nodename}"
        assert run_dir(str(base), "2026-01-03_00-00-00", True) == str(older)
        with pytest.raises(FolderInUse, match=f"pid {writer.pid}"):
            run_dir(str(base), "x", str(newest))
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    # The SIGKILLed writer left its lock behind: stale, so the folder can be resumed again.
    assert (newest / ".lock").exists() and live_owner(newest) is None
    run_folders._chosen.clear()
    assert run_dir(str(base), "2026-01-03_00-00-00", True) == str(newest)
    assert json.loads((newest / ".lock").read_text())["pid"] == os.getpid()


def test_newest_orders_same_second_suffixes(tmp_path):
    base = tmp_path / "runs"
    for name in ("2026-01-02_09-00-00", "2026-01-02_09-00-00_2", "2026-01-02_09-00-00_10", "2026-01-01_23-00-00_3"):
        (base / name).mkdir(parents=True)
    assert run_dir(str(base), "z", True) == str(base / "2026-01-02_09-00-00_10")


def test_a_resumed_job_saves_its_configs_beside_the_first_ones(tmp_path):
    assert hydra_subdir(str(tmp_path)) == ".hydra"
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("objective: {lr: 0.1}\n")
    run_folders._chosen.clear()
    assert hydra_subdir(str(tmp_path)).startswith(".hydra/resumed/")


# ---------------------------------------------------------------- sweep jobs

def _job(sweep: Path, name: str, overrides: list[str], results: dict | None = None):
    (sweep / name / ".hydra").mkdir(parents=True)
    (sweep / name / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if results is not None:
        (sweep / name / "results.json").write_text(json.dumps(results))


def test_a_resumed_sweep_matches_jobs_by_overrides_not_position(tmp_path):
    _job(tmp_path, "0", ["debug=smoke", "data.batch_size=16"], {"label": "data.batch_size=16", "Avg": 1.0})
    _job(tmp_path, "1", ["debug=smoke", "data.batch_size=0"], {"label": "data.batch_size=0", "error": "x"})
    # Resumed as data.batch_size=32,16: job 0 is now batch 32, job 1 batch 16.
    assert job_subdir(str(tmp_path), 0, ["debug=smoke", "data.batch_size=32", "resume=true"]) == "2"
    assert job_subdir(str(tmp_path), 1, ["data.batch_size=16", "debug=smoke", "resume=true"]) == "0"
    assert json.loads((tmp_path / "2" / ".job.json").read_text())["overrides"][1] == "data.batch_size=32"
    # Asked again (Hydra resolves its keys more than once), the same answers.
    assert job_subdir(str(tmp_path), 0, ["debug=smoke", "data.batch_size=32", "resume=true"]) == "2"
    run_folders._chosen.clear()
    assert job_subdir(str(tmp_path), 0, ["debug=smoke", "data.batch_size=32"]) == "2"   # by its claim


def test_a_failing_job_never_overwrites_a_finished_result(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    monkeypatch.setattr(recovery, "is_multirun", lambda: True)
    monkeypatch.setattr(recovery, "job_label", lambda: "data.batch_size=16")
    cfg = OmegaConf.create({"paths": {"output_dir": str(tmp_path)}})
    good = {"label": "data.batch_size=16", "Avg": 61.5}
    (tmp_path / "results.json").write_text(json.dumps(good))

    def fails(cfg):
        raise ValueError("boom")

    assert guarded(fails, cfg) is None
    assert json.loads((tmp_path / "results.json").read_text()) == good
    assert "ValueError: boom" in json.loads((tmp_path / "error.json").read_text())["error"]
    (tmp_path / "results.json").unlink()
    guarded(fails, cfg)   # no finished result: the error is the job's result
    assert "ValueError: boom" in json.loads((tmp_path / "results.json").read_text())["error"]


def _env(tmp_path, **extra):
    env = dict(os.environ, EMBEDKIT_CACHE_DIR=str(tmp_path / "cache"), WANDB_MODE="offline",
               OMP_NUM_THREADS="1", **extra)
    env.pop("WANDB_API_KEY", None)
    return env


SMOKE = ["debug=smoke", "logger=csv", "eval.tasks=[STSB]", "eval.max_rows=32"]


def _run(tmp_path, *args, env=None, timeout=400):
    return subprocess.run([sys.executable, "run.py", *args, f"paths.log_dir={tmp_path}/logs"],
                          cwd=REPO, env=env or _env(tmp_path), capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_a_real_sweep_resumed_with_other_values_keeps_the_finished_job(tmp_path):
    first = _run(tmp_path, "-m", "experiment_name=sweepmatch", *SMOKE, "data.batch_size=16,0")
    assert first.returncode != 0   # job 1 (batch 0) fails
    (sweep,) = (tmp_path / "logs" / "sweepmatch" / "multiruns").iterdir()
    kept = (sweep / "0" / "results.json").read_bytes()
    second = _run(tmp_path, "-m", "experiment_name=sweepmatch", *SMOKE, "data.batch_size=32,16", "resume=true")
    assert (sweep / "0" / "results.json").read_bytes() == kept
    assert "- data.batch_size=16" in (sweep / "0" / ".hydra" / "overrides.yaml").read_text()
    assert "- data.batch_size=32" in (sweep / "2" / ".hydra" / "overrides.yaml").read_text()
    assert "error" not in json.loads((sweep / "2" / "results.json").read_text()), second.stderr[-3000:]
    assert "done in an earlier run" in second.stdout + second.stderr


# ---------------------------------------------------------------- rows and their settings

def test_a_row_is_finished_only_with_every_variant_it_names(tmp_path):
    root = {"label": "self-distill", "variant": "", "Avg": 40.0, "variant_names": ["sparse", "all"]}
    (tmp_path / "results.json").write_text(json.dumps(root))
    (tmp_path / "variants" / "sparse").mkdir(parents=True)
    (tmp_path / "variants" / "sparse" / "results.json").write_text(
        json.dumps({"label": "self-distill", "variant": "sparse", "Avg": 20.0}))
    assert finished_results(tmp_path, "self-distill") is None      # "all" was never scored
    (tmp_path / "variants" / "all").mkdir()
    (tmp_path / "variants" / "all" / "results.json").write_text(
        json.dumps({"label": "self-distill", "variant": "all", "Avg": 50.0}))
    assert sorted(finished_results(tmp_path, "self-distill")) == ["", "all", "sparse"]


def test_settings_that_changed_stop_the_resume_and_are_named(tmp_path):
    check_settings(tmp_path, {"objective.lr": 3e-4, "data.batch_size": 32}, "row '32'")
    check_settings(tmp_path, {"objective.lr": 3e-4, "data.batch_size": 32}, "row '32'")   # same: fine
    with pytest.raises(SettingsChanged) as err:
        check_settings(tmp_path, {"objective.lr": 0.1, "data.batch_size": 32, "seed": 1}, "row '32'")
    assert "objective.lr: 0.0003 (then) -> 0.1 (now)" in str(err.value)
    assert 'seed: "(unset)" (then) -> 1 (now)' in str(err.value)
    assert "data.batch_size" not in str(err.value)


@pytest.mark.slow
def test_resume_after_a_config_change_refuses_and_keeps_the_record(tmp_path):
    # Ablation rows are named by their label ("32"), not by the command line: only their
    # recorded settings can tell that a resumed row would be another experiment.
    args = ["+experiment=bge_ablation_batchsize", "experiment_name=changed", *SMOKE]
    ok = _run(tmp_path, *args)
    assert ok.returncode == 0, ok.stderr[-3000:]
    (run,) = (tmp_path / "logs" / "changed" / "runs").iterdir()
    config = (run / ".hydra" / "config.yaml").read_text()
    results = (run / "rows" / "32" / "results.json").read_bytes()
    again = _run(tmp_path, *args, "resume=true", "objective.lr=0.1")
    assert again.returncode != 0
    assert "row '32'" in again.stderr and "objective.lr: 0.0003 (then) -> 0.1 (now)" in again.stderr
    assert (run / ".hydra" / "config.yaml").read_text() == config       # still what was trained
    assert (run / "rows" / "32" / "results.json").read_bytes() == results
    same = _run(tmp_path, *args, "resume=true", "trainer.log_every_n_steps=5")   # cosmetic: allowed
    assert same.returncode == 0, same.stderr[-3000:]
    assert "done in an earlier run" in same.stdout + same.stderr


@pytest.mark.slow
def test_a_row_killed_while_scoring_its_variants_finishes_on_resume(tmp_path):
    args = ["+experiment=m3_ablation_selfdistill", "experiment_name=m3kill", "debug=smoke", "logger=csv",
            "eval.tasks=[CMRCRetrieval,STSB]", "eval.max_rows=32", "ablation=null"]   # one row
    first = _run(tmp_path, *args)
    assert first.returncode == 0, first.stderr[-3000:]
    (run,) = (tmp_path / "logs" / "m3kill" / "runs").iterdir()
    rows = list(csv_rows(run / "table.csv"))
    assert len(rows) == 5   # dense + sparse, multivec, dense+sparse, all
    # What a kill while the modes were scored leaves: some variants on disk, not all, no root file.
    lost = sorted((run / "variants").iterdir())[-1]
    shutil.rmtree(lost)
    (run / "results.json").unlink()
    weights = (run / "model" / "model.safetensors").stat().st_mtime_ns
    second = _run(tmp_path, *args, "resume=true")
    assert second.returncode == 0, second.stderr[-3000:]
    out = second.stdout + second.stderr
    assert "trained in an earlier attempt" in out and "scored in an earlier attempt, kept" in out
    assert (run / "model" / "model.safetensors").stat().st_mtime_ns == weights   # not retrained
    assert [r["run"] for r in csv_rows(run / "table.csv")] == [r["run"] for r in rows]
    assert (lost / "results.json").exists()


def csv_rows(path):
    import csv

    with open(path, newline="", encoding="utf-8") as f:
        yield from csv.DictReader(f)


# ---------------------------------------------------------------- bad rows reach the vocabulary

@pytest.mark.slow
def test_skipping_bad_rows_works_with_the_character_vocabulary(tmp_path):
    data = tmp_path / "zh-mini"
    data.mkdir()
    (data / "eval").symlink_to(DATA / "eval", target_is_directory=True)
    shutil.copytree(DATA / "train", data / "train")
    with open(data / "train" / "cmrc_pairs.jsonl", "a", encoding="utf-8") as f:
        f.write('{"query": "缺了正例"}\n')
    bad_line = sum(1 for _ in open(data / "train" / "cmrc_pairs.jsonl", encoding="utf-8"))
    res = _run(tmp_path, "experiment_name=skipbad", "data=zh_mini_task", "data.on_bad_row=skip", *SMOKE,
               env=_env(tmp_path, EMBEDKIT_DATA_DIR=str(data)))
    assert res.returncode == 0, res.stderr[-3000:]
    (run,) = (tmp_path / "logs" / "skipbad" / "runs").iterdir()
    bad = json.loads((run / "results.json").read_text())["bad_rows"]
    (entry,) = [v for k, v in bad.items() if k.endswith("cmrc_pairs.jsonl")]
    assert entry["count"] == 1 and entry["first"][0].startswith(f"line {bad_line}:")
    strict = _run(tmp_path, "experiment_name=strictbad", "data=zh_mini_task", *SMOKE,
                  env=_env(tmp_path, EMBEDKIT_DATA_DIR=str(data)))
    assert strict.returncode != 0 and f"cmrc_pairs.jsonl:{bad_line}" in strict.stderr


# ---------------------------------------------------------------- a stage that trained nothing

class _Toy:
    """A LightningModule whose loss is whatever `loss_of(batch_idx)` says (None: skipped)."""

    @staticmethod
    def fit(loss_of, batches=4, max_skipped_fraction=0.1):
        import pytorch_lightning as pl
        import torch

        from embedkit.recipes.health import TrainingHealth

        class Toy(pl.LightningModule):
            def __init__(self):
                super().__init__()
                self.w = torch.nn.Parameter(torch.ones(1))
                self.skipped_nonfinite = 0

            def training_step(self, batch, batch_idx):
                value = loss_of(batch_idx)
                if value is None:
                    self.skipped_nonfinite += 1
                    return None
                return self.w.sum() * 0 + value

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)

        health = TrainingHealth(max_skipped_fraction=max_skipped_fraction)
        loader = torch.utils.data.DataLoader(torch.zeros(batches, 1), batch_size=1)
        trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, callbacks=[health],
                             enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
        trainer.fit(Toy(), train_dataloaders=loader)
        return health


def test_every_batch_skipped_stops_the_stage_and_is_counted():
    from embedkit.recipes.health import NothingTrained

    health = _Toy.fit(lambda i: None)
    # Lightning still counts a step whose training_step returned None: the skips tell.
    assert health.summary() == {"batches": 4, "optimizer_steps": 4, "skipped_nonfinite": 4, "zero_loss": 0}
    with pytest.raises(NothingTrained, match="4 of 4 training batches had a non-finite loss"):
        health.verdict("x")
    some = _Toy.fit(lambda i: None if i == 0 else 1.0)   # 1 of 4 skipped, over the 0.1 limit
    with pytest.raises(NothingTrained, match="1 of 4 training batches had a non-finite loss"):
        some.verdict("x")
    _Toy.fit(lambda i: None if i == 0 else 1.0, max_skipped_fraction=0.5).verdict("x")   # allowed


def test_no_optimizer_step_stops_the_stage():
    from embedkit.recipes.health import NothingTrained

    with pytest.raises(NothingTrained, match="0 optimizer steps"):
        _Toy.fit(lambda i: 1.0, batches=0).verdict("x")


def test_a_loss_of_exactly_zero_on_every_batch_stops_the_stage():
    from embedkit.recipes.health import NothingTrained

    with pytest.raises(NothingTrained, match="exactly 0 on all 4 batches"):
        _Toy.fit(lambda i: 0.0).verdict("x")
    _Toy.fit(lambda i: 0.0 if i else 0.5).verdict("x")   # one real loss: it trained


@pytest.mark.slow
def test_a_run_with_nothing_to_contrast_fails_instead_of_reporting_an_untrained_model(tmp_path):
    res = _run(tmp_path, "experiment_name=zero", *SMOKE, "data.batch_size=1", "data.train_group_size=1")
    assert res.returncode != 0
    assert "the training loss was exactly 0 on all 3 batches" in res.stderr
    (run,) = (tmp_path / "logs" / "zero" / "runs").iterdir()
    assert not (run / "results.json").exists() and not (run / "table.md").exists()


def test_the_sweep_table_shows_a_later_failure_beside_a_kept_result(tmp_path):
    from embedkit.reporting.sweep import collect

    _job(tmp_path, "0", ["data.batch_size=16"], {"label": "data.batch_size=16", "Avg": 1.0})
    _job(tmp_path, "1", ["data.batch_size=32", "resume=true"], {"label": "data.batch_size=32", "Avg": 2.0})
    time.sleep(0.01)
    (tmp_path / "0" / "error.json").write_text(json.dumps({"error": "SettingsChanged: objective.lr"}))
    rows = {r["label"]: r for r in collect(tmp_path)}
    assert set(rows) == {"data.batch_size=16", "data.batch_size=32"}   # resume= is no label
    assert "SettingsChanged" in rows["data.batch_size=16"]["error"] and "kept" in rows["data.batch_size=16"]["error"]
    assert rows["data.batch_size=32"]["Avg"] == 2.0


def test_a_folder_given_by_hand_is_refused_while_a_live_run_writes_it(tmp_path):
    folder = tmp_path / "reproduce" / "mrl_dims"
    folder.mkdir(parents=True)
    writer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from pathlib import Path
        from embedkit.folders import claim
        claim(Path({str(folder)!r}))
        print("claimed", flush=True)
        time.sleep(60)
    """)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "claimed"
        with pytest.raises(FolderInUse, match="two runs must not share a folder"):
            run_folders.claim(folder)
    finally:
        writer.kill()
        writer.wait()
    run_folders.claim(folder)   # the writer is gone: its lock is stale
