"""Paper findings as data: each compares two rows of a run (or a series of rows) in one column, and
agrees with the paper when the mini run's difference has the sign of the paper's.

An experiment lists them under `report.findings` (conf/experiment/*.yaml):

    findings:
      # ours = score(rows[0]) − score(rows[1]); paper: the same difference in the paper's table
      - claim: "RetroMAE pre-training helps: {column} {rows[0]} − {rows[1]}"
        rows: [BGE-pretrain, BGE w.o. pre-train]
        column: Avg
        paper: table
        source: "C-Pack Table 3"
      # one finding per column; first / last: the ends of the series (labels matching the regex,
      # ordered by the number its group captures)
      - claim: "{column}: batch {paper_rows[1]} → {paper_rows[0]} (ours {rows[1]} → {rows[0]})"
        series: '^([\\d,]+)'
        rows: [last, first]
        columns: [Retrieval, STS, PairCLF, CLF, Rerank, Cluster, Avg]
        paper: table
        source: "C-Pack Table 4"
      # paper: cells of the paper's table, when its rows and columns are not ours (a paper table
      # with a row per model and a column per retrieval mode): cell [A, a] − cell [B, b]
      - {id: sparse, claim: "self-distillation helps sparse retrieval", rows: [self-distill sparse,
         no self-distill sparse], column: Retrieval, paper: {cells: [[M3-w.skd, Sparse], [M3-w.o.skd, Sparse]]},
         source: "BGE-M3 Table 6"}
      # the paper states only a direction; "Conan*": the first row whose label matches
      - {claim: "Conan beats Vanilla on {column}", rows: ["Conan*", Vanilla], columns: [Retrieval, Rerank],
         direction: up, source: "..."}
      # ours = the smallest step between neighbouring rows of the series (reduce: min or max)
      - {claim: "...", series: 'dim=(\\d+)', rows: neighbours, reduce: min, direction: up, source: "..."}
      # ours = finding `of`'s difference − the largest of `over`'s (findings named by `id`);
      # paper: table = the same margin of their paper deltas (or a `direction`, or a number)
      - {claim: "...", margin: {of: sparse, over: [dense, multivec]}, paper: table, source: "..."}

Keys: `claim` and `source` (text; the claim is a format string with {column}, {rows[i]} (our labels),
{paper_rows[i]} and {values[i]} (what the series regex captured)); `rows` or `margin`; `column`
(default Avg) or `columns`; `paper` (`table`: the paper rows our rows were run for, i.e. their
results.json `paper_row`, else the same label, else the paper table's first / last row for
first / last, in our column; `{rows: [A, B]}`: these paper rows, in our column; `{cells: [[A, a],
[B, b]]}`: paper Δ = cell (row A, column a) − cell (row B, column b), whatever our column; a number:
the paper's difference; on a margin, `table`: the margin of the paper deltas of the findings it
names) or `direction` (up / down); `series`, `reduce`, `id`. A finding whose paper rows or cells
are not in the paper table (or are empty cells), or whose series has fewer than two rows, or whose
margin lacks a difference, is left out; one whose own rows are missing shows as
`n/a (row missing)`.

Seeds (`seeds=N`, embedkit/reporting/seeds.py): a row's scores are means over its seeds, and a
finding carries the standard error of its mini delta, `se` = sqrt(s_a²/n_a + s_b²/n_b) (for a margin,
the errors of the two deltas it subtracts, added in quadrature; for `rows: neighbours`, the chosen
step's). `verdict` is the sign comparison alone (yes / no); `outcome` is the finding's call:
"within noise" when |Δ| < 2·SE, else "agrees" or "disagrees" by the sign. With one seed there is no
SE: the call is the sign's, marked "(1 seed)" so that it does not pass for a tested one.
"""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass

from embedkit.reporting.seeds import standard_error, within_noise

