"""The run-folder layout: every file and folder name a run writes, and where, in one place.

The recipe (embedkit/recipes/train_eval.py), recovery and resume (embedkit/recipes/recovery.py),
the sweep table (embedkit/reporting/sweep.py), the RESULTS.md generator
(embedkit/reporting/report.py), `make reproduce` (embedkit/reporting/experiments.py) and the
results notebooks (notebooks/*.ipynb) all name paths through this module. It imports nothing from
embedkit, so a notebook can import it with the checkout on its path.

A run folder (`logs/<experiment>/runs/<time>/`, `logs/reproduce/<experiment>/`, or one sweep job):

    table.md, table.csv, table.json      one row per (row, variant): C-MTEB categories and Avg
    tokenizer/                           the vocabulary every stage of every row shares
    .hydra/config.yaml, overrides.yaml   Hydra's (a resumed run's go to .hydra/resumed/<time>/)
    .lock                                the pid/host/start of the live process writing the folder
    rows/<safe label>/                   one per ablation row; a one-row run uses the run folder
        results.json                     written last: the row is finished once it is clean
        settings.json                    the resolved settings the row was run with (resume check)
        model/, model/.done              the final stage's encoder; .done marks it trained
        callback_<name>.json             a training callback's summary (DHNM: refreshes, curves)
        csv/version_*/metrics.csv        Lightning's CSV log (logger=csv)
        variants/<safe variant>/results.json   one per scored variant (Matryoshka width, M3 mode)
        seed-<s>/                        with `seeds=N>1`: one per seed, each laid out as a row folder
                                         is above; the row's own results.json, variants/ then hold
                                         the mean over seeds with the per-seed scores and spread
    stages/<stage>-<key>/                a stage shared by rows (its model/, model/.done, logs)

A sweep folder (`logs/<experiment>/multiruns/<time>/`) holds one job folder per job (`<n>/`, with
`.job.json` until Hydra's `.hydra/` exists, and `error.json` when a later attempt failed beside a
clean results.json) and `sweep_table.{md,csv,json}`.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

# ---------------------------------------------------------------- names

RESULTS = "results.json"        # a row's (or variant's, or sweep job's) scores; written last
ERROR = "error.json"            # a later attempt's error, beside a clean results.json
SETTINGS = "settings.json"      # the settings a row was run with
TABLE = "table"                 # stem of table.md / table.csv / table.json
SWEEP_TABLE = "sweep_table"     # stem of a sweep's table
MODEL = "model"                 # a stage's exported encoder
DONE = ".done"                  # inside model/: the stage finished training (its record)
TOKENIZER = "tokenizer"
ROWS = "rows"
STAGES = "stages"
VARIANTS = "variants"
LOCK = ".lock"
JOB_CLAIM = ".job.json"         # a sweep job's overrides, before Hydra writes .hydra/
HYDRA = ".hydra"
HYDRA_CONFIG = "config.yaml"
HYDRA_OVERRIDES = "overrides.yaml"
CSV_METRICS = "csv/version_*/metrics.csv"   # Lightning's CSVLogger under a row or stage folder
REPRODUCE = "reproduce"         # logs/reproduce/<experiment>/: make reproduce's fixed folders
RUNS = "runs"                   # logs/<experiment>/runs/<time>/: plain `python run.py`
MULTIRUNS = "multiruns"         # logs/<experiment>/multiruns/<time>/<job>/: `python run.py -m`
SEED_PREFIX = "seed-"           # <row>/seed-<s>/: one seed of a row run with seeds=N>1
FLOOR_KEY = "lexical_floor"     # table.json: the key only the lexical floor's row has
_SEED_NAME = re.compile(re.escape(SEED_PREFIX) + r"(-?\d+)")


def table_name(ext: str, stem: str = TABLE) -> str:
    """`table.json`, `table.csv`, `table.md` (or a sweep's `sweep_table.*`)."""
    return f"{stem}.{ext}"


def callback_summary_name(callback: str) -> str:
    """The summary a training callback writes beside its stage's model: `callback_<name>.json`."""
    return f"callback_{callback}.json"


# ---------------------------------------------------------------- folders

#: The longest `safe_label`: a folder name must stay under the filesystems' 255 bytes, with room
#: for what mteb and the recipe add around it (a plain run's label is its whole override string).
MAX_LABEL = 120


def safe_label(label: str) -> str:
    """A row or variant label as a folder name (`+DHNM` stays, `BGE w.o. pre-train` -> `BGE_w.o._pre-train`).
    A name longer than MAX_LABEL keeps its start and ends in a hash of the whole label, so two long
    labels that differ only at their end stay apart."""
    name = re.sub(r"[^A-Za-z0-9._=,+-]+", "_", str(label)).strip("_") or "run"
    if len(name) <= MAX_LABEL:
        return name
    digest = hashlib.sha1(str(label).encode()).hexdigest()[:10]
    return f"{name[:MAX_LABEL - 11].rstrip('_')}_{digest}"


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


def row_dir(run: str | Path, label: str, single: bool = False) -> Path:
    """A row's folder: `rows/<safe label>/`, or the run folder itself for a one-row run."""
    return Path(run) if single else inside(run, ROWS, safe_label(label))


def stage_dir(run: str | Path, stage: str, key: str) -> Path:
    """A shared (non-final) stage's folder: `stages/<stage>-<key>/`."""
    return inside(run, STAGES, f"{stage}-{key}")


def seed_dir(row: str | Path, seed: int) -> Path:
    """One seed's folder inside a row run with several seeds: `<row>/seed-<s>/`."""
    return Path(row) / f"{SEED_PREFIX}{int(seed)}"


def seed_dirs(row: str | Path) -> list[Path]:
    """The per-seed folders of a row run with several seeds, by seed; `[row]` for a one-seed row,
    whose seed ran in the row folder itself. What a seed trained (model/, csv/, callback_*.json)
    is in these folders."""
    found = [(int(m.group(1)), p) for p in Path(row).glob(f"{SEED_PREFIX}*")
             if p.is_dir() and (m := _SEED_NAME.fullmatch(p.name))]
    return [p for _, p in sorted(found)] or [Path(row)]


def variant_dir(row: str | Path, variant: str) -> Path:
    """Where a variant's results go: `variants/<safe variant>/`, the row folder for the plain one ("")."""
    return Path(row) if not variant else inside(row, VARIANTS, safe_label(variant))


def model_dir(folder: str | Path) -> Path:
    """A stage's (or row's) exported encoder."""
    return Path(folder) / MODEL


def done_file(folder: str | Path) -> Path:
    """`model/.done` of a stage folder: it exists once the stage finished training."""
    return model_dir(folder) / DONE


def results_file(folder: str | Path) -> Path:
    return Path(folder) / RESULTS


def settings_file(folder: str | Path) -> Path:
    return Path(folder) / SETTINGS


def table_file(run: str | Path, ext: str = "json", stem: str = TABLE) -> Path:
    return Path(run) / table_name(ext, stem)


def callback_summary(folder: str | Path, callback: str) -> Path:
    return Path(folder) / callback_summary_name(callback)


def hydra_file(run: str | Path, name: str = HYDRA_CONFIG) -> Path:
    """`.hydra/config.yaml` or `.hydra/overrides.yaml` of the run that made the folder's results."""
    return Path(run) / HYDRA / name


def csv_metrics(folder: str | Path) -> list[Path]:
    """The Lightning CSV logs (`csv/version_*/metrics.csv`) of a row or stage folder, oldest first."""
    return sorted(Path(folder).glob(CSV_METRICS))


# ---------------------------------------------------------------- reading a run folder

def is_single(run: str | Path) -> bool:
    """A one-row run (a plain run, a sweep job, mrl_dims): results.json at the root, no rows/."""
    run = Path(run)
    return results_file(run).is_file() and not (run / ROWS).is_dir()


def row_dirs(run: str | Path) -> list[Path]:
    """The row folders of a run, sorted by name (the run folder itself for a one-row run)."""
    run = Path(run)
    if is_single(run):
        return [run]
    return sorted(p for p in (run / ROWS).glob("*") if p.is_dir())


def row_results(run: str | Path) -> list[Path]:
    """Every row's results.json, sorted by row folder."""
    return [results_file(d) for d in row_dirs(run) if results_file(d).is_file()]


def variant_results(row: str | Path) -> list[Path]:
    """The results.json of a row's scored variants."""
    return sorted(Path(row).glob(f"{VARIANTS}/*/{RESULTS}"))


def has_table(run: str | Path) -> bool:
    return table_file(run).is_file()


def finished_cleanly(run: str | Path, seeds: int | None = None) -> bool:
    """The run wrote its table and no row of it records an error (`make reproduce` keeps such a run);
    with `seeds`, also every row was run with that many seeds (a row's `seeds` list in table.json;
    a row without one ran one seed)."""
    try:
        rows = json.loads(table_file(run).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(rows, list) or any(isinstance(r, dict) and "error" in r for r in rows):
        return False
    if seeds is None:
        return True
    counts = {len(r.get("seeds") or [None]) for r in rows if isinstance(r, dict) and FLOOR_KEY not in r}
    return counts <= {int(seeds)}


# ---------------------------------------------------------------- run folders under logs/

def reproduce_dir(logs: str | Path, experiment: str) -> Path:
    """`logs/reproduce/<experiment>/`, the folder `make reproduce` runs an experiment in."""
    return Path(logs) / REPRODUCE / experiment


def runs_dir(logs: str | Path, experiment: str) -> Path:
    """`logs/<experiment>/runs/`, where plain `python run.py` runs go (one `<time>/` each)."""
    return Path(logs) / experiment / RUNS


def finished_runs(logs: str | Path, experiment: str, reproduce_name: str | None = None) -> list[Path]:
    """Finished run folders of one experiment (those holding table.json), newest last:
    `logs/reproduce/<reproduce_name or experiment>/` and `logs/<experiment>/runs/*/`."""
    found = [reproduce_dir(logs, reproduce_name or experiment), *sorted(runs_dir(logs, experiment).glob("*"))]
    found = [p for p in found if has_table(p)]
    return sorted(found, key=lambda p: table_file(p).stat().st_mtime)
