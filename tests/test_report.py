"""The RESULTS.md generator (embedkit/reporting/report.py) on run folders written in the recipe's
format: verdicts follow the numbers, the newest run wins, the setup comes from the run's files. The
findings are the ones the experiment configs declare (conf/experiment/*.yaml, `report.findings`)."""

import csv
import json
import os
import time
from pathlib import Path

import pytest
from helpers import scores as _scores, write_run

from embedkit.reporting import report
from embedkit.reporting.tables import COLUMNS

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def declared():
    """{name: Experiment} as conf/experiment/*.yaml declare them (Hydra's compose API)."""
    from embedkit.reporting import experiments

    return {e.name: e for e in experiments.load()}


def _paper(name):
    with open(REPO / "experiments" / "bge" / name, newline="", encoding="utf-8") as f:
        return {r[next(iter(r))]: {c: float(r[c]) for c in COLUMNS} for r in csv.DictReader(f)}


def test_batch_size_verdicts_follow_the_numbers(tmp_path, declared):
    run = write_run(tmp_path / "logs" / "reproduce" / "bge_ablation_batchsize", {
        "32": _scores(Retrieval=20.0, PairCLF=50.0, CLF=10.0, Avg=35.0),
        "128": _scores(Retrieval=21.0, PairCLF=51.0, CLF=10.0, Avg=35.5),
        "512": _scores(Retrieval=22.5, PairCLF=52.0, CLF=10.0, Avg=35.2),
    }, paper_rows={"32": "256", "128": "2,048", "512": "19,200"})
    paper = _paper("cpack_table4.csv")
    found = {f.claim.split(":")[0]: f for f in report.findings(
        declared["bge_ablation_batchsize"], report.load_run(run, "bge_ablation_batchsize"), report.read_paper_table(
            REPO / "experiments" / "bge" / "cpack_table4.csv")[1])}
    # independent: the paper's largest minus smallest batch, from the CSV
    assert abs(found["Retrieval"].paper - (paper["19,200"]["Retrieval"] - paper["256"]["Retrieval"])) < 1e-9
    assert found["Retrieval"].ours == 2.5 and found["Retrieval"].verdict == "yes"      # up, paper up (+6.65)
    assert found["PairCLF"].verdict == "no"                                            # up, paper down (-0.35)
    assert found["CLF"].verdict == "no (no change)"                                    # 10.0 → 10.0
    assert abs(found["Avg"].ours - 0.2) < 1e-9 and found["Avg"].verdict == "yes"       # smallest → largest batch


def test_recipe_findings_compare_row_differences(tmp_path, declared):
    rows = {"BGE-pretrain": _scores(Avg=36.0), "BGE w.o. pre-train": _scores(Avg=37.0),
            "BGE w.o. Instruct": _scores(Avg=38.0), "BGE-finetune": _scores(Avg=38.5)}
    run = write_run(tmp_path / "run", rows, stages={"general": 69})
    paper = report.read_paper_table(REPO / "experiments" / "bge" / "cpack_table3.csv")[1]
    findings = report.findings(declared["bge_ablation_recipe"], report.load_run(run, "bge_ablation_recipe"), paper)
    assert [(round(f.paper, 2), f.ours, f.verdict) for f in findings] == [
        (0.38, -1.0, "no"),   # pre-training: paper 59.00 - 58.62
        (4.40, 2.0, "yes"),   # task fine-tuning: paper 63.40 - 59.00
        (0.56, 0.5, "yes"),   # instruction: paper 63.96 - 63.40
    ]


def _m3_rows(gains: dict[str, float]) -> dict[str, dict]:
    """Mini M3 rows: every mode's Retrieval at 20 without self-distillation, 20 + gain with it."""
    rows = {}
    for mode in ("", "sparse", "multivec", "dense+sparse", "all"):
        rows[f"self-distill {mode}".strip()] = _scores(Retrieval=20.0 + gains.get(mode or "dense", 0.0))
        rows[f"no self-distill {mode}".strip()] = _scores(Retrieval=20.0)
    return rows


