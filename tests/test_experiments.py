"""Experiments declare themselves (embedkit/reporting/experiments.py): `make reproduce`, the plots and
RESULTS.md come from the `report:` node of conf/experiment/*.yaml, so one new YAML file makes a
new experiment part of all three, with no other edit."""

import ast
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import scores as _scores, write_run

from embedkit import runs
from embedkit.reporting import experiments, plots, report
from embedkit.reporting.experiments import ExperimentConfigError

REPO = Path(__file__).resolve().parents[1]

TOY = """\
# @package _global_
# A toy ablation, declared the way every experiment is: rows, then what to report and plot.
experiment_name: toy_ablation
ablation:
  column: batch
  paper_table: null
  rows:
    mini:
      - {label: "16", paper_row: "small", overrides: {data.batch_size: 16}}
      - {label: "64", paper_row: "large", overrides: {data.batch_size: 64}}
report:
  paper: toy
  citation: "Toy et al. 2030, arXiv:0000.00000"
  title: "Toy Table 1: batch size"
  order: 5
  reproduce: true
  paper_table: toy_table1.csv
  other_tables: {toy_table2.csv: "Toy Table 2 is in `toy_table2.csv`; nothing here reproduces it."}
  findings:
    - {claim: "{column}: a larger batch helps ({rows[1]} → {rows[0]})", rows: ["64", "16"],
       columns: [Retrieval, Avg], paper: table, source: "Toy Table 1"}
    - {claim: "the batch changes STS", rows: [last, first], series: '^(\\d+)$', column: STS,
       direction: down, source: "Toy §4 (direction only)"}
  plots:
    - {notebook: bge_batch_size, pngs: [batch_size_vs_score.png]}
"""
TOY_TABLE = "batch,Retrieval,STS,PairCLF,CLF,Rerank,Cluster,Avg\nsmall,10,20,30,40,50,60,35\nlarge,12,19,30,40,50,60,36\n"


@pytest.fixture
def toy_conf(tmp_path):
    """A config folder outside conf/ holding one experiment: experiment/toy_ablation.yaml."""
    folder = tmp_path / "my_conf"
    (folder / "experiment").mkdir(parents=True)
    (folder / "experiment" / "toy_ablation.yaml").write_text(TOY, encoding="utf-8")
    return folder


def _extra(folder):
    return ["--extra-config-dir", str(folder)]


def test_the_reproduce_list_is_read_from_the_configs(capsys):
    declared = experiments.load()
    assert experiments.main(["list", "--reproduce"]) == 0
    listed = capsys.readouterr().out.split()
    assert listed == [e.name for e in declared if e.reproduce]          # in report.order
    assert [e.order for e in declared if e.reproduce] == sorted(e.order for e in declared if e.reproduce)
    # an experiment whose config says reproduce: false (the paper-scale GradCache one) is left out
    left_out = [e.name for e in declared if not e.reproduce]
    assert left_out and not set(left_out) & set(listed)


def test_every_reproduced_experiment_has_its_paper_folder_tables_notebooks_and_pngs():
    for exp in experiments.reproduced(experiments.load()):
        folder = REPO / "experiments" / exp.paper
        assert folder.is_dir(), exp.name
        assert exp.paper_table is None or (folder / exp.paper_table).is_file(), exp.name
        assert exp.paper_table or exp.paper_table_note, f"{exp.name}: no paper table and no note why"
        assert exp.findings and exp.title and exp.citation, exp.name
        if exp.paper_table:   # every paper cell a finding names is a number in the committed table
            by_label = {r["label"]: r for r in report.read_paper_table(folder / exp.paper_table)[1]}
            for spec in exp.findings:
                paper = spec.get("paper")
                cells = (paper.get("cells") or []) if isinstance(paper, dict) else []
                for row, column in cells:
                    assert by_label.get(row, {}).get(column) is not None, f"{exp.name}: no paper cell {row}/{column}"
        for plot in exp.plots:
            assert plot.path.is_file(), f"{exp.name}: no notebook {plot.path}"
            assert all((folder / png).is_file() for png in plot.pngs), f"{exp.name}: {plot.pngs} not committed"


