"""Rows run with several seeds (`seeds=N`): the mean, spread and count of every score, and whether
a difference between two rows stands out of the seed-to-seed noise.

A row run with N > 1 seeds trains and scores once per seed (`<row>/seed-<s>/`, embedkit/runs.py);
`aggregate` turns the N results.json contents into the row's own: every score (`Avg`, each category,
each task) is the mean over the seeds that have it, and the file adds

    seeds:    [42, 43, 44]
    spread:   {Avg: {mean, std, n}, categories: {Retrieval: {mean, std, n}, ...}, tasks: {...}}
    per_seed: {"42": {Avg, categories, tasks, steps, final_train_loss, train_seconds, training,
                      mteb_results_dir}, ...}

`std` is the sample standard deviation (ddof = 1; None with one value) and `n` the number of seeds
with a score there. Every reader of results.json (tables, the report, notebooks, sweeps) sees the
means where it always read the scores.

A difference of two means is within noise when it is smaller than two standard errors of the
difference, 2·sqrt(s_a²/n_a + s_b²/n_b) (`standard_error`); with one seed on either side there is
no error to compare against.
"""

from __future__ import annotations

import math
import statistics
from typing import Iterable, Mapping

SCORE_GROUPS = ("categories", "tasks")   # results.json's per-column scores, besides `Avg`
PER_SEED_KEYS = ("steps", "final_train_loss", "train_seconds", "training", "mteb_results_dir")
# One seed's own facts: kept under per_seed only, not at the top where they would pass for the row's.
SEED_ONLY = ("seed", "training", "mteb_results_dir")
NOISE_SE = 2.0   # "within noise": |Δ| below this many standard errors of the difference


def _finite(values: Iterable) -> list[float]:
    return [float(v) for v in values
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]


def spread(values: Iterable) -> dict:
    """{mean, std, n} of the finite numbers among `values` (None, NaN: a seed without that score)."""
    found = _finite(values)
    n = len(found)
    return {"mean": statistics.fmean(found) if n else None,
            "std": statistics.stdev(found) if n > 1 else None, "n": n}


def _keys(dicts: Iterable[Mapping]) -> list[str]:
    out: dict[str, None] = {}
    for d in dicts:
        out.update(dict.fromkeys(d or {}))
    return list(out)


def aggregate(per_seed: Mapping[int, dict]) -> dict:
    """The results of one row (or one variant of it) over its seeds, from {seed: results.json}."""
    if not per_seed:
        raise ValueError("aggregate needs the results of at least one seed")
    seeds = sorted(per_seed)
    results = [per_seed[s] for s in seeds]
    # The row's description (label, variant, paper row, overrides, stages, steps) is every seed's.
    out = {k: v for k, v in results[0].items() if k not in SEED_ONLY}
    spreads: dict = {"Avg": spread(r.get("Avg") for r in results)}
    for group in SCORE_GROUPS:
        parts = [r.get(group) or {} for r in results]
        spreads[group] = {k: spread(p.get(k) for p in parts) for k in _keys(parts)}
        out[group] = {k: s["mean"] for k, s in spreads[group].items()}
    out["Avg"] = spreads["Avg"]["mean"]
    for key in ("train_seconds", "eval_seconds"):   # what the row cost, all seeds together
        if any(key in r for r in results):
            out[key] = round(sum(_finite(r.get(key) for r in results)), 1)
    if "final_train_loss" in out:
        out["final_train_loss"] = spread(r.get("final_train_loss") for r in results)["mean"]
    out["seeds"] = seeds
    out["spread"] = spreads
    out["per_seed"] = {str(s): {"Avg": r.get("Avg"), **{g: r.get(g) for g in SCORE_GROUPS if g in r},
                                **{k: r[k] for k in PER_SEED_KEYS if k in r}}
                       for s, r in zip(seeds, results)}
    return out


def column_spread(results: Mapping, column: str) -> dict | None:
    """{mean, std, n} of one table column (`Avg` or a category) of an aggregated results.json;
    None for a one-seed result."""
    found = results.get("spread")
    if not isinstance(found, Mapping):
        return None
    return found.get("Avg") if column == "Avg" else (found.get("categories") or {}).get(column)


def standard_error(std_a: float | None, n_a: int, std_b: float | None, n_b: int) -> float | None:
    """The standard error of mean_a − mean_b over independent seeds: sqrt(s_a²/n_a + s_b²/n_b);
    None when either side has fewer than two seeds (no sample standard deviation)."""
    if n_a < 2 or n_b < 2 or std_a is None or std_b is None:
        return None
    return math.sqrt(std_a ** 2 / n_a + std_b ** 2 / n_b)


def within_noise(delta: float, se: float | None) -> bool:
    """|delta| < 2·SE; never with no SE (one seed)."""
    return se is not None and abs(delta) < NOISE_SE * se


def seeds_of(cfg) -> list[int]:
    """The seeds a run trains each row with: `seed`, `seed` + 1, ... (`seeds` of them, default 1)."""
    count = cfg.get("seeds", 1)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"seeds: expected a whole number >= 1 (how many times every row runs, with "
                         f"seed, seed + 1, ...), got {count!r} (conf/train.yaml or the command line)")
    seed = cfg.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: expected a whole number, got {seed!r}")
    return [seed + k for k in range(count)]
