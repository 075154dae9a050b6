"""Experiments declare themselves: `make reproduce`, the plots and RESULTS.md read their configs.

    python -m embedkit.reporting.experiments list [--reproduce]     # names (make reproduce's list)
    python -m embedkit.reporting.experiments show                   # what each one declares
    python -m embedkit.reporting.experiments reproduce [NAME ...] [--logs logs] [-- OVERRIDES ...]

An experiment is one file, `conf/experiment/NAME.yaml` (`# @package _global_`). Besides its rows
and stages (`ablation:`, read by the recipe) it may carry a `report:` node, composed here with
Hydra's compose API (so `defaults:` lists and interpolations work as in `python run.py`):

    report:
      paper: bge                   # experiments/<paper>/: RESULTS.md, the paper's CSVs, the PNGs
      citation: "C-Pack (BGE): Xiao et al. 2023, arXiv:2309.07597"   # RESULTS.md's heading
      title: "C-Pack Table 4: batch size"                           # its section's heading
      order: 10                    # place in make reproduce and in RESULTS.md (then by name)
      reproduce: true              # make reproduce runs it; make plots and RESULTS.md show it
      paper_table: cpack_table4.csv  # default: the file name of ablation.paper_table; null: none
      paper_table_note: "..."      # when there is no paper table: why
      other_tables: {cpack_table2.csv: "..."}   # paper tables nothing reproduces: a note each
      findings: [...]              # embedkit/reporting/findings.py: rows compared, paper delta or direction
      plots:
        - notebook: bge_batch_size           # notebooks/<notebook>.ipynb, run on this experiment's run
          pngs: [batch_size_vs_score.png]    # what it writes into experiments/<paper>/
          params: {}                         # more notebook parameters (besides RUN_DIR, OUT_DIR)

Experiments without a `report:` node (or with `reproduce: false`, e.g. the paper-scale
bge_ablation_batchsize_gradcache) are left out of make reproduce, the plots and RESULTS.md.
`--config-dir` (default conf/) and `--extra-config-dir DIR` (added to Hydra's search path; its
`experiment/*.yaml` are listed too) choose where the configs come from.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from embedkit import runs
from embedkit.config import CONFIG_DIR, REPO_ROOT
from embedkit.reporting.findings import ExperimentConfigError, validate

GROUP = "experiment"
REPORT_KEYS = {"paper", "citation", "title", "order", "reproduce", "paper_table", "paper_table_note",
               "other_tables", "findings", "plots"}
PLOT_KEYS = {"notebook", "pngs", "params"}
DEFAULT_ORDER = 100


@dataclass(frozen=True)
class Plot:
    notebook: str                  # a name in notebooks/, or a path to an .ipynb
    pngs: tuple[str, ...]          # files it writes into experiments/<paper>/
    params: dict = field(default_factory=dict)

    @property
    def path(self) -> Path:
        p = Path(self.notebook)
        if p.suffix == ".ipynb":
            return p if p.is_absolute() else REPO_ROOT / p
        return REPO_ROOT / "notebooks" / f"{self.notebook}.ipynb"


@dataclass
class Experiment:
    name: str                      # the config's name: python run.py +experiment=NAME
    experiment_name: str           # its `experiment_name`: logs/<experiment_name>/runs/<time>/
    config_file: Path
    paper: str | None = None
    citation: str | None = None
    title: str | None = None
    order: int = DEFAULT_ORDER
    reproduce: bool = False
    paper_table: str | None = None
    paper_table_note: str | None = None
    other_tables: dict[str, str] = field(default_factory=dict)
    findings: list[dict] = field(default_factory=list)
    plots: list[Plot] = field(default_factory=list)
    declared: bool = False         # it has a report: node

    @property
    def figures(self) -> tuple[str, ...]:
        """Every PNG its notebooks write, in declaration order."""
        return tuple(png for plot in self.plots for png in plot.pngs)

    def reproduce_dir(self, logs: str | Path) -> Path:
        return runs.reproduce_dir(logs, self.name)

    def finished_runs(self, logs: str | Path) -> list[Path]:
        """Its finished run folders under `logs` (reproduce/<name>/, <experiment_name>/runs/*/), newest last."""
        return runs.finished_runs(logs, self.experiment_name, reproduce_name=self.name)


# ---------------------------------------------------------------- loading

def config_files(config_dir: str | Path | None = None, extra_dirs=()) -> dict[str, Path]:
    """{name: file} of every `experiment/*.yaml`; the first folder (the primary one) wins a name."""
    found: dict[str, Path] = {}
    for folder in [Path(config_dir or CONFIG_DIR), *map(Path, extra_dirs)]:
        for path in sorted((folder / GROUP).glob("*.yaml")):
            found.setdefault(path.stem, path.resolve())
    return found


def _searchpath_override(extra_dirs) -> list[str]:
    dirs = [str(Path(d).resolve()) for d in extra_dirs]
    return [f"hydra.searchpath=[{','.join('file://' + d for d in dirs)}]"] if dirs else []


def compose_experiment(name: str, config_dir: str | Path | None = None, extra_dirs=(), overrides=()):
    """`conf/train.yaml` with `+experiment=NAME`, as `python run.py +experiment=NAME` composes it."""
    return compose_all([name], config_dir, extra_dirs, overrides)[name]


def compose_all(names, config_dir=None, extra_dirs=(), overrides=()) -> dict:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import embedkit.config  # noqa: F401  registers the resolvers the configs use

    gh = GlobalHydra.instance()
    saved, gh.hydra = gh.hydra, None   # leave a caller's Hydra (a test's, an app's) as it was
    try:
        with initialize_config_dir(config_dir=str(Path(config_dir or CONFIG_DIR).resolve()), version_base="1.3"):
            return {name: compose(config_name="train", overrides=[f"+{GROUP}={name}", *_searchpath_override(extra_dirs),
                                                                  *overrides])
                    for name in names}
    finally:
        GlobalHydra.instance().hydra = saved


def load(config_dir: str | Path | None = None, extra_dirs=(), names=None) -> list[Experiment]:
    """Every experiment config (or those named), sorted by (report.order, name)."""
    files = config_files(config_dir, extra_dirs)
    unknown = sorted(set(names or ()) - set(files))
    if unknown:
        raise ExperimentConfigError(f"no experiment config named {unknown}; known: {sorted(files)}")
    chosen = list(names) if names else sorted(files)
    configs = compose_all(chosen, config_dir, extra_dirs)
    found = [from_config(name, configs[name], files[name]) for name in chosen]
    return sorted(found, key=lambda e: (e.order, e.name))


def from_config(name: str, cfg, config_file: Path) -> Experiment:
    """The declaration of one composed experiment config."""
    from omegaconf import OmegaConf

    exp = Experiment(name=name, experiment_name=str(cfg.get("experiment_name") or name), config_file=config_file)
    node = cfg.get("report")
    if node is None:
        return exp
    where = f"{config_file}: report"
    report = OmegaConf.to_container(node, resolve=True)
    if not isinstance(report, dict):
        raise ExperimentConfigError(f"{where} must be a mapping, got {report!r}")
    extra = set(report) - REPORT_KEYS
    if extra:
        raise ExperimentConfigError(f"{where}: unknown key(s) {sorted(extra)}; allowed: {sorted(REPORT_KEYS)}")
    exp.declared = True
    exp.paper = report.get("paper")
    exp.citation = report.get("citation")
    exp.title = report.get("title") or name
    exp.order = int(report.get("order", DEFAULT_ORDER))
    exp.reproduce = bool(report.get("reproduce", False))
    if "paper_table" in report:
        exp.paper_table = report["paper_table"]
    else:   # the table the recipe prints beside its own (ablation.paper_table), by file name
        table = OmegaConf.select(cfg, "ablation.paper_table", default=None)
        exp.paper_table = Path(str(table)).name if table else None
    exp.paper_table_note = report.get("paper_table_note")
    exp.other_tables = dict(report.get("other_tables") or {})
    exp.plots = [_plot(p, f"{where}.plots[{i}]") for i, p in enumerate(report.get("plots") or [])]

    exp.findings = list(report.get("findings") or [])
    for i, spec in enumerate(exp.findings):
        validate(spec, f"{where}.findings[{i}]")
    by_id = {f["id"]: f for f in exp.findings if "id" in f}
    for i, spec in enumerate(exp.findings):
        for ref in [spec["margin"]["of"], *spec["margin"]["over"]] if "margin" in spec else []:
            if ref not in by_id:
                raise ExperimentConfigError(f"{where}.findings[{i}].margin names {ref!r}, no finding has that id")
            if spec.get("paper") == "table" and "direction" in by_id[ref]:
                raise ExperimentConfigError(
                    f"{where}.findings[{i}]: a margin with `paper: table` takes the margin of the paper deltas "
                    f"of the findings it names, and {ref!r} states only a direction")
    if exp.reproduce and not exp.paper:
        raise ExperimentConfigError(f"{where}: reproduce: true needs `paper` (the experiments/<paper>/ folder)")
    return exp


def _plot(spec, where: str) -> Plot:
    if not isinstance(spec, dict) or "notebook" not in spec or set(spec) - PLOT_KEYS:
        raise ExperimentConfigError(f"{where}: expected {{notebook, pngs, params}}, got {spec!r}")
    pngs = spec.get("pngs") or []
    if isinstance(pngs, str):
        pngs = [pngs]
    return Plot(str(spec["notebook"]), tuple(str(p) for p in pngs), dict(spec.get("params") or {}))


def reproduced(experiments: list[Experiment]) -> list[Experiment]:
    """Those `make reproduce` runs, and the plots and RESULTS.md show, in their order."""
    return [e for e in experiments if e.declared and e.reproduce]


def papers(experiments: list[Experiment]) -> dict[str, list[Experiment]]:
    """{paper: its reproduced experiments}, papers in the order of their first experiment."""
    out: dict[str, list[Experiment]] = {}
    for exp in reproduced(experiments):
        out.setdefault(exp.paper, []).append(exp)
    return out


def citation(experiments: list[Experiment], paper: str) -> str:
    """The paper's citation: the first one its experiments declare."""
    return next((e.citation for e in experiments if e.paper == paper and e.citation), paper)


# ---------------------------------------------------------------- make reproduce

def reproduce(experiments: list[Experiment], logs: str | Path, overrides=(), extra_dirs=(),
              python: str = sys.executable) -> int:
    """Run each experiment in its fixed folder `logs/reproduce/<name>/`, skipping one whose table
    holds no error and as many seeds per row as `overrides` ask for (finished); an interrupted one
    resumes there (finished rows, seeds and stages kept)."""
    for exp in experiments:
        folder = exp.reproduce_dir(logs)
        seeds = requested_seeds(exp.name, overrides, extra_dirs)
        if runs.finished_cleanly(folder, seeds):
            print(f"{exp.name}: done in {folder}, kept", flush=True)
            continue
        if runs.finished_cleanly(folder):
            print(f"{exp.name}: {folder} holds a finished run with another number of seeds than "
                  f"seeds={seeds}; adding the missing seeds", flush=True)
        print(f"{exp.name}: running in {folder}", flush=True)
        cmd = [python, "run.py", f"+{GROUP}={exp.name}", f"hydra.run.dir={folder}",
               *_searchpath_override(extra_dirs), *overrides]
        rc = subprocess.call(cmd, cwd=REPO_ROOT)
        if rc:
            return rc
    return 0


def requested_seeds(name: str, overrides=(), extra_dirs=()) -> int:
    """The `seeds` the experiment runs with under `overrides` (the Makefile's REPRODUCE_ARGS)."""
    from embedkit.reporting.seeds import seeds_of

    cfg = compose_experiment(name, extra_dirs=extra_dirs, overrides=list(overrides))
    return len(seeds_of(cfg))


def show(experiments: list[Experiment]) -> str:
    lines = ["| experiment | paper | order | reproduce | findings | plots |", "| --- | --- | --- | --- | --- | --- |"]
    for e in experiments:
        plots = ", ".join(f"{p.notebook} ({', '.join(p.pngs)})" for p in e.plots) or "–"
        lines.append(f"| {e.name} | {e.paper or '–'} | {e.order} | {'yes' if e.reproduce else 'no'} | "
                     f"{len(e.findings)} | {plots} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-dir", default=str(CONFIG_DIR), help="the config folder (default: conf/)")
    parser.add_argument("--extra-config-dir", action="append", default=[],
                        help="another config folder on Hydra's search path (its experiment/*.yaml too)")
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="experiment names, space-separated")
    p_list.add_argument("--reproduce", action="store_true", help="only those make reproduce runs")
    p_list.add_argument("--json", action="store_true", help="one JSON object per experiment")
    sub.add_parser("show", help="a table of what each experiment declares")
    p_rep = sub.add_parser("reproduce", help="run experiments in logs/reproduce/<name>/ (overrides after --)")
    p_rep.add_argument("names", nargs="*", help="default: every experiment with report.reproduce: true")
    p_rep.add_argument("--logs", default="logs", help="the logs folder (default: logs)")
    args = parser.parse_args(argv)
    experiments = load(args.config_dir, args.extra_config_dir)
    if args.command == "list":
        chosen = reproduced(experiments) if args.reproduce else experiments
        if args.json:
            for e in chosen:
                print(json.dumps({"name": e.name, "paper": e.paper, "reproduce": e.reproduce,
                                  "figures": list(e.figures)}))
        else:
            print(" ".join(e.name for e in chosen))
        return 0
    if args.command == "show":
        print(show(experiments))
        return 0
    by_name = {e.name: e for e in experiments}
    unknown = [n for n in args.names if n not in by_name]
    if unknown:
        parser.error(f"unknown experiment(s) {unknown}; known: {sorted(by_name)}")
    chosen = [by_name[n] for n in args.names] if args.names else reproduced(experiments)
    return reproduce(chosen, args.logs, overrides, args.extra_config_dir)


if __name__ == "__main__":
    sys.exit(main())