def test_a_toy_experiment_in_its_own_yaml_is_reproduced_reported_and_plotted(toy_conf, tmp_path, capsys):
    # make reproduce's list
    assert experiments.main([*_extra(toy_conf), "list", "--reproduce"]) == 0
    assert capsys.readouterr().out.split()[0] == "toy_ablation"          # order 5: first
    if shutil.which("make"):
        made = subprocess.run(["make", "-n", "reproduce", f"PY={sys.executable}", "STAMP=Makefile",
                               f"EXTRA_CONF={toy_conf}"], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert made.returncode == 0, made.stderr
        command = next(line for line in made.stdout.splitlines() if "embedkit.reporting.experiments" in line)
        assert "reproduce --logs logs toy_ablation bge_" in command and "-- logger=csv" in command

    # the report: a finished toy run and the toy paper's table
    logs, out = tmp_path / "logs", tmp_path / "experiments"
    (out / "toy").mkdir(parents=True)
    (out / "toy" / "toy_table1.csv").write_text(TOY_TABLE)
    (out / "toy" / "toy_table2.csv").write_text(TOY_TABLE)
    write_run(runs.reproduce_dir(logs, "toy_ablation"),
              {"16": _scores(Retrieval=20.0, STS=30.0, Avg=30.0), "64": _scores(Retrieval=21.0, STS=31.0, Avg=29.0)},
              overrides=["+experiment=toy_ablation"], paper_rows={"16": "small", "64": "large"})
    (path,) = report.main(["--runs", str(logs), "--out", str(out), "--papers", "toy", *_extra(toy_conf)])
    text = path.read_text()
    assert path == out / "toy" / "RESULTS.md"
    assert text.startswith("# Mini-scale results: Toy et al. 2030, arXiv:0000.00000\n")
    assert "Toy Table 2 is in `toy_table2.csv`" in text
    assert "## Toy Table 1: batch size" in text and "+experiment=toy_ablation" in text
    assert "### Paper (`toy_table1.csv`)" in text and "| large | 12.00 |" in text
    assert "| Retrieval: a larger batch helps (16 → 64) | Toy Table 1 | +2.00 | +1.00 | yes |" in text
    assert "| Avg: a larger batch helps (16 → 64) | Toy Table 1 | +1.00 | -1.00 | no |" in text
    assert "| the batch changes STS | Toy §4 (direction only) | down | +1.00 | no |" in text
    assert "1 of 3 findings agree" in text
    # without --papers every declared paper is written, the toy's too
    assert out / "toy" / "RESULTS.md" in report.main(["--runs", str(logs), "--out", str(out), *_extra(toy_conf)])

    # the plots: the toy's notebook runs on the toy's run and writes into experiments/toy/
    (job,) = [j for j in plots.jobs(logs / runs.REPRODUCE, out, experiments.load(extra_dirs=[toy_conf]))
              if j.experiment.name == "toy_ablation"]
    assert job.run_dir == runs.reproduce_dir(logs, "toy_ablation") and job.out_dir == out / "toy"
    written = plots.main(["--runs", str(logs / runs.REPRODUCE), "--out", str(out), *_extra(toy_conf),
                          "--notebooks", "bge_batch_size"])
    assert written == [out / "toy" / "batch_size_vs_score.png"]
    (path,) = report.main(["--runs", str(logs), "--out", str(out), "--papers", "toy", *_extra(toy_conf)])
    assert "![Toy Table 1: batch size: batch_size_vs_score.png](batch_size_vs_score.png)" in path.read_text()


def test_a_toy_experiment_added_to_a_copy_of_conf_is_found(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(REPO / "conf", conf)
    (conf / "experiment" / "toy_ablation.yaml").write_text(TOY, encoding="utf-8")
    declared = experiments.load(config_dir=conf)
    assert [e.name for e in experiments.reproduced(declared)][0] == "toy_ablation"
    assert list(experiments.papers(declared))[0] == "toy"


def test_plots_say_which_runs_are_missing(tmp_path, capsys):
    assert plots.main(["--runs", str(tmp_path / "none"), "--out", str(tmp_path / "out")]) == []
    printed = capsys.readouterr().out
    for exp in experiments.reproduced(experiments.load()):
        if exp.plots:
            assert str(tmp_path / "none" / exp.name) in printed


@pytest.mark.parametrize("report_node, why", [
    ("report: {paper: toy, reproduce: true, plot: []}", "unknown key"),
    ("report: {reproduce: true}", "needs `paper`"),
    ("report: {paper: toy, findings: [{claim: x, source: y, rows: [A, B], paper: table, direction: up}]}",
     "exactly one of `paper`"),
    ("report: {paper: toy, findings: [{claim: x, source: y, rows: [A], direction: up}]}", "`rows` is [A, B]"),
    ("report: {paper: toy, findings: [{claim: x, source: y, margin: {of: a, over: [b]}, direction: up}]}",
     "no finding has that id"),
    ("report: {paper: toy, findings: [{claim: x, source: y, rows: neighbours, paper: table}]}",
     "compares our rows only"),
    ("report: {paper: toy, findings: [{claim: x, source: y, rows: [A, B], direction: sideways}]}", "up or down"),
    ("report: {paper: toy, findings: [{claim: x, source: y, rows: [A, B], paper: {cells: [[R, Dense]]}}]}",
     "{cells: [[row, column], [row, column]]}"),
    ("report: {paper: toy, findings: [{claim: x, source: y, rows: [A, B], paper: {cells: [R, S]}}]}",
     "{cells: [[row, column], [row, column]]}"),
    ("report: {paper: toy, findings: [{id: a, claim: x, source: y, rows: [A, B], direction: up}, "
     "{claim: m, source: y, margin: {of: a, over: [a]}, paper: {rows: [R, S]}}]}", "its paper side is `table`"),
    ("report: {paper: toy, findings: [{id: a, claim: x, source: y, rows: [A, B], direction: up}, "
     "{claim: m, source: y, margin: {of: a, over: [a]}, paper: table}]}", "'a' states only a direction"),
    ("report: {paper: toy, plots: [{pngs: [a.png]}]}", "notebook"),
])
def test_a_mistyped_declaration_is_refused_naming_the_file(tmp_path, report_node, why):
    (tmp_path / "experiment").mkdir()
    path = tmp_path / "experiment" / "broken.yaml"
    path.write_text(f"# @package _global_\nexperiment_name: broken\n{report_node}\n")
    with pytest.raises(ExperimentConfigError, match="broken.yaml") as err:
        experiments.load(extra_dirs=[tmp_path], names=["broken"])
    assert why in str(err.value)


def test_the_declared_claims_read_as_the_report_wrote_them(tmp_path):
    by_name = {e.name: e for e in experiments.load()}
    rows = {"32": _scores(), "128": _scores(), "512": _scores(Avg=31.0)}
    run = report.load_run(write_run(tmp_path / "b", rows, paper_rows={"32": "256", "512": "19,200"}), "b")
    paper = report.read_paper_table(REPO / "experiments" / "bge" / "cpack_table4.csv")[1]
    claims = [f.claim for f in report.findings(by_name["bge_ablation_batchsize"], run, paper)]
    assert claims[0] == "Retrieval: batch 256 → 19,200 (ours 32 → 512)" and claims[-1].startswith("Avg: batch")
    mrl = {f"dim={d}": _scores() for d in (64, 32, 128)}   # ordered by width, whatever the table's order
    run = report.load_run(write_run(tmp_path / "m", mrl, single=True), "m")
    assert [f.claim for f in report.findings(by_name["mrl_dims"], run, [])] == [
        "Avg: width 32 → 128", "Retrieval: width 32 → 128",
        "Avg never falls as the width grows (smallest step between neighbouring widths)"]
    # a row the run lacks: its finding says so instead of vanishing
    run = report.load_run(write_run(tmp_path / "c", {"Vanilla": _scores(), "+CBB": _scores()}), "c")
    verdicts = {f.claim: f.verdict for f in report.findings(by_name["conan_ablation"], run, [])}
    assert verdicts["+DHNM beats Vanilla (Avg)"] == "n/a (row missing)"
    assert verdicts["+CBB beats Vanilla (Avg)"] == "no (no change)"


def test_no_experiment_or_row_is_named_in_the_reporting_code():
    """The reporting code names no experiment, row label or paper file: the configs do. Docstrings
    (which show the schema with examples) and comments are left out of the check."""
    names = {e.name for e in experiments.load()} | {"BGE-pretrain", "+DHNM", "Vanilla", "self-distill", "dim=",
                                                    "cpack_table", "C-Pack", "Conan", "M3"}
    for source in sorted((REPO / "embedkit" / "reporting").glob("*.py")):
        tree = ast.parse(source.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                    and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                body[0] = ast.Pass()   # the docstring
        code = ast.unparse(tree)      # comments are gone too
        assert not [n for n in names if n in code], (source.name, [n for n in names if n in code])