def test_m3_findings_compare_with_table6_cells_per_mode(tmp_path, declared):
    # hybrids gain too, but Table 6 does not ablate them: no finding may use them
    rows = _m3_rows({"dense": 1.0, "sparse": 4.0, "multivec": -0.5, "dense+sparse": 9.0, "all": 9.0})
    run = report.load_run(write_run(tmp_path / "m3", rows), "m3_ablation_selfdistill")
    paper = report.read_paper_table(REPO / "experiments" / "m3" / "m3_table6.csv")[1]
    found = report.findings(declared["m3_ablation_selfdistill"], run, paper)
    # independent: Table 6 by hand (MIRACL nDCG@10, M3-w.skd − M3-w.o.skd): Dense 67.8 − 67.2,
    # Sparse 53.9 − 36.7, Multi-vec 69.0 − 67.8; the margin 17.2 − max(0.6, 1.2)
    assert [round(f.paper, 6) for f in found] == [0.6, 17.2, 1.2, 16.0]
    assert [f.ours for f in found] == [1.0, 4.0, -0.5, 4.0 - 1.0]
    assert [f.verdict for f in found] == ["yes", "yes", "no", "yes"]   # multi-vec: ours down, paper up
    assert not [f.claim for f in found if "dense+sparse" in f.claim or " all" in f.claim]
    # the same run without the paper's table: nothing to compare with, nothing reported
    assert report.findings(declared["m3_ablation_selfdistill"], run, []) == []


def test_m3_sparse_margin_disagrees_when_another_mode_gains_more(tmp_path, declared):
    run = report.load_run(write_run(tmp_path / "m3", _m3_rows({"dense": 2.0, "sparse": 1.5, "multivec": 0.5})),
                          "m3_ablation_selfdistill")
    paper = report.read_paper_table(REPO / "experiments" / "m3" / "m3_table6.csv")[1]
    margin = report.findings(declared["m3_ablation_selfdistill"], run, paper)[-1]
    assert margin.claim.startswith("sparse gains the most")
    assert margin.ours == pytest.approx(1.5 - 2.0) and margin.paper == pytest.approx(16.0)
    assert margin.verdict == "no"


def test_conan_and_mrl_findings_use_the_stated_direction(tmp_path, declared):
    conan = {"Baseline": _scores(), "Vanilla": _scores(Avg=30.0, Retrieval=20.0, Rerank=50.0),
             "+DHNM": _scores(Avg=30.0), "+CBB": _scores(Avg=31.0),
             "Conan dim=128": _scores(Retrieval=19.0, Rerank=51.0)}
    # the committed Table 3 holds only the Conan-Embedding row's numbers: the findings keep the text's direction
    paper = report.read_paper_table(REPO / "experiments" / "conan" / "conan_table3.csv")[1]
    found = report.findings(declared["conan_ablation"],
                            report.load_run(write_run(tmp_path / "conan", conan, stages={"general": 5}),
                                            "conan_ablation"), paper)
    assert [f.verdict for f in found] == ["no (no change)", "yes", "no", "yes"]
    assert all(f.paper == "up" for f in found)

    mrl = {f"dim={d}": _scores(Avg=a, Retrieval=r) for d, a, r in ((32, 30.0, 10.0), (64, 31.0, 9.0), (128, 30.5, 11.0))}
    run = write_run(tmp_path / "mrl", mrl, single=True)
    found = report.findings(declared["mrl_dims"], report.load_run(run, "mrl_dims"), [])
    assert [(f.ours, f.verdict) for f in found] == [(0.5, "yes"), (1.0, "yes"), (-0.5, "no")]


