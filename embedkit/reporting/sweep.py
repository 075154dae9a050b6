"""Aggregate a Hydra multirun: one table over every job of the sweep, written when the sweep ends.

Each job writes its own `results.json` into its job folder; this callback only reads them, so a
job that failed (no results, an `error` entry: embedkit/recipes/recovery.py `guarded`, or a
results.json that cannot be read or parsed) shows up as a row with its error instead of hiding
the others, and the sweep exits non-zero at the end. `python -m embedkit.reporting.sweep
<sweep_dir>` rebuilds the table by hand.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from hydra.experimental.callback import Callback

from embedkit import runs
from embedkit.reporting.tables import row_from_results, write_table

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


class SweepTable(Callback):
    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.exists():
            return
        markdown = aggregate(sweep_dir)
        print(f"\nSweep table ({runs.table_file(sweep_dir, 'md', runs.SWEEP_TABLE)}):\n\n{markdown}\n")
        failed = [row for row in collect(sweep_dir) if "error" in row]
        if failed:
            # The other jobs' results are safe on disk; the exit status still tells scripts and CI.
            raise SystemExit(
                f"{len(failed)} sweep job(s) failed: {', '.join(str(r['label']) for r in failed)}. "
                f"Their errors are in their results.json and in the table above; re-run the same "
                f"command with resume=true to redo only failed or missing jobs.")


if __name__ == "__main__":
    print(aggregate(sys.argv[1]))
