"""The fidelity table's format: `experiments/<paper>/fidelity.yaml`, read and shown.

One reader for both users of the file: the check against the composed `scale=paper` configs
(embedkit/recipes/fidelity.py, which documents the entries) and RESULTS.md's section
(embedkit/reporting/report.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

TABLE = "fidelity.yaml"
FIELDS = {"setting", "where", "key", "paper", "ours", "source", "deviation", "skip_missing"}
SECTION_START = "<!-- fidelity table: generated from fidelity.yaml; do not edit -->"
SECTION_END = "<!-- end of fidelity table -->"


class FidelityTableError(ValueError):
    """A fidelity.yaml entry that cannot be checked: names the file and the entry."""


@dataclass
class Setting:
    setting: str
    key: str
    paper: Any
    source: str
    experiments: list[str]
    rows: list[str] | None = None
    stages: list[str] | None = None
    ours: Any = None
    deviation: str | None = None
    skip_missing: bool = False
    where: str = ""               # file:entry, for messages
    has_ours: bool = field(default=False, repr=False)

    @property
    def expected(self) -> Any:
        return self.ours if self.has_ours else self.paper


def load(path: Path) -> list[Setting]:
    """The entries of one fidelity.yaml, validated."""
    path = Path(path)
    entries = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    entries = entries.get("settings") if isinstance(entries, dict) else entries
    if not isinstance(entries, list):
        raise FidelityTableError(f"{path}: expected a list of settings under `settings:`")
    out = []
    for i, e in enumerate(entries):
        where = f"{path.name} entry {i + 1}"
        if not isinstance(e, dict):
            raise FidelityTableError(f"{where}: expected a mapping, got {e!r}")
        name = e.get("setting", "?")
        where = f"{path.name} entry {i + 1} ({name!r})"
        unknown = set(e) - FIELDS
        if unknown:
            raise FidelityTableError(f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(FIELDS)}")
        for required in ("setting", "where", "key", "paper", "source"):
            if required not in e:
                raise FidelityTableError(f"{where}: missing `{required}`")
        if ("ours" in e) != bool(e.get("deviation")):
            raise FidelityTableError(f"{where}: a deviation gives both `ours` (the value we use) and "
                                     f"`deviation` (why)")
        sel = e["where"] or {}
        if not sel.get("experiments"):
            raise FidelityTableError(f"{where}: `where.experiments` lists no experiment")
        out.append(Setting(setting=e["setting"], key=e["key"], paper=e["paper"], source=e["source"],
                           experiments=list(sel["experiments"]), rows=sel.get("rows"),
                           stages=sel.get("stages"), ours=e.get("ours"), deviation=e.get("deviation"),
                           skip_missing=bool(e.get("skip_missing", False)), where=where,
                           has_ours="ours" in e))
    return out



# ---------------------------------------------------------------- RESULTS.md's section

def _cell(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return ", ".join(_cell(v) for v in value)
    return str(value).replace("|", "\\|").replace("${paths.paper_data_dir}", "<paper data>")


def section(paper_dir: Path) -> str | None:
    """The paper's fidelity table (experiments/<paper>/fidelity.yaml) as markdown, or None."""
    path = Path(paper_dir) / TABLE
    if not path.is_file():
        return None
    lines = [SECTION_START, "## Paper-scale fidelity", "",
             f"What `scale=paper` resolves to, setting by setting, against the paper or the official code "
             f"(`{TABLE}`; checked by `python -m embedkit.recipes.fidelity` and tests/test_fidelity.py). "
             "A value in the last column is a stated deviation.", "",
             "| setting | experiments (rows / stages) | config key | paper / official | source | ours, and why |",
             "| --- | --- | --- | --- | --- | --- |"]
    for s in load(path):
        scope = ", ".join(s.experiments)
        narrow = [*(f"row {r}" for r in s.rows or []), *(f"stage {st}" for st in s.stages or [])]
        if narrow:
            scope += " (" + "; ".join(narrow) + ")"
        ours = f"{_cell(s.ours)}: {s.deviation}" if s.has_ours else ""
        lines.append(f"| {_cell(s.setting)} | {scope} | `{s.key}` | {_cell(s.paper)} | {_cell(s.source)} | {ours} |")
    return "\n".join(lines + ["", SECTION_END])


def with_section(text: str, table: str | None) -> str:
    """`text` (a RESULTS.md) with its fidelity section replaced, or appended when it has none."""
    if table is None:
        return text
    if SECTION_START in text and SECTION_END in text:
        head, rest = text.split(SECTION_START, 1)
        tail = rest.split(SECTION_END, 1)[1]
        return head + table + tail
    return text.rstrip("\n") + "\n\n" + table + "\n"
