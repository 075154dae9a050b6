"""Where a run writes: its run, sweep and job folders, and the folder names of its rows.

Hydra is given its folders by the resolvers of embedkit/config.py, which call the functions here
(so this module imports nothing of embedkit: `python run.py` and `python -m embedkit.mining` both
compose with them).

Folders
- A fresh run (or sweep) folder is created exclusively: two runs started in the same second get
  `<time>` and `<time>_2`, never one shared folder (`run_dir`). The process that owns a folder holds
  `<folder>/.lock` (its pid, host and process start time) until it exits; a lock whose process is
  gone (SIGKILL, a lost machine) is stale and is taken over.
- `resume=true` picks the newest folder of the experiment that no live process is writing;
  `resume=<folder>` picks that one, and refuses it while a live run holds its lock.
- A resumed job writes its Hydra configs into `.hydra/resumed/<time>/` (`hydra_subdir`): the
  `.hydra/` files of the run that produced the results are never overwritten.

Sweep jobs
- A job's folder is found by its overrides, never by its position (`job_subdir`): resuming
  `data.batch_size=32,16` in the folder of `data.batch_size=16,0` keeps the finished batch-16 job
  and puts batch 32 into a new folder.

Rows
- A row's folder inside a run is `rows/<safe_label(label)>` (variants: `variants/<safe_label>`);
  the recipe writes there and the report reads there (embedkit/reporting/report.py).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

from embedkit.runs import HYDRA, HYDRA_CONFIG, HYDRA_OVERRIDES, JOB_CLAIM, LOCK, safe_label  # noqa: F401

_chosen: dict[tuple, str] = {}      # one answer per process: Hydra resolves its folders repeatedly
_held: set[Path] = set()            # the locks this process holds, released at exit


class FolderInUse(RuntimeError):
    """A run folder is being written by a live process."""


# ---------------------------------------------------------------- run and sweep folders

def _resuming(resume: Any) -> bool:
    return not (resume is None or resume is False or str(resume).lower() in ("", "false", "none", "null"))


def _is_follower_rank() -> bool:
    # torchrun / SLURM ranks > 0 run the same command: the folder is rank 0's to create and lock.
    return any(os.environ.get(k, "0") not in ("", "0") for k in ("RANK", "LOCAL_RANK", "SLURM_PROCID"))


def _newest_first_key(path: Path) -> tuple:
    # `<time>` then `<time>_2`, `<time>_3`, ...: the timestamp orders runs, the suffix same-second ones.
    m = re.fullmatch(r"(.*)_(\d+)", path.name)
    return (m.group(1), int(m.group(2))) if m else (path.name, 1)


def run_dir(base: str, fresh: str, resume: Any) -> str:
    """The run (or sweep) folder: a new `base/fresh` (made unique); with resume=true the newest
    folder under `base` that no live run holds; with resume=<path>, that folder."""
    key = (str(base), str(fresh), str(resume))
    if key not in _chosen:
        _chosen[key] = _choose_run_dir(Path(base), str(fresh), resume)
    return _chosen[key]


def _choose_run_dir(base: Path, fresh: str, resume: Any) -> str:
    if _is_follower_rank():
        # Rank 0 holds the lock of the folder all ranks share: take the same one, lock aside.
        if not _resuming(resume):
            return str(base / fresh)
        if str(resume).lower() != "true":
            return str(resume)
        folders = sorted((p for p in base.glob("*") if p.is_dir()), key=_newest_first_key) if base.is_dir() else []
        return str(folders[-1]) if folders else str(base / fresh)
    if not _resuming(resume):
        return str(_claim_fresh(base, fresh))
    if resume is True or str(resume).lower() == "true":
        folders = sorted((p for p in base.glob("*") if p.is_dir()), key=_newest_first_key, reverse=True) \
            if base.is_dir() else []
        for folder in folders:
            owner = live_owner(folder)
            if owner is not None:
                log.warning("resume=true: skipping %s, %s is writing it", folder, owner)
                continue
            if acquire(folder):
                return str(folder)
        log.warning("resume=true: nothing to resume under %s; starting a new run", base)
        return str(_claim_fresh(base, fresh))
    path = Path(str(resume)).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"resume={resume}: no such run folder")
    if not acquire(path):
        raise FolderInUse(f"resume={resume}: {live_owner(path) or 'another process'} is writing this "
                          f"folder; wait for it to finish, or delete {path / LOCK} if that run is gone")
    return str(path)


def _claim_fresh(base: Path, fresh: str) -> Path:
    base.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        folder = base / (fresh if n == 1 else f"{fresh}_{n}")
        try:
            folder.mkdir()          # exclusive: a second run started this second gets the next name
        except FileExistsError:
            continue
        acquire(folder)
        return folder
    raise RuntimeError(f"could not create a new run folder under {base}")


def _process_start(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _me() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "start": _process_start(os.getpid())}


def live_owner(folder: Path) -> str | None:
    """'pid N on HOST' if a live process other than this one holds `folder`'s lock, else None."""
    try:
        lock = json.loads((Path(folder) / LOCK).read_text())
    except (OSError, ValueError):
        return None
    me = _me()
    who = f"pid {lock.get('pid')} on {lock.get('host')}"
    if lock.get("pid") == me["pid"] and lock.get("host") == me["host"]:
        return None
    if lock.get("host") != me["host"]:
        return who    # another machine's process cannot be checked from here: assume it is alive
    pid = int(lock.get("pid") or 0)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None   # stale: the process is gone
    except PermissionError:
        pass
    if lock.get("start") and _process_start(pid) not in (None, lock["start"]):
        return None   # the pid was reused by another process
    return who