# A move smaller than this (score points, x100) counts as no move: mteb rounds main scores to 1e-5.
TIE = 0.005
DEFAULT_COLUMN = "Avg"
KEYS = {"id", "claim", "source", "rows", "column", "columns", "paper", "direction", "series", "reduce", "margin"}
SERIES_ENDS = ("first", "last")
NEIGHBOURS = "neighbours"
REDUCERS = {"min": min, "max": max}


@dataclass
class Finding:
    claim: str           # the paper's finding, in words
    source: str          # where the paper states it
    paper: float | str   # the paper's delta (points), or its stated direction ("up") without numbers
    ours: float | None   # our delta in points; None = a row is missing
    se: float | None = None   # standard error of `ours` over the seeds; None with one seed
    seeds: int = 1            # the fewest seeds behind either side of `ours`

    @property
    def paper_sign(self) -> int:
        if isinstance(self.paper, str):
            return {"up": 1, "down": -1}[self.paper]
        return _sign(self.paper)

    @property
    def verdict(self) -> str:
        if self.ours is None or (isinstance(self.ours, float) and math.isnan(self.ours)):
            return "n/a (row missing)"
        if _sign(self.ours) == 0:
            return "no (no change)"
        return "yes" if _sign(self.ours) == self.paper_sign else "no"

    @property
    def outcome(self) -> str:
        """agrees / disagrees / within noise; with one seed, the sign's call marked "(1 seed)"."""
        if self.ours is None or (isinstance(self.ours, float) and math.isnan(self.ours)):
            return "n/a (row missing)"
        tested = self.se is not None and self.seeds > 1
        if tested and within_noise(self.ours, self.se):
            return "within noise"
        call = "disagrees (no change" if _sign(self.ours) == 0 else \
            ("agrees" if _sign(self.ours) == self.paper_sign else "disagrees")
        if tested:
            return call + (")" if call.endswith("change") else "")
        return call + (", 1 seed)" if call.endswith("change") else " (1 seed)")

    @property
    def noise(self) -> float | None:
        """2·SE: the smallest |Δ| that is not within noise; None with one seed."""
        return None if self.se is None else 2 * self.se


def _sign(x: float) -> int:
    return 0 if abs(x) < TIE else (1 if x > 0 else -1)


# ---------------------------------------------------------------- the schema

class ExperimentConfigError(ValueError):
    """An experiment's `report:` node does not follow the schema (embedkit/reporting/experiments.py)."""


def validate(spec, where: str) -> None:
    """Raise ValueError (ExperimentConfigError) naming `where` if `spec` is not a finding."""

    def bad(why: str):
        raise ExperimentConfigError(f"{where}: {why} (in {spec!r})")

    if not isinstance(spec, dict):
        bad("a finding is a mapping")
    if set(spec) - KEYS:
        bad(f"unknown key(s) {sorted(set(spec) - KEYS)}; allowed: {sorted(KEYS)}")
    for key in ("claim", "source"):
        if not isinstance(spec.get(key), str) or not spec[key]:
            bad(f"`{key}` (text) is required")
    if ("paper" in spec) == ("direction" in spec):
        bad("give exactly one of `paper` (table, {rows: [A, B]} or a number) and `direction` (up / down)")
    if "direction" in spec and spec["direction"] not in ("up", "down"):
        bad("`direction` is up or down")
    paper = spec.get("paper")
    if "paper" in spec and not (paper == "table" or _number(paper) or _paper_rows(paper) or _paper_cells(paper)):
        bad("`paper` is `table`, {rows: [A, B]} (paper-table rows), {cells: [[row, column], [row, column]]} "
            "(paper-table cells) or a number")
    if ("rows" in spec) == ("margin" in spec):
        bad("give exactly one of `rows` ([A, B] or neighbours) and `margin` ({of: ID, over: [IDs]})")
    if "column" in spec and "columns" in spec:
        bad("give `column` or `columns`, not both")
    if "columns" in spec and (not isinstance(spec["columns"], list) or not spec["columns"]):
        bad("`columns` is a non-empty list")
    if "margin" in spec:
        margin = spec["margin"]
        if not (isinstance(margin, dict) and set(margin) == {"of", "over"} and isinstance(margin["over"], list)
                and margin["over"]):
            bad("`margin` is {of: ID, over: [ID, ...]}")
        if isinstance(paper, dict) and "paper" in spec:
            bad("a margin compares findings: its paper side is `table` (the margin of their paper deltas), "
                "a number or a `direction`")
    if "rows" in spec and spec["rows"] != NEIGHBOURS and not _pair(spec["rows"]):
        bad("`rows` is [A, B] (labels, label patterns such as \"Row*\", first, last) or neighbours")
    if spec.get("rows") == NEIGHBOURS and isinstance(paper, (str, dict)) and "paper" in spec:
        bad("`rows: neighbours` compares our rows only: its paper side is a `direction` or a number")
    if "reduce" in spec and (spec.get("rows") != NEIGHBOURS or spec["reduce"] not in REDUCERS):
        bad(f"`reduce` ({' / '.join(REDUCERS)}) goes with `rows: neighbours`")
    if "series" in spec:
        try:
            if re.compile(spec["series"]).groups < 1:
                bad("`series` is a regex with a group that captures the row's number")
        except (re.error, TypeError) as err:
            bad(f"`series` is not a regex ({err})")
    if "id" in spec and "columns" in spec:
        bad("a finding with an `id` has one `column`")


