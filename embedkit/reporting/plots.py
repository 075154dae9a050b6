"""Run the results notebooks headless on a folder of runs and write their PNGs beside RESULTS.md.

    python -m embedkit.reporting.plots [--runs logs/reproduce] [--out experiments] [--notebooks NAME ...]

Which notebook draws which experiment comes from the experiment configs: each one `make reproduce`
runs (`report.reproduce: true`) lists its notebooks and their PNGs under `report.plots`
(embedkit/reporting/experiments.py). A notebook reads that experiment's run folder (its
`parameters` cell takes RUN_DIR and OUT_DIR, and any `params` the config gives) and writes PNGs into
`experiments/<report.paper>/`; `make reproduce` calls this before `make report`, which embeds every
PNG it finds there. The kernel is this interpreter with this checkout first on its path, so the
notebooks run in the same environment as the runs did (and import embedkit.runs, the run layout).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from embedkit import runs
from embedkit.config import CONFIG_DIR, REPO_ROOT
from embedkit.reporting import experiments as declared


@dataclass(frozen=True)
class Job:
    experiment: declared.Experiment
    plot: declared.Plot
    run_dir: Path          # <runs>/<experiment>/
    out_dir: Path          # <out>/<paper>/


def jobs(runs_root: Path, out_root: Path, experiments: list[declared.Experiment],
         notebooks: list[str] | None = None) -> list[Job]:
    """Every (experiment, notebook) the configs declare, for the experiments make reproduce runs."""
    found = [Job(exp, plot, Path(runs_root) / exp.name, Path(out_root) / exp.paper)
             for exp in declared.reproduced(experiments) for plot in exp.plots]
    return [j for j in found if notebooks is None or j.plot.notebook in notebooks]


def execute_notebook(notebook: Path, run_dir: Path, out_dir: Path, timeout: int = 300,
                     params: dict | None = None) -> str:
    """Execute `notebook` with RUN_DIR / OUT_DIR (and `params`) set; returns what its cells printed."""
    import nbformat
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    nb = nbformat.read(notebook, as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(cells) != 1:
        raise ValueError(f"{notebook}: needs exactly one cell tagged `parameters`, found {len(cells)}")
    values = {"RUN_DIR": str(run_dir), "OUT_DIR": str(out_dir), **(params or {})}
    # After the notebook's own defaults, as papermill injects them: a default not given here stays.
    cells[0].source = cells[0].source.rstrip("\n") + "\n" + "".join(f"{k} = {v!r}\n" for k, v in values.items())
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
    parser.add_argument("--runs", default=f"logs/{runs.REPRODUCE}",
                        help="folder holding one run folder per experiment (make reproduce's)")
    parser.add_argument("--out", default="experiments", help="where the paper folders are")
    parser.add_argument("--notebooks", nargs="*", default=None, help="only these (default: every declared one)")
    parser.add_argument("--config-dir", default=str(CONFIG_DIR), help="the config folder (default: conf/)")
    parser.add_argument("--extra-config-dir", action="append", default=[],
                        help="another config folder on Hydra's search path (its experiment/*.yaml too)")
    args = parser.parse_args(argv)
    experiments = declared.load(args.config_dir, args.extra_config_dir)
    known = sorted({j.plot.notebook for j in jobs(Path(args.runs), Path(args.out), experiments)})
    for name in args.notebooks or []:
        if name not in known:
            parser.error(f"unknown notebook {name!r}; the experiment configs declare {known}")
    written, missing = [], []
    for job in jobs(Path(args.runs), Path(args.out), experiments, args.notebooks):
        if not runs.table_file(job.run_dir, "csv").is_file():
            missing.append(str(job.run_dir))
            continue
        printed = execute_notebook(job.plot.path, job.run_dir.resolve(), job.out_dir.resolve(),
                                   params=job.plot.params)
        # Every notebook prints `wrote <png>` for each file it saves.
        new = sorted(p for p in job.out_dir.glob("*.png") if f"wrote {p.resolve()}" in printed)
        written += new
        print(f"{job.plot.notebook}: {', '.join(str(p) for p in new) or 'no PNG written'}")
        undeclared = sorted({p.name for p in new} - set(job.plot.pngs))
        absent = sorted(set(job.plot.pngs) - {p.name for p in new})
        if undeclared or absent:
            print(f"{job.plot.notebook}: {job.experiment.config_file.name} declares report.plots pngs "
                  f"{list(job.plot.pngs)}; not written: {absent or 'none'}; written, undeclared: {undeclared or 'none'}")
    if missing:
        print(f"no finished run ({runs.table_name('csv')}) in: {', '.join(missing)}; run `make reproduce` first")
    return written


if __name__ == "__main__":
    main()
