"""Runs that survive, and results that are never lost: resume, sweep jobs, confined writes.

Run, sweep and job folders (created exclusively, locked, found again on resume) are chosen in
embedkit/folders.py, for Hydra's `hydra.run.dir` / `hydra.sweep.subdir` resolvers (embedkit/config.py).

Sweep jobs
- A job that raises writes its error into `results.json` and returns normally (`guarded`), so
  Hydra runs the remaining jobs and the sweep table shows the failure; the sweep then exits
  non-zero (embedkit/reporting/sweep.py). A clean `results.json` is never replaced by an error:
  the error goes to `error.json` beside it.

Rows
- A row is finished when its root `results.json` holds no `error` and every variant it names is on
  disk (`finished_results`); the root file is written last, after every variant is scored.
- A row (or stage) is reused only when the settings it was run with equal this run's
  (`check_settings`, `settings.json` in the row folder); otherwise the run stops and names every
  key that differs.
- A row run with several seeds (`seeds=N`) keeps each seed in `seed-<s>/` under its folder, each
  checked and resumed as a row folder is; a finished (row, seed) is kept. A row folder holding the
  other layout (one seed at its root vs `seed-<s>/` folders) is refused (`check_seed_layout`).
- Folders named by configs (row labels, stage names, variants) are joined with `inside`, which
  refuses a name that would lead out of the run folder (`..`, an absolute path, a symlink out).
"""

from __future__ import annotations

import json
import logging
import traceback
from pathlib import Path
from typing import Any, Callable

from embedkit import runs
from embedkit.runs import ERROR, inside  # noqa: F401  (inside: joined names stay in the run folder)

log = logging.getLogger(__name__)


class SettingsChanged(RuntimeError):
    """A resumed row or job was run with other settings than this invocation's."""


# ---------------------------------------------------------------- sweep jobs

def is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def job_label() -> str:
    """This sweep job's overrides, as its row label (credentials masked)."""
    from hydra.core.hydra_config import HydraConfig

    from embedkit.redact import redact_text

    return redact_text(HydraConfig.get().job.override_dirname or "run")


def guarded(run: Callable, cfg) -> Any:
    """`run(cfg)`; in a sweep job, a failure is written to the job's results.json instead of raised
    (to error.json where a clean results.json from an earlier run must be kept)."""
    if not is_multirun():
        return run(cfg)
    from embedkit.redact import write_json

    try:
        return run(cfg)
    except Exception as err:   # noqa: BLE001  a sweep job's failure must not take the sweep down
        out_dir = Path(cfg.paths.output_dir)
        label = job_label()
        log.exception("sweep job %s (%s) failed; the sweep goes on", out_dir.name, label)
        record = {"label": label, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        target = runs.results_file(out_dir)
        if clean_results(target) is not None:
            target = out_dir / ERROR
            log.error("%s is kept (a finished result); this attempt's error is in %s",
                      runs.results_file(out_dir), target)
        write_json(target, record)
        return None


# ---------------------------------------------------------------- rows

def clean_results(path: Path) -> dict | None:
    """The content of a results.json that parses and holds no error, else None."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "error" not in data else None


def finished_results(row_dir: Path, label: str) -> dict[str, dict] | None:
    """{variant: results} of a row an earlier run of this folder finished cleanly, else None.

    Finished means: the root results.json (written last) is clean, and each variant it lists in
    `variant_names` has its own clean results.json."""
    path = runs.results_file(row_dir)
    if not path.exists():
        return None
    root = clean_results(path)
    if root is None:
        log.warning("%s is unreadable or records an error; redoing the row", path)
        return None
    if root.get("label") != label:
        raise RuntimeError(f"{path} holds the results of {root.get('label')!r}, not of {label!r}: "
                           f"this folder belongs to another run or sweep; resume it with the same "
                           f"command, or start a new one without resume")
    results = {} if "variants" in root else {root.get("variant") or "": root}
    variant_files = sorted(runs.variant_results(row_dir), key=lambda p: p.stat().st_mtime)
    for file in variant_files:
        res = clean_results(file)
        if res is not None:
            results[res.get("variant") or ""] = res
    missing = [v for v in root.get("variant_names", []) if v not in results]
    if missing:
        log.warning("%s: variant(s) %s were never scored; finishing the row", row_dir, missing)
        return None
    return results


def variant_results(variant_dir: Path, variant: str) -> dict | None:
    """A variant's results scored by an earlier, interrupted attempt at the same row, if clean."""
    res = clean_results(runs.results_file(variant_dir))
    return res if res is not None and (res.get("variant") or "") == variant else None


def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'a.b.c': leaf} of a nested dict (lists are leaves)."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flat(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: tree}


def settings_diff(then: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """'key: old -> new' for every flattened key that differs (or exists on one side only)."""
    missing = "(unset)"
    return [f"{k}: {json.dumps(then.get(k, missing), ensure_ascii=False, default=str)} (then) -> "
            f"{json.dumps(now.get(k, missing), ensure_ascii=False, default=str)} (now)"
            for k in sorted(set(then) | set(now)) if then.get(k, missing) != now.get(k, missing)]


def check_seed_layout(row_dir: Path, seeds: int, what: str) -> None:
    """Stop when a row folder holds the other seed layout than this run's: a one-seed row trains in
    the row folder itself, a several-seed row (`seeds=N`) in `seed-<s>/` folders under it, with the
    means at its root. Resuming one as the other would take a mean for a seed, or a seed for a mean."""
    row_dir, several = Path(row_dir), seeds > 1
    seed_folders = [p for p in runs.seed_dirs(row_dir) if p != row_dir]
    if several and runs.settings_file(row_dir).exists():
        found = f"a one-seed run ({runs.settings_file(row_dir)})"
    elif not several and seed_folders:
        found = f"a run with several seeds ({', '.join(p.name for p in seed_folders)})"
    else:
        return
    raise SettingsChanged(
        f"{what} in {row_dir} holds {found}, but this run has seeds={seeds}. "
        f"Resume it with the seeds it was run with, or start a new run (without resume); "
        f"make reproduce: delete that experiment's folder under logs/reproduce/.")


def check_settings(folder: Path, settings: dict[str, Any], what: str) -> None:
    """Record `settings` in `folder/settings.json`, or, if an earlier run recorded others there,
    stop: its results (or checkpoints) were made with those, and must not pass for this run's."""
    from embedkit.redact import redact, write_json

    path = runs.settings_file(folder)
    settings = json.loads(json.dumps(redact(settings), default=str))   # as the file will hold them
    if path.exists():
        try:
            then = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            then = None
        if then is not None and then != settings:
            diff = settings_diff(then, settings)
            shown = "\n  ".join(diff[:20]) + (f"\n  ... and {len(diff) - 20} more" if len(diff) > 20 else "")
            raise SettingsChanged(
                f"{what} in {folder} was run with other settings than this run's:\n  {shown}\n"
                f"A resumed run reuses a row or stage only when its settings match. Start a new run "
                f"(without resume), or resume with the settings it was started with.")
        if then is not None:
            return
    Path(folder).mkdir(parents=True, exist_ok=True)
    write_json(path, settings)