def _pair(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _paper_rows(paper) -> bool:
    return isinstance(paper, dict) and set(paper) == {"rows"} and _pair(paper["rows"])


def _paper_cells(paper) -> bool:
    return (isinstance(paper, dict) and set(paper) == {"cells"} and isinstance(paper["cells"], list)
            and len(paper["cells"]) == 2 and all(_pair(cell) for cell in paper["cells"]))


# ---------------------------------------------------------------- evaluating

def evaluate(specs: list[dict], run, paper_rows: list[dict]) -> list[Finding]:
    """The findings of `specs` on `run` (its `rows`: {table label: {column: score}}, `results`:
    {row label: results.json}) against `paper_rows` (the paper table, [{label, column: score}])."""
    out, by_id = [], {}
    for spec in specs:
        if "margin" in spec:
            found = _margin(spec, by_id)
            if found is not None:
                out.append(found)
            continue
        for column in spec.get("columns") or [spec.get("column", DEFAULT_COLUMN)]:
            found = _compare(spec, column, run, paper_rows)
            if found is not None:
                out.append(found)
                if "id" in spec:
                    by_id[spec["id"]] = found
    return out


def _score(run, label: str, column: str) -> float | None:
    value = run.rows.get(label, {}).get(column)
    return None if value is None else float(value)


def _spread(run, label: str, column: str) -> tuple[float | None, int]:
    """(sample std, seeds) of a row's column; one seed for a row without a spread."""
    row = run.rows.get(label, {})
    n = (row.get("n") or {}).get(column)
    if n is None:
        n = 0 if row.get(column) is None else 1
    return (row.get("std") or {}).get(column), int(n)


def _error(run, a: str, b: str, column: str) -> tuple[float | None, int]:
    """(SE of score(a) − score(b), the fewer seeds of the two)."""
    (std_a, n_a), (std_b, n_b) = _spread(run, a, column), _spread(run, b, column)
    return standard_error(std_a, n_a, std_b, n_b), min(n_a, n_b)


def _delta(a, b):
    return None if a is None or b is None else a - b


def _series(spec, run) -> list[tuple[str, str]]:
    """[(label, value)]: every row in table order, or those matching `series`, ordered by its number."""
    if "series" not in spec:
        return [(label, label) for label in run.rows]
    pattern, found = re.compile(spec["series"]), []
    for label in run.rows:
        match = pattern.search(label)
        if match:
            try:
                number = float(match.group(1).replace(",", ""))
            except ValueError:
                continue
            found.append((number, label, match.group(1)))
    return [(label, value) for _, label, value in sorted(found, key=lambda t: t[0])]


def _pick(selector: str, run, series) -> tuple[str, str] | None:
    """(table label, series value) of a row selector; None when first / last have no series."""
    if selector in SERIES_ENDS:
        if len(series) < 2:
            return None
        return series[0] if selector == "first" else series[-1]
    if selector not in run.rows and any(ch in selector for ch in "*?["):
        selector = next((label for label in run.rows if fnmatch.fnmatchcase(label, selector)), selector)
    return selector, dict(series).get(selector, selector)


def _paper_row(run, selector: str, label: str, paper_rows: list[dict]) -> str:
    """The paper row a row of ours was run for."""
    declared = (run.results.get(label) or {}).get("paper_row")
    if declared:
        return declared
    if selector in SERIES_ENDS and paper_rows:
        return paper_rows[0 if selector == "first" else -1]["label"]
    return label


def _paper_side(spec) -> float | str:
    return spec["direction"] if "direction" in spec else float(spec["paper"])


def _compare(spec, column: str, run, paper_rows: list[dict]) -> Finding | None:
    series = _series(spec, run)
    if spec["rows"] == NEIGHBOURS:
        if len(series) < 2:
            return None
        pairs = list(zip(series, series[1:]))
        steps = [_delta(_score(run, b, column), _score(run, a, column)) for (a, _), (b, _) in pairs]
        if any(s is None for s in steps):
            return None
        claim = spec["claim"].format(column=column, rows=[series[-1][0], series[0][0]],
                                     values=[series[-1][1], series[0][1]], paper_rows=[])
        pick = REDUCERS[spec.get("reduce", "min")](range(len(steps)), key=steps.__getitem__)
        (a, _), (b, _) = pairs[pick]
        se, seeds = _error(run, b, a, column)
        return Finding(claim, spec["source"], _paper_side(spec), steps[pick], se, seeds)
    picked = [_pick(s, run, series) for s in spec["rows"]]
    if any(p is None for p in picked):
        return None
    (a, value_a), (b, value_b) = picked
    paper = spec.get("paper")
    if paper == "table" or isinstance(paper, dict):
        by_paper = {r["label"]: r for r in paper_rows}
        if isinstance(paper, dict) and "cells" in paper:
            (pa, column_a), (pb, column_b) = paper["cells"]
        else:
            pa, pb = paper["rows"] if isinstance(paper, dict) else \
                [_paper_row(run, s, label, paper_rows) for s, label in zip(spec["rows"], (a, b))]
            column_a = column_b = column
        cell_a, cell_b = by_paper.get(pa, {}).get(column_a), by_paper.get(pb, {}).get(column_b)
        if cell_a is None or cell_b is None:
            return None   # the paper's table (or these rows, columns or cells of it) is not at hand
        paper_delta: float | str = cell_a - cell_b
    else:
        pa, pb = a, b
        paper_delta = _paper_side(spec)
    claim = spec["claim"].format(column=column, rows=[a, b], paper_rows=[pa, pb], values=[value_a, value_b])
    se, seeds = _error(run, a, b, column)
    return Finding(claim, spec["source"], paper_delta, _delta(_score(run, a, column), _score(run, b, column)),
                   se, seeds)


def _margin(spec, by_id: dict[str, Finding]) -> Finding | None:
    margin = spec["margin"]
    found = [by_id.get(i) for i in [margin["of"], *margin["over"]]]
    if any(f is None or f.ours is None for f in found):
        return None
    if spec.get("paper") == "table":
        if any(isinstance(f.paper, str) for f in found):
            return None   # a named finding has only a direction on the paper's side
        paper: float | str = found[0].paper - max(f.paper for f in found[1:])
    else:
        paper = _paper_side(spec)
    claim = spec["claim"].format(of=margin["of"], over=margin["over"])
    top = max(found[1:], key=lambda f: f.ours)
    # The two deltas' errors in quadrature, as if independent: an approximation where they are
    # variants of the same rows (M3's modes share each seed's models).
    se = None if found[0].se is None or top.se is None else (found[0].se ** 2 + top.se ** 2) ** 0.5
    return Finding(claim, spec["source"], paper, found[0].ours - top.ours, se, min(found[0].seeds, top.seeds))