def test_paper_cells_against_a_toy_table(tmp_path):
    """`paper: {cells: ...}` takes any two cells, whatever our column; an empty cell leaves the finding
    out; a margin with `paper: table` takes the margin of its findings' paper deltas."""
    from embedkit.reporting.findings import evaluate

    table = tmp_path / "toy.csv"
    table.write_text("model,X,Y,source\nA,10.0,3.5,text\nB,12.0,,why Y is empty\n")
    first, paper = report.read_paper_table(table)
    assert first == "model" and [r["label"] for r in paper] == ["A", "B"]
    assert paper[1] == {"label": "B", "X": 12.0, "Y": None}       # the source column is no score
    run = report.load_run(write_run(tmp_path / "run", {"a": _scores(Avg=31.0, STS=5.0), "b": _scores(Avg=30.0)}), "t")
    specs = [
        {"id": "x", "claim": "x", "source": "s", "rows": ["a", "b"], "paper": {"cells": [["A", "X"], ["B", "X"]]}},
        {"id": "xy", "claim": "xy", "source": "s", "rows": ["a", "b"], "column": "STS",
         "paper": {"cells": [["A", "Y"], ["B", "X"]]}},
        {"claim": "empty", "source": "s", "rows": ["a", "b"], "paper": {"cells": [["A", "Y"], ["B", "Y"]]}},
        {"claim": "no row", "source": "s", "rows": ["a", "b"], "paper": {"cells": [["C", "X"], ["B", "X"]]}},
        {"claim": "margin", "source": "s", "margin": {"of": "x", "over": ["xy"]}, "paper": "table"},
    ]
    found = {f.claim: f for f in evaluate(specs, run, paper)}
    assert set(found) == {"x", "xy", "margin"}
    # Avg: ours 31 − 30 = +1, paper X: 10 − 12 = −2 → disagree
    assert (found["x"].ours, found["x"].paper, found["x"].verdict) == (1.0, -2.0, "no")
    # STS: ours 5 − 30 = −25, paper A.Y − B.X = 3.5 − 12 = −8.5 → agree
    assert (found["xy"].ours, found["xy"].paper, found["xy"].verdict) == (-25.0, -8.5, "yes")
    # margin: ours 1 − (−25) = 26, paper −2 − (−8.5) = 6.5
    assert (found["margin"].ours, found["margin"].paper, found["margin"].verdict) == (26.0, 6.5, "yes")


def test_a_paper_table_with_text_in_a_score_cell_is_refused_naming_it(tmp_path):
    table = tmp_path / "bad.csv"
    table.write_text("model,Dense\nA,67.8\nB,n/a\n")
    with pytest.raises(ValueError, match=r"bad\.csv: row 'B', column 'Dense': 'n/a' is not a number"):
        report.read_paper_table(table)


def test_the_recipe_prints_a_paper_table_in_its_own_columns():
    from embedkit.reporting.tables import side_by_side

    text = side_by_side("| ours |", "embedkit m3", REPO / "experiments" / "m3" / "m3_table6.csv", "BGE-M3 Table 6")
    assert "| model | Dense | Sparse | Multi-vec |" in text
    assert "| M3-w.skd | 67.80 | 53.90 | 69.00 |" in text and "| M3-w.o.skd | 67.20 | 36.70 | 67.80 |" in text
    text = side_by_side("| ours |", "embedkit conan", REPO / "experiments" / "conan" / "conan_table3.csv", "Table 3")
    assert "| Vanilla | – | – | – | – | – | – | – |" in text and "| Conan-Embedding | 76.67 |" in text


def test_m3_results_md_shows_table6_and_its_deltas(tmp_path):
    logs, out = tmp_path / "logs", tmp_path / "experiments"
    (out / "m3").mkdir(parents=True)
    (out / "m3" / "m3_table6.csv").write_text((REPO / "experiments" / "m3" / "m3_table6.csv").read_text())
    write_run(logs / "reproduce" / "m3_ablation_selfdistill", _m3_rows({"dense": 1.0, "sparse": 4.0, "multivec": 0.5}),
              overrides=["+experiment=m3_ablation_selfdistill"])
    (path,) = report.main(["--runs", str(logs), "--out", str(out), "--papers", "m3"])
    text = path.read_text()
    assert "### Paper (`m3_table6.csv`)" in text and "| model | Dense | Sparse | Multi-vec |" in text
    assert "| self-distillation helps sparse retrieval (with − without) | BGE-M3 Table 6 (MIRACL nDCG@10) | " \
           "+17.20 | +4.00 | yes |" in text
    assert "| self-distill dense+sparse |" in text                      # the hybrids stay in the mini table
    assert "4 of 4 findings agree" in text and "Paper numbers: not available here" not in text


