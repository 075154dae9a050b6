"""Loggers: by default a run logs to W&B (offline: no key, no network) and Lightning's CSV log
together (conf/logger/default.yaml); `logger=csv` and `logger=wandb` still pick one. The CSV is what
the notebooks read for loss curves (embedkit.runs.csv_metrics), so a default run must leave it; a
sweep's aggregate table also goes to W&B as a wandb.Table when W&B is among the loggers.

The W&B checks read what wandb wrote offline (the run folder and its `.wandb` transaction log),
with wandb itself running: nothing is mocked.
"""

import csv
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf, read_write

from embedkit import runs
from embedkit.recipes.train_eval import finish_logger, make_logger, run

from helpers import DATA

pytestmark = pytest.mark.usefixtures("one_torch_thread")

needs_data = pytest.mark.skipif(not (DATA / "eval" / "STSB").is_dir(), reason=f"zh-mini data not found at {DATA}")
SMALL = ["debug=smoke", "eval.tasks=[STSB]", "eval.max_rows=32", "data.max_examples=96", "trainer.max_steps=2"]


def _body(cfg):
    """The config as `python run.py` hands it to the recipe: without the `hydra` node."""
    return OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])


def _transaction_log(offline: Path) -> bytes:
    """An offline run's `run-*.wandb` log. wandb's service writes it in the background, after
    `finish()` returns: tearing the service down first waits for it to be written out."""
    import wandb

    wandb.teardown()
    (log,) = offline.glob("run-*.wandb")
    return log.read_bytes()


def _loggers(compose_run, tmp_path, *overrides):
    cfg = compose_run(list(overrides))
    return make_logger(cfg, "x", tmp_path / "stage")


def test_the_default_is_wandb_and_csv_and_each_stays_a_single_choice(compose_run, tmp_path):
    default = _loggers(compose_run, tmp_path)
    assert [type(lg).__name__ for lg in default] == ["CSVLogger", "WandbLogger"]
    csv_logger, wandb_logger = default
    # The CSV lands where embedkit.runs.CSV_METRICS looks: <stage>/csv/version_*/metrics.csv
    assert Path(csv_logger.log_dir) == tmp_path / "stage" / "csv" / "version_0"
    assert Path(wandb_logger.save_dir) == tmp_path / "stage"   # its offline-run-* folder: <stage>/wandb/
    assert [type(lg).__name__ for lg in _loggers(compose_run, tmp_path, "logger=csv")] == ["CSVLogger"]
    assert [type(lg).__name__ for lg in _loggers(compose_run, tmp_path, "logger=wandb")] == ["WandbLogger"]
    # one of the default's pair dropped, or none at all
    assert [type(lg).__name__ for lg in _loggers(compose_run, tmp_path, "logger.wandb=null")] == ["CSVLogger"]
    assert _loggers(compose_run, tmp_path, "~logger") is False


def test_a_logger_entry_that_is_no_logger_config_is_named(compose_run, tmp_path):
    with pytest.raises(ValueError, match=r"logger\.csv: expected a logger config with _target_"):
        _loggers(compose_run, tmp_path, "logger.csv=oops")


@needs_data
def test_a_default_run_writes_the_csv_log_and_an_offline_wandb_run(compose_run, tmp_path):
    cfg = compose_run(["experiment_name=loggers", *SMALL])
    run(_body(cfg))
    run_dir = tmp_path / "run"
    # The notebooks' helper finds the CSV log of a default run (no logger=csv needed).
    (metrics,) = runs.csv_metrics(runs.row_dirs(run_dir)[0])
    with metrics.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 2   # trainer.max_steps=2, log_every_n_steps=1 (debug=smoke)
    # The eval scores reach the CSV too (flushed after fit), equal to the run's table.
    (row,) = json.loads(runs.table_file(run_dir).read_text(encoding="utf-8"))
    (avg,) = [float(r["eval/Avg"]) for r in rows if r.get("eval/Avg")]
    assert avg == pytest.approx(row["Avg"])
    # And W&B wrote an offline run beside it, holding the same metric names.
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    data = _transaction_log(offline)
    assert b"train/loss" in data and b"eval/Avg" in data and b"loggers" in data   # metrics, group


def test_the_sweep_table_goes_to_wandb_as_a_table_when_wandb_logs(compose_run, tmp_path):
    from embedkit.reporting.sweep import SweepTable, wandb_logger_config

    sweep = tmp_path / "sweep"
    for num, (batch, avg) in enumerate([(16, 41.5), (32, 43.25)]):
        job = sweep / str(num)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- data.batch_size={batch}\n- debug=smoke\n")
        (job / "results.json").write_text(json.dumps({"categories": {"STS": avg}, "Avg": avg}))
    assert wandb_logger_config(compose_run(["logger=csv"])) is None
    assert wandb_logger_config(compose_run(["logger=wandb", "experiment_name=sweepy"]))["group"] == "sweepy"
    cfg = compose_run(["experiment_name=sweepy"])   # the default: W&B among the loggers
    with read_write(cfg.hydra):
        cfg.hydra.sweep.dir = str(sweep)
    SweepTable().on_multirun_end(cfg)

    (offline,) = (sweep / "wandb").glob("offline-run-*")
    (table_file,) = offline.glob("files/media/table/sweep_table_*.table.json")
    logged = json.loads(table_file.read_text(encoding="utf-8"))
    on_disk = json.loads(runs.table_file(sweep, "json", runs.SWEEP_TABLE).read_text(encoding="utf-8"))
    assert logged["columns"] == ["job", "Retrieval", "STS", "PairCLF", "CLF", "Rerank", "Cluster", "Avg"]
    assert logged["data"] == [[r["label"], *(r.get(c) for c in logged["columns"][1:])] for r in on_disk]
    assert [row[0] for row in logged["data"]] == ["data.batch_size=16", "data.batch_size=32"]
    assert [row[-1] for row in logged["data"]] == [41.5, 43.25]
    assert b"sweepy" in _transaction_log(offline)   # the experiment's group


def test_finishing_flushes_every_logger_and_closes_wandb(tmp_path):
    from pytorch_lightning.loggers import CSVLogger

    logger = CSVLogger(str(tmp_path), name="csv")
    logger.log_metrics({"eval/Avg": 12.5}, step=3)
    finish_logger([logger])   # eval metrics logged after fit's own flush must still reach the file
    (metrics,) = runs.csv_metrics(tmp_path)
    assert "12.5" in metrics.read_text()
    finish_logger(False)   # no logger: nothing to do