def acquire(folder: Path) -> bool:
    """Take `folder`'s lock for this process (a stale lock is replaced); False if a live one holds it."""
    folder = Path(folder)
    if live_owner(folder) is not None:
        return False
    tmp = folder / f"{LOCK}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(_me()))
    os.replace(tmp, folder / LOCK)
    if live_owner(folder) is not None:   # another process replaced it at the same moment
        return False
    _held.add(folder / LOCK)
    return True


def claim(folder: Path) -> None:
    """Hold `folder` for this run (also one given as hydra.run.dir, which no resolver locked), or
    stop if a live process is writing it. Ranks above 0 share rank 0's folder and take no lock."""
    if _is_follower_rank():
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    if not acquire(Path(folder)):
        raise FolderInUse(f"{folder} is being written by {live_owner(Path(folder))}; two runs must not "
                          f"share a folder. Wait for it, or delete {Path(folder) / LOCK} if that run is gone")


@atexit.register
def release_locks() -> None:
    for lock in list(_held):
        try:
            if json.loads(lock.read_text()).get("pid") == os.getpid():
                lock.unlink()
        except (OSError, ValueError):
            pass
        _held.discard(lock)


def hydra_subdir(output_dir: str) -> str:
    """Where Hydra saves this job's configs: `.hydra`, or `.hydra/resumed/<time>` when the folder
    already holds the configs of the run that made its results."""
    key = ("hydra_subdir", str(output_dir))
    if key not in _chosen:
        subdir = HYDRA
        if (Path(output_dir) / HYDRA / HYDRA_CONFIG).exists():
            stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
            n, subdir = 1, f"{HYDRA}/resumed/{stamp}"
            while (Path(output_dir) / subdir).exists():
                n += 1
                subdir = f"{HYDRA}/resumed/{stamp}_{n}"
        _chosen[key] = subdir
    return _chosen[key]


# ---------------------------------------------------------------- sweep jobs

def _job_key(overrides) -> list[str]:
    # `resume=...` says how to run, not what: it is not part of a job's identity.
    return sorted(str(o) for o in overrides if not str(o).startswith("resume="))


def recorded_overrides(job: Path) -> list[str] | None:
    """The overrides a job folder was made for: Hydra's overrides.yaml, or our claim before it exists."""
    import yaml

    saved = job / HYDRA / HYDRA_OVERRIDES
    try:
        if saved.exists():
            return list(yaml.safe_load(saved.read_text(encoding="utf-8")) or [])
        if (job / JOB_CLAIM).exists():
            return list(json.loads((job / JOB_CLAIM).read_text(encoding="utf-8"))["overrides"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return None


def job_subdir(sweep_dir: str, num: Any, overrides: Any) -> str:
    """A sweep job's folder under `sweep_dir`: the existing one made for the same overrides, else a
    new one (`num` if free, else the next free number), created exclusively."""
    overrides = [str(o) for o in overrides]
    key = ("job", str(sweep_dir), json.dumps(_job_key(overrides)))
    if key not in _chosen:
        _chosen[key] = _choose_job_subdir(Path(sweep_dir), int(num), overrides)
    return _chosen[key]


def _choose_job_subdir(sweep: Path, num: int, overrides: list[str]) -> str:
    want = _job_key(overrides)
    sweep.mkdir(parents=True, exist_ok=True)

    def match() -> str | None:
        for job in sorted((p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)):
            got = recorded_overrides(job)
            if got is not None and _job_key(got) == want:
                return job.name
        return None

    found = match()
    if found is not None:
        return found
    n = num
    while True:
        try:
            (sweep / str(n)).mkdir()
        except FileExistsError:
            found = match()   # a parallel job with these overrides may have just claimed it
            if found is not None:
                return found
            n += 1
            continue
        (sweep / str(n) / JOB_CLAIM).write_text(json.dumps({"overrides": overrides}), encoding="utf-8")
        return str(n)
