"""Run the results notebooks headless on a folder of runs and write their PNGs beside RESULTS.md.

    python -m embedkit.reporting.plots [--runs logs/reproduce] [--out experiments]

Each notebook in `notebooks/` reads one experiment's run folder (its `parameters` cell takes
RUN_DIR and OUT_DIR) and writes PNGs; `make reproduce` calls this before `make report`, which
embeds every PNG it finds in `experiments/<paper>/`. The kernel is this interpreter with this
checkout first on its path, so the notebooks run in the same environment as the runs did.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from embedkit.config import REPO_ROOT

# notebook -> (experiment whose run it reads, paper folder its PNGs go to)
NOTEBOOKS = {
    "bge_batch_size": ("bge_ablation_batchsize", "bge"),
    "bge_recipe": ("bge_ablation_recipe", "bge"),
    "m3_selfdistill": ("m3_ablation_selfdistill", "m3"),
    "mrl_dims": ("mrl_dims", "conan"),
    "conan_ablation": ("conan_ablation", "conan"),
}


def execute_notebook(notebook: Path, run_dir: Path, out_dir: Path, timeout: int = 300) -> str:
    """Execute `notebook` with RUN_DIR / OUT_DIR set; returns what its cells printed."""
    import nbformat
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    nb = nbformat.read(notebook, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(params) != 1:
        raise ValueError(f"{notebook}: needs exactly one cell tagged `parameters`, found {len(params)}")
    params[0].source = f"RUN_DIR = {str(run_dir)!r}\nOUT_DIR = {str(out_dir)!r}\n"
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        spec_dir = Path(tmp) / "kernels" / "python3"
        spec_dir.mkdir(parents=True)
        # This interpreter, not whatever kernel the user or the system has registered.
        (spec_dir / "kernel.json").write_text(json.dumps({
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "embedkit", "language": "python",
            "env": {"PYTHONPATH": str(REPO_ROOT)}}))
        ksm = KernelSpecManager(kernel_dirs=[str(Path(tmp) / "kernels")], ensure_native_kernel=False)
        workdir = Path(tmp) / "cwd"   # the notebooks find the repository by themselves
        workdir.mkdir()
        NotebookClient(nb, km=KernelManager(kernel_name="python3", kernel_spec_manager=ksm),
                       kernel_name="python3", timeout=timeout,
                       resources={"metadata": {"path": str(workdir)}}).execute()
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="logs/reproduce",
                        help="folder holding one run folder per experiment (make reproduce's)")
    parser.add_argument("--out", default="experiments", help="where the paper folders are")
    parser.add_argument("--notebooks", nargs="*", default=list(NOTEBOOKS))
    args = parser.parse_args(argv)
    runs, out, written, missing = Path(args.runs), Path(args.out), [], []
    for name in args.notebooks:
        if name not in NOTEBOOKS:
            parser.error(f"unknown notebook {name!r}; choose from {sorted(NOTEBOOKS)}")
        experiment, paper = NOTEBOOKS[name]
        run_dir = runs / experiment
        if not (run_dir / "table.csv").is_file():
            missing.append(str(run_dir))
            continue
        printed = execute_notebook(REPO_ROOT / "notebooks" / f"{name}.ipynb", run_dir.resolve(),
                                   (out / paper).resolve())
        # Every notebook prints `wrote <png>` for each file it saves.
        new = sorted(p for p in (out / paper).glob("*.png") if f"wrote {p.resolve()}" in printed)
        written += new
        print(f"{name}: {', '.join(str(p) for p in new) or 'no PNG written'}")
    if missing:
        print(f"no finished run (table.csv) in: {', '.join(missing)}; run `make reproduce` first")
    return written


if __name__ == "__main__":
    main()
