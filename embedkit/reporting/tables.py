"""Result tables in C-MTEB's layout: one row per run, the six categories and the overall average.

A table is written as Markdown (to read) and CSV (for notebooks), and printed beside the paper's
table it reproduces, which lives as data under `experiments/`. A paper's table keeps the paper's
own columns (C-MTEB's for C-Pack and Conan, the retrieval modes for BGE-M3's MIRACL table): every
column after the first is a score, except the text columns in NOTE_COLUMNS; an empty cell is a
number the sources at hand do not give.

A mini run's table ends with the lexical floor's row (`floor_row`, embedkit/eval/lexical.py): in
table.md and table.json, where that row alone carries the key FLOOR_KEY (its per-task scores, the
floor's settings and cache key), but not in table.csv, whose rows are the runs that notebooks plot.

A row run with several seeds (`seeds=N`, embedkit/reporting/seeds.py) holds the means in its
columns and adds `seeds` (the list), `std` and `n` ({column: value}) and `per_seed` ({seed: {column:
score}}) in table.json; table.md and the printed table show such a cell as "mean ± std", table.csv
adds a `<column> std` column per score and `seeds`. The lexical floor is deterministic: one plain
value per cell.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Sequence

from embedkit import runs
from embedkit.atomic_files import write_text_atomic
from embedkit.reporting.seeds import column_spread

COLUMNS = ["Retrieval", "STS", "PairCLF", "CLF", "Rerank", "Cluster", "Avg"]
# C-Pack's tables spell the re-ranking column "Re-rank"; the data files use ours.
NOTE_COLUMNS = ("source",)   # a paper table's text columns: where a row's numbers come from
FLOOR_KEY = runs.FLOOR_KEY  # table.json: the floor row's {tasks, settings, key}; no other row has it


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.2f}" if isinstance(value, (int, float)) else str(value)


def row_from_results(label: str, results: dict) -> dict:
    """One table row from a run's results.json content (a failed run keeps its error)."""
    row = {"label": label}
    if "error" in results:
        row["error"] = results["error"]
        return row
    categories = results.get("categories", {})
    for col in COLUMNS[:-1]:
        row[col] = categories.get(col)
    row["Avg"] = results.get("Avg")
    if results.get("seeds") and len(results["seeds"]) > 1:
        spreads = {col: column_spread(results, col) or {} for col in COLUMNS}
        row["seeds"] = list(results["seeds"])
        row["std"] = {col: s.get("std") for col, s in spreads.items()}
        row["n"] = {col: s.get("n", 0) for col, s in spreads.items()}
        row["per_seed"] = {seed: {"Avg": one.get("Avg"),
                                  **{col: (one.get("categories") or {}).get(col) for col in COLUMNS[:-1]}}
                           for seed, one in (results.get("per_seed") or {}).items()}
    return row


def seed_count(rows: Sequence[dict]) -> int:
    """The most seeds any row of a table was run with (1 for a table of one-seed rows)."""
    return max((len(r.get("seeds") or ()) for r in rows), default=0) or 1


def cell(row: dict, column: str) -> str:
    """A table cell: the score, or "mean ± std" for a column scored over several seeds."""
    std, n = (row.get("std") or {}).get(column), (row.get("n") or {}).get(column, 1)
    if n > 1 and std is not None and row.get(column) is not None:
        return f"{_fmt(row[column])} ± {_fmt(std)}"
    return _fmt(row.get(column))


def floor_row(results: dict) -> dict:
    """The lexical floor's table row from its results (`suite.floor()`)."""
    floor = results.get(FLOOR_KEY) or {}
    row = row_from_results(floor.get("label", "lexical floor"), results)
    row[FLOOR_KEY] = {"tasks": results.get("tasks", {}), "settings": floor.get("settings"),
                      "key": floor.get("key")}
    return row


def is_floor(row: dict) -> bool:
    return FLOOR_KEY in row


def to_markdown(rows: Sequence[dict], first: str, columns: Sequence[str] = COLUMNS) -> str:
    has_error = any("error" in r for r in rows)
    header = [first, *columns] + (["error"] if has_error else [])
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    for r in rows:
        cells = [str(r["label"])] + [cell(r, c) for c in columns]
        if has_error:
            cells.append(str(r.get("error", "")).replace("|", "/").replace("\n", " ")[:160])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def to_csv(rows: Sequence[dict], first: str) -> str:
    buf = io.StringIO()
    has_error = any("error" in r for r in rows)
    # Columns of the seed spread only when some row has one: a one-seed table keeps its columns.
    seeded = seed_count(rows) > 1
    writer = csv.writer(buf)
    writer.writerow([first, *COLUMNS] + ([f"{c} std" for c in COLUMNS] + ["seeds"] if seeded else [])
                    + (["error"] if has_error else []))
    number = lambda v: "" if v is None else f"{v:.4f}"   # noqa: E731
    for r in rows:
        values = [r["label"]] + [number(r.get(c)) for c in COLUMNS]
        if seeded:
            values += [number((r.get("std") or {}).get(c)) for c in COLUMNS] + [len(r.get("seeds") or ()) or 1]
        writer.writerow(values + ([r.get("error", "")] if has_error else []))
    return buf.getvalue()


def read_paper_table(path: str | Path) -> tuple[str, list[dict]]:
    """A reference table as (first column name, rows): each row {label, column: score or None (an
    empty cell)} over the file's score columns, in the file's order (paper_columns)."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or len(reader.fieldnames) < 2:
            raise ValueError(f"{path}: a paper table has a label column and at least one score column")
        first = reader.fieldnames[0]
        scores = [c for c in reader.fieldnames[1:] if c not in NOTE_COLUMNS]
        rows = []
        for r in reader:
            row = {"label": r[first]}
            for c in scores:
                cell = (r.get(c) or "").strip()
                try:
                    row[c] = float(cell) if cell else None
                except ValueError:
                    raise ValueError(f"{path}: row {r[first]!r}, column {c!r}: {cell!r} is not a number "
                                     f"(text belongs in a {' / '.join(NOTE_COLUMNS)} column)") from None
            rows.append(row)
    return first, rows


def paper_columns(rows: Sequence[dict]) -> list[str]:
    """The score columns of a paper table's rows (read_paper_table), in the file's order."""
    return [c for c in (rows[0] if rows else {}) if c != "label"]


def write_table(rows: Sequence[dict], out_dir: str | Path, first: str, stem: str = runs.TABLE) -> str:
    """`<stem>.md`, `.csv` and `.json` in `out_dir`, each written atomically: a kill mid-write
    leaves that file as it was (embedkit/atomic_files.py). Returns the Markdown."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    markdown = to_markdown(rows, first)
    write_text_atomic(runs.table_file(out, "md", stem), markdown + "\n")
    write_text_atomic(runs.table_file(out, "csv", stem), to_csv([r for r in rows if not is_floor(r)], first))
    write_text_atomic(runs.table_file(out, "json", stem), json.dumps(list(rows), indent=2, ensure_ascii=False))
    return markdown


def side_by_side(ours: str, ours_title: str, paper_path: str | Path | None, paper_title: str) -> str:
    """Our table, then the paper's, as one printable block."""
    parts = [f"## {ours_title}", "", ours]
    if paper_path:
        first, paper_rows = read_paper_table(paper_path)
        parts += ["", f"## {paper_title}", "", to_markdown(paper_rows, first, paper_columns(paper_rows))]
    return "\n".join(parts)
