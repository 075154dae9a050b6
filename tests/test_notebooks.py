"""Execute the results notebooks headless (nbclient) on a small synthetic run folder.

The kernel is started from a kernelspec written into tmp_path whose argv is this interpreter
(`sys.executable`), so the notebook runs in the same virtual environment as pytest, whatever
kernelspecs the user or the system has installed.
"""

import json
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "bge_batch_size.ipynb"

TABLE = """batch,Retrieval,STS,PairCLF,CLF,Rerank,Cluster,Avg
32,12.2785,23.5626,51.7392,8.2833,53.6805,4.4809,28.5342
128,14.1300,26.4874,53.2094,9.7159,54.9035,4.3627,30.3761
512,16.6890,26.4968,53.2086,10.2151,58.3590,4.4530,31.4307
"""


def _kernel_manager(tmp_path: Path) -> KernelManager:
    spec_dir = tmp_path / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (test venv)",
        "language": "python",
        # This checkout's embedkit (the notebook imports embedkit.runs), as embedkit.reporting.plots
        # runs them: not whichever checkout the environment installed.
        "env": {"PYTHONPATH": str(REPO)},
    }))
    ksm = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")], ensure_native_kernel=False)
    return KernelManager(kernel_name="python3", kernel_spec_manager=ksm)


def _execute(tmp_path: Path, run_dir: Path, out_dir: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1, "the notebook needs exactly one cell tagged `parameters`"
    params[0].source = f"RUN_DIR = {str(run_dir)!r}\nOUT_DIR = {str(out_dir)!r}\n"
    # Runs first, so even a failing notebook tells which interpreter the kernel used.
    nb.cells.insert(0, nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    workdir = tmp_path / "cwd"  # outside the repo: the notebook must find the root by itself
    workdir.mkdir(exist_ok=True)
    client = NotebookClient(nb, km=_kernel_manager(tmp_path), kernel_name="python3", timeout=120,
                            resources={"metadata": {"path": str(workdir)}})
    try:
        client.execute()
    finally:
        kernel_python = "".join(o.get("text", "") for o in nb.cells[0].get("outputs", [])).strip()
        assert kernel_python == sys.executable, f"kernel ran {kernel_python!r}, not {sys.executable}"
    return nb


def test_notebook_is_committed_clean():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "clear the outputs"


def test_batch_size_notebook_writes_png(tmp_path):
    run_dir = tmp_path / "runs" / "2026-01-01_00-00-00"
    run_dir.mkdir(parents=True)
    (run_dir / "table.csv").write_text(TABLE)
    out_dir = tmp_path / "figures"

    nb = _execute(tmp_path, run_dir, out_dir)

    png = out_dir / "batch_size_vs_score.png"
    assert png.is_file()
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000, f"suspiciously small PNG ({len(data)} bytes)"
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                      for o in c.outputs)
    assert "Retrieval" in printed and "agree" in printed  # the direction table was printed


SEEDED = """batch,Retrieval,STS,PairCLF,CLF,Rerank,Cluster,Avg,Retrieval std,STS std,PairCLF std,CLF std,Rerank std,Cluster std,Avg std,seeds
32,12.0,23.0,51.0,8.0,53.0,4.0,25.0,0.5,0.4,0.3,0.2,0.1,0.1,0.3,3
128,14.0,26.0,53.0,9.0,54.0,4.0,26.7,0.5,0.4,0.3,0.2,0.1,0.1,0.3,3
512,13.0,26.0,53.0,10.0,58.0,4.0,27.3,0.5,0.4,0.3,0.2,0.1,0.1,0.3,3
"32, same steps",10.0,20.0,50.0,7.0,50.0,3.0,23.3,0.5,0.4,0.3,0.2,0.1,0.1,0.3,3
"512, same steps",18.0,27.0,54.0,11.0,60.0,5.0,29.2,0.5,0.4,0.3,0.2,0.1,0.1,0.3,3
"""


def test_batch_size_notebook_splits_the_equal_steps_rows(tmp_path):
    # one epoch per batch: 32 -> 512 moves Retrieval +1.00; same steps (32 -> 128 -> 512): +8.00
    run_dir = tmp_path / "runs" / "2026-01-01_00-00-00"
    run_dir.mkdir(parents=True)
    (run_dir / "table.csv").write_text(SEEDED)
    nb = _execute(tmp_path, run_dir, tmp_path / "figures")
    assert (tmp_path / "figures" / "batch_size_vs_score.png").is_file()
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "(one epoch each): [32, 128, 512]" in printed and "(same steps):     [32, 128, 512]" in printed
    epochs, steps = printed.split("ours: one epoch each")[1].split("ours: same steps")
    retrieval = lambda part: next(line for line in part.splitlines() if line.startswith("Retrieval"))
    assert "+1.00" in retrieval(epochs) and "+8.00" in retrieval(steps)


def test_batch_size_notebook_fails_without_table(tmp_path):
    run_dir = tmp_path / "empty_run"
    run_dir.mkdir()
    with pytest.raises(CellExecutionError) as err:
        _execute(tmp_path, run_dir, tmp_path / "figures")
    message = str(err.value)
    assert "FileNotFoundError" in message and str(run_dir) in message
    assert not (tmp_path / "figures").exists()
