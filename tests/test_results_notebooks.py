"""The results notebooks run headless (nbclient) on real smoke-sized runs and write their PNGs; the
RESULTS.md generator then reads the same runs and embeds those PNGs.

Which notebook reads which experiment, and which PNGs it writes where, is what the experiment
configs declare (`report.plots` of every conf/experiment/*.yaml that `make reproduce` runs). The
smoke runs (`debug=smoke logger=csv`, ~20-40 s each) are made once per module into tmp_path, in the
folders `make reproduce` uses (logs/reproduce/<experiment>/). The kernel is this interpreter, as in
tests/test_notebooks.py.
"""

import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from embedkit.reporting import experiments as declared
from embedkit.reporting.plots import execute_notebook

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
# notebook -> (experiment, extra overrides, paper folder, PNGs it writes), as the configs declare
CASES = {plot.notebook: (exp.name, [], exp.paper, list(plot.pngs))
         for exp in declared.reproduced(declared.load()) for plot in exp.plots}
# what a notebook must print on a smoke run, beyond `wrote <png>` (the notebooks' own checks)
PRINTS = {
    # sequential Vanilla trains one task per step: its per-task curves have fewer points than CBB's
    "conan_ablation": ["CBB (+CBB): train/loss_retrieval 3 points, train/loss_sts 3 points", "+DHNM:", "Conan:"],
    "m3_selfdistill": ["sparse", "multivec", "dense+sparse"],
}


def test_every_results_notebook_is_tested():
    # every notebook in notebooks/ is one an experiment config lists under report.plots
    assert {p.stem for p in NOTEBOOKS} == set(CASES)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebooks_are_committed_clean(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), f"clear the outputs of {path.name}"
    params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and "RUN_DIR = None" in params[0].source


@pytest.fixture(scope="module")
def smoke_logs(tmp_path_factory):
    """logs/reproduce/<experiment>/ for every experiment the notebooks read, from real smoke runs."""
    root = tmp_path_factory.mktemp("smoke")
    env = dict(os.environ, EMBEDKIT_CACHE_DIR=str(root / "cache"), WANDB_MODE="offline")
    env.pop("WANDB_API_KEY", None)
    for experiment, extra in dict.fromkeys((e, tuple(x)) for e, x, _, _ in CASES.values()):
        args = [f"+experiment={experiment}", "debug=smoke", "logger=csv", *extra,
                f"hydra.run.dir={root}/logs/reproduce/{experiment}"]
        proc = subprocess.run([sys.executable, "run.py", *args], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=400)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return root / "logs"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_notebook_writes_pngs_from_a_smoke_run(name, smoke_logs, tmp_path):
    experiment, _, paper, pngs = CASES[name]
    out_dir = tmp_path / "experiments" / paper
    printed = execute_notebook(REPO / "notebooks" / f"{name}.ipynb", smoke_logs / "reproduce" / experiment,
                               out_dir, timeout=120)
    for png in pngs:
        data = (out_dir / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000, f"{png}: {len(data)} bytes"
        assert f"wrote {out_dir / png}" in printed
    assert all(text in printed for text in PRINTS.get(name, [])), printed[-3000:]

    # the generator embeds the PNG found beside RESULTS.md, and reports the smoke run as such
    from embedkit.reporting import report

    shutil_copy_tables(out_dir.parent)
    (path,) = report.main(["--runs", str(smoke_logs), "--out", str(out_dir.parent), "--papers", paper])
    text = path.read_text()
    assert all(f"]({png})" in text for png in pngs)
    assert f"logs/reproduce/{experiment}" in text and "smoke-sized" in text
    assert "1-layer, 32-wide BERT" in text and "same direction" in text


def shutil_copy_tables(out_root: Path):
    for csv_file in (REPO / "experiments").glob("*/*.csv"):
        target = out_root / csv_file.parent.name / csv_file.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(csv_file.read_text())


@pytest.mark.slow
def test_plots_entry_point_writes_every_png_into_the_paper_folders(smoke_logs, tmp_path, capsys):
    from embedkit.reporting import plots

    written = plots.main(["--runs", str(smoke_logs / "reproduce"), "--out", str(tmp_path)])
    expected = {tmp_path / paper / png for _, _, paper, pngs in CASES.values() for png in pngs}
    assert set(written) == expected
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in written)
    # every notebook wrote what its config declares, no more: no complaint printed
    assert "declares report.plots" not in capsys.readouterr().out