def test_results_md_uses_the_newest_run_states_the_setup_and_embeds_pngs(tmp_path):
    logs, out = tmp_path / "logs", tmp_path / "experiments"
    (out / "bge").mkdir(parents=True)
    for name in ("cpack_table2.csv", "cpack_table3.csv", "cpack_table4.csv"):
        (out / "bge" / name).write_text((REPO / "experiments" / "bge" / name).read_text())
    (out / "bge" / "batch_size_vs_score.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (out / "bge" / "extra_plot.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    rows = {"32": _scores(Avg=35.0), "128": _scores(Avg=36.0), "512": _scores(Avg=37.0)}
    old = write_run(logs / "bge_ablation_batchsize" / "runs" / "2026-01-01_00-00-00",
                    {k: _scores(Avg=11.0) for k in rows})
    past = time.time() - 3600
    os.utime(old / "table.json", (past, past))
    write_run(logs / "reproduce" / "bge_ablation_batchsize", rows,
              overrides=["+experiment=bge_ablation_batchsize", "logger=csv"])
    # an unfinished run (no table.json) is never picked, however new
    (logs / "bge_ablation_batchsize" / "runs" / "2026-12-31_00-00-00" / "rows").mkdir(parents=True)

    (path,) = report.main(["--runs", str(logs), "--out", str(out), "--papers", "bge"])
    text = path.read_text()
    assert "logs/reproduce/bge_ablation_batchsize" in text and "| 37.00 |" in text and "11.00" not in text
    assert "2-layer, 128-wide BERT (tiny_zh), mean pooling" in text
    assert "people_daily_pairs, batch 32" in text and "train 70 (12 s training)" in text
    assert "smoke-sized" not in text
    assert "![C-Pack Table 4: batch size: batch_size_vs_score.png](batch_size_vs_score.png)" in text
    assert "![extra_plot.png](extra_plot.png)" in text
    assert "| 19,200 | 63.90 |" in text                     # the paper's table beside ours
    assert "cpack_table2.csv" in text
    # no recipe run: the section says so instead of inventing rows
    assert "No finished run under" in text and "make reproduce" in text
    assert "![C-Pack Table 3" not in text                   # no recipe PNG present, none embedded


def test_a_smoke_run_is_flagged(tmp_path):
    write_run(tmp_path / "logs" / "reproduce" / "mrl_dims", {"dim=32": _scores(), "dim=64": _scores()},
                    overrides=["+experiment=mrl_dims", "debug=smoke"], single=True)
    text = report.render("conan", tmp_path / "logs", tmp_path / "experiments")
    assert "debug=smoke" in text and "smoke-sized" in text
    assert "Paper numbers: not available here" in text


def test_the_lexical_floor_row_ends_the_mini_table_and_stays_out_of_the_findings(tmp_path, declared):
    from embedkit.reporting.tables import FLOOR_KEY, floor_row, write_table

    logs, out = tmp_path / "logs", tmp_path / "experiments"
    (out / "bge").mkdir(parents=True)
    (out / "bge" / "cpack_table4.csv").write_text((REPO / "experiments" / "bge" / "cpack_table4.csv").read_text())
    rows = {"32": _scores(Avg=35.0), "128": _scores(Avg=36.0), "512": _scores(Avg=37.0)}
    run = write_run(logs / "reproduce" / "bge_ablation_batchsize", rows, overrides=["+experiment=bge_ablation_batchsize"])
    # as the recipe writes it: the run's rows, then the floor's (embedkit/recipes/train_eval.py)
    floor = {"tasks": {"STSB": 71.4}, "categories": {c: 10.0 + i for i, c in enumerate(COLUMNS[:-1])}, "Avg": 50.05,
             "lexical_floor": {"label": "lexical floor: char 1-2-gram TF-IDF -> SVD 256", "settings": {}, "key": "k"}}
    write_table([{"label": k, **v} for k, v in rows.items()] + [floor_row(floor)], run, first="batch")
    assert json.loads((run / "table.json").read_text())[-1][FLOOR_KEY]["tasks"] == {"STSB": 71.4}

    loaded = report.load_run(run, "bge_ablation_batchsize")
    assert list(loaded.rows) == ["32", "128", "512"] and loaded.floor["Avg"] == 50.05
    # the batch-size series runs over the three batch rows only, as without the floor
    paper = report.read_paper_table(out / "bge" / "cpack_table4.csv")[1]
    (avg,) = [f for f in report.findings(declared["bge_ablation_batchsize"], loaded, paper) if f.claim.startswith("Avg")]
    assert avg.ours == pytest.approx(2.0)

    text = report.render("bge", logs, out)
    table = text.split("### Mini results")[1].split("###")[0]
    assert table.strip().splitlines()[-1] == \
        "| lexical floor: char 1-2-gram TF-IDF -> SVD 256 | 10.00 | 11.00 | 12.00 | 13.00 | 14.00 | 15.00 | 50.05 |"
    assert "| 512 |" in table
