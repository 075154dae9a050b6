"""Aggregate a Hydra multirun: one table over every job of the sweep, written when the sweep ends.

Each job writes its own `results.json` into its job folder; this callback only reads them, so a
job that failed (no results, an `error` entry: embedkit/recipes/recovery.py `guarded`, or a
results.json that cannot be read or parsed) shows up as a row with its error instead of hiding
the others, and the sweep exits non-zero at the end. `python -m embedkit.reporting.sweep
<sweep_dir>` rebuilds the table by hand.

When W&B is among the sweep's loggers (`logger=wandb`, or the default's `logger.wandb`), the table
is also logged as a `wandb.Table` ("sweep_table") in a run of its own, in the experiment's group
beside the jobs' runs, with the logger's project, tags and offline setting; offline it lands in
`<sweep_dir>/wandb/offline-run-*` for `wandb sync`.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from hydra.experimental.callback import Callback

from embedkit import runs
from embedkit.reporting.tables import COLUMNS, row_from_results, write_table

log = logging.getLogger(__name__)


def job_overrides(job: Path) -> list[str]:
    import yaml

    path = runs.hydra_file(job, runs.HYDRA_OVERRIDES)
    found = list(yaml.safe_load(path.read_text(encoding="utf-8")) or []) if path.exists() else []
    return [o for o in found if not str(o).startswith("resume=")]   # how it ran, not what


def collect(sweep_dir: str | Path) -> list[dict]:
    jobs = [p for p in Path(sweep_dir).iterdir() if p.is_dir() and (p / runs.HYDRA).is_dir()]
    jobs.sort(key=lambda p: (len(p.name), p.name))
    overrides = {job: job_overrides(job) for job in jobs}
    # Label each job by the overrides that differ between jobs: that is what the sweep varied.
    common = set.intersection(*(set(o) for o in overrides.values())) if jobs else set()
    rows = []
    for job in jobs:
        label = ",".join(o for o in overrides[job] if o not in common) or job.name
        results = runs.results_file(job)
        if results.exists():
            try:
                content = json.loads(results.read_text(encoding="utf-8"))
                if not isinstance(content, dict):
                    raise ValueError(f"expected a JSON object, got {type(content).__name__}")
            except (OSError, ValueError) as err:   # JSONDecodeError and UnicodeDecodeError too
                # One damaged file costs its own row, not the table of every other job.
                log.warning("%s is unreadable (%s); the sweep table shows it as failed", results, err)
                rows.append({"label": label,
                             "error": f"unreadable {runs.RESULTS}: {job.name}/{runs.RESULTS} ({err})"})
                continue
            later = job / runs.ERROR
            if later.exists() and later.stat().st_mtime >= results.stat().st_mtime:
                # A later attempt failed (e.g. a resume refused on changed settings); the finished
                # results.json was kept (embedkit/recipes/recovery.py guarded).
                try:
                    error = json.loads(later.read_text(encoding="utf-8")).get("error", "?")
                except (OSError, ValueError) as err:
                    error = f"unreadable {runs.ERROR} ({err})"
                rows.append({"label": label, "error": f"{error} (its {runs.RESULTS} from an earlier "
                                                      f"attempt is kept)"})
                continue
            rows.append(row_from_results(label, content))
        else:
            rows.append({"label": label, "error": f"no {runs.RESULTS} in {job.name}/: the job failed or is still running"})
    return rows


def aggregate(sweep_dir: str | Path) -> str:
    rows = collect(sweep_dir)
    markdown = write_table(rows, sweep_dir, first="job", stem=runs.SWEEP_TABLE)
    return markdown


def wandb_logger_config(config) -> dict | None:
    """The W&B logger's settings in a sweep's config (`logger` itself, or one of its named loggers),
    resolved; None when W&B is not among the loggers."""
    from omegaconf import OmegaConf

    node = config.get("logger") if OmegaConf.is_dict(config) else None
    if not OmegaConf.is_dict(node):
        return None
    candidates = [node] if "_target_" in node else [v for v in node.values() if OmegaConf.is_dict(v)]
    for sub in candidates:
        if str(sub.get("_target_", "")).endswith("WandbLogger"):
            # Only the keys used here: save_dir names the job's folder, which a sweep's end has not.
            return {k: OmegaConf.to_container(sub[k], resolve=True) if OmegaConf.is_config(sub[k]) else sub[k]
                    for k in ("project", "entity", "group", "tags", "offline") if k in sub}
    return None


def log_wandb_table(rows: list[dict], sweep_dir: str | Path, settings: dict, name: str) -> Path:
    """Log the sweep table as a wandb.Table in a run of its own; returns the run's folder."""
    import os

    import wandb

    if settings.get("offline", True):
        os.environ.setdefault("WANDB_MODE", "offline")   # as the jobs' loggers: no key, no network
    os.environ.setdefault("WANDB_SILENT", "true")
    has_error = any("error" in r for r in rows)
    columns = ["job", *COLUMNS] + (["error"] if has_error else [])
    data = [[str(r["label"]), *(r.get(c) for c in COLUMNS)] + ([r.get("error", "")] if has_error else [])
            for r in rows]
    run = wandb.init(project=settings.get("project"), entity=settings.get("entity"),
                     group=settings.get("group"), tags=settings.get("tags"), name=name,
                     job_type="sweep_table", dir=str(sweep_dir),
                     mode="offline" if settings.get("offline", True) else "online")
    try:
        run.log({runs.SWEEP_TABLE: wandb.Table(columns=columns, data=data)})
        return Path(run.dir).parent
    finally:
        run.finish()


class SweepTable(Callback):
    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.exists():
            return
        markdown = aggregate(sweep_dir)
        print(f"\nSweep table ({runs.table_file(sweep_dir, 'md', runs.SWEEP_TABLE)}):\n\n{markdown}\n")
        rows = collect(sweep_dir)
        settings = wandb_logger_config(config)
        if settings is not None:
            try:
                log_wandb_table(rows, sweep_dir, settings, f"{config.get('experiment_name', 'sweep')}/sweep")
            except Exception as err:   # noqa: BLE001  the table on disk is what the sweep owes
                log.warning("could not log the sweep table to W&B (%s); it is in %s", err, sweep_dir)
        failed = [row for row in rows if "error" in row]
        if failed:
            # The other jobs' results are safe on disk; the exit status still tells scripts and CI.
            raise SystemExit(
                f"{len(failed)} sweep job(s) failed: {', '.join(str(r['label']) for r in failed)}. "
                f"Their errors are in their results.json and in the table above; re-run the same "
                f"command with resume=true to redo only failed or missing jobs.")


if __name__ == "__main__":
    print(aggregate(sys.argv[1]))
