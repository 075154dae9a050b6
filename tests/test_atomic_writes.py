"""results.json and the result tables are written whole or not at all, and a damaged results.json costs
the sweep table one row, not the whole aggregate."""

import builtins
import io
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from embedkit.redact import write_json
from embedkit.reporting.sweep import SweepTable, aggregate, collect
from embedkit.reporting.tables import write_table


class _DiesMidWrite:
    """A file whose first write puts half the text on disk, then the process 'dies'."""

    def __init__(self, fh):
        self._fh = fh

    def write(self, text):
        self._fh.write(text[: len(text) // 2])
        self._fh.flush()
        raise KeyboardInterrupt("killed mid-write")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._fh.close()

    def __getattr__(self, name):
        return getattr(self._fh, name)


def _kill_writes_of(monkeypatch, name: str) -> None:
    """Every open-for-writing of a file whose name contains `name` dies half way (pathlib's
    write_text opens through io.open, plain code through builtins.open: both are patched)."""
    real_open = io.open

    def dying_open(file, mode="r", *args, **kwargs):
        fh = real_open(file, mode, *args, **kwargs)
        return _DiesMidWrite(fh) if "w" in mode and name in Path(file).name else fh

    monkeypatch.setattr(io, "open", dying_open)
    monkeypatch.setattr(builtins, "open", dying_open)


def test_a_kill_while_writing_results_json_leaves_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    write_json(path, {"label": "a", "Avg": 1.0, "tasks": {"STSB": 1.0}})
    _kill_writes_of(monkeypatch, "results.json")
    with pytest.raises(KeyboardInterrupt):
        write_json(path, {"label": "a", "Avg": 2.0, "tasks": {"STSB": 2.0, "AFQMC": 2.0}})
    monkeypatch.undo()
    assert json.loads(path.read_text(encoding="utf-8"))["Avg"] == 1.0
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]   # no temp file left over
    write_json(path, {"label": "a", "Avg": 3.0})
    assert json.loads(path.read_text(encoding="utf-8")) == {"label": "a", "Avg": 3.0}


def test_a_kill_while_writing_a_table_leaves_the_previous_file(tmp_path, monkeypatch):
    write_table([{"label": "32", "STS": 50.0, "Avg": 50.0}], tmp_path, first="batch")
    before = (tmp_path / "table.csv").read_text(encoding="utf-8")
    _kill_writes_of(monkeypatch, "table.csv")
    with pytest.raises(KeyboardInterrupt):
        write_table([{"label": "32", "STS": 60.0, "Avg": 60.0}, {"label": "128", "Avg": 61.0}], tmp_path,
                    first="batch")
    monkeypatch.undo()
    assert (tmp_path / "table.csv").read_text(encoding="utf-8") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.csv", "table.json", "table.md"]


def _job(sweep: Path, num: int, overrides: list[str], results: bytes | None):
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if results is not None:
        (job / "results.json").write_bytes(results)


def test_an_unreadable_results_json_is_a_failed_row_and_the_others_are_kept(tmp_path):
    ok = json.dumps({"label": "a", "categories": {"STS": 60.0}, "Avg": 60.0}).encode()
    _job(tmp_path, 0, ["data.batch_size=16"], ok)
    _job(tmp_path, 1, ["data.batch_size=32"], b'{"label": "b", "categories": {"ST')   # killed mid-write
    _job(tmp_path, 2, ["data.batch_size=64"], b'{"label": "\xff"}')                  # not UTF-8
    _job(tmp_path, 3, ["data.batch_size=128"], b"[1, 2]")                              # not an object
    _job(tmp_path, 4, ["data.batch_size=256"], ok)
    rows = {r["label"]: r for r in collect(tmp_path)}
    assert rows["data.batch_size=16"]["Avg"] == rows["data.batch_size=256"]["Avg"] == 60.0
    assert rows["data.batch_size=32"]["error"].startswith("unreadable results.json: 1/results.json (")
    assert rows["data.batch_size=64"]["error"].startswith("unreadable results.json: 2/results.json (")
    assert "expected a JSON object, got list" in rows["data.batch_size=128"]["error"]
    markdown = aggregate(tmp_path)
    assert "| data.batch_size=256 | – | 60.00 |" in markdown and "unreadable results.json: 1/results.json" in markdown
    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    with pytest.raises(SystemExit, match=r"3 sweep job\(s\) failed: data.batch_size=32, data.batch_size=64, "
                                         r"data.batch_size=128"):
        SweepTable().on_multirun_end(cfg)
