"""Runs that survive: resuming a killed run or sweep, isolating a failed sweep job, confined writes.

- `resume=true` (or `resume=<run or sweep folder>`) makes Hydra's run/sweep folder the most recent
  one of this experiment instead of a new timestamped one (`run_dir`, the `${embedkit_run_dir:}`
  resolver in conf/hydra/default.yaml). Inside it, a row whose `results.json` holds no `error` is
  done and is not redone (`finished_results`), an intermediate stage with `model/.done` is reused
  (the recipe already did that), and an interrupted stage continues from its newest Lightning
  checkpoint (embedkit/checkpointing.py).
- Under `-m`, a job that raises writes `results.json` with an `error` entry (and the traceback)
  and returns normally (`guarded`), so Hydra runs the remaining jobs and the sweep table shows the
  failure; the sweep then exits non-zero (embedkit/reporting/sweep.py). Re-running the sweep in
  the same folder redoes exactly the jobs without a clean results.json.
- Folders named by configs (row labels, stage names, variants) are joined with `inside`, which
  refuses a name that would lead out of the run folder (`..`, an absolute path, a symlink out).
"""

from __future__ import annotations

import json
import logging
import traceback
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)


def run_dir(base: str, fresh: str, resume: Any) -> str:
    """The run (or sweep) folder: `base/fresh` normally; with resume=true the newest folder under
    `base`; with resume=<path>, that folder. Nothing to resume starts a fresh folder."""
    if resume is None or resume is False or str(resume).lower() in ("", "false", "none", "null"):
        return f"{base}/{fresh}"
    if resume is True or str(resume).lower() == "true":
        # Folder names are timestamps (%Y-%m-%d_%H-%M-%S): the newest sorts last.
        folders = sorted(p for p in Path(base).glob("*") if p.is_dir()) if Path(base).is_dir() else []
        if not folders:
            log.warning("resume=true: nothing to resume under %s; starting a new run", base)
            return f"{base}/{fresh}"
        return str(folders[-1])
    path = Path(str(resume)).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"resume={resume}: no such run folder")
    return str(path)


def inside(base: str | Path, *parts: str) -> Path:
    """`base / parts`, refusing a path that resolves outside `base`."""
    base = Path(base)
    path = base.joinpath(*(str(p) for p in parts))
    # `..` is refused even where it would stay inside (`rows/..` is the run folder itself).
    climbs = any(Path(str(p)).is_absolute() or ".." in Path(str(p)).parts for p in parts)
    if climbs or not path.resolve().is_relative_to(base.resolve()):
        raise ValueError(f"refusing to write to {path}: the name {'/'.join(map(str, parts))!r} (from the "
                         f"config) leads outside the run folder {base}")
    return path


def finished_results(row_dir: Path, label: str) -> dict[str, dict] | None:
    """{variant: results} of a row an earlier run of this folder finished cleanly, else None."""
    path = row_dir / "results.json"
    if not path.exists():
        return None
    try:
        root = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        log.warning("%s is unreadable (%s); redoing the row", path, err)
        return None
    if "error" in root:
        return None
    if root.get("label") != label:
        raise RuntimeError(f"{path} holds the results of {root.get('label')!r}, not of {label!r}: "
                           f"this folder belongs to another run or sweep; resume it with the same "
                           f"command, or start a new one without resume")
    results = {} if "variants" in root else {root.get("variant") or "": root}
    variant_files = sorted((row_dir / "variants").glob("*/results.json"), key=lambda p: p.stat().st_mtime)
    for file in variant_files:
        res = json.loads(file.read_text(encoding="utf-8"))
        results[res.get("variant") or ""] = res
    return results


def is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def guarded(run: Callable, cfg) -> Any:
    """`run(cfg)`; in a sweep job, a failure is written to the job's results.json instead of raised."""
    if not is_multirun():
        return run(cfg)
    from hydra.core.hydra_config import HydraConfig

    from embedkit.redact import redact_text, write_json

    try:
        return run(cfg)
    except Exception as err:   # noqa: BLE001  a sweep job's failure must not take the sweep down
        out_dir = Path(cfg.paths.output_dir)
        label = redact_text(HydraConfig.get().job.override_dirname or "run")
        log.exception("sweep job %s (%s) failed; the sweep goes on", out_dir.name, label)
        write_json(out_dir / "results.json", {
            "label": label, "error": f"{type(err).__name__}: {err}",
            "traceback": traceback.format_exc(),
        })
        return None
