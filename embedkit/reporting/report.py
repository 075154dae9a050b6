"""Generate `experiments/<paper>/RESULTS.md`: the newest mini-scale run of each experiment beside the
paper's numbers, and, for every paper finding, whether the mini run moves the same way.

    python -m embedkit.reporting.report [--runs logs] [--out experiments] [--wandb ENTITY/PROJECT]

What to report comes from the experiment configs (conf/experiment/*.yaml, their `report:` node;
embedkit/reporting/experiments.py): every experiment with `report.reproduce: true` gets a section
in `experiments/<report.paper>/RESULTS.md`, in `report.order`, with its title, paper table, findings
(embedkit/reporting/findings.py) and PNGs. Nothing here names an experiment or a row.

Local run folders are always read: `<runs>/reproduce/<experiment>/` (`make reproduce`) and
`<runs>/<experiment>/runs/<time>/` (plain `python run.py`), the newest finished one (by its
`table.json`) per experiment (the layout: embedkit/runs.py). Everything in a RESULTS.md is computed
from files: the tables from `table.json`, the setup (model size, data, steps) from the rows'
`results.json` and the run's `.hydra/config.yaml` / `overrides.yaml`, the paper's numbers from
`experiments/*/*.csv`, and each finding's verdict from the two deltas. A finding whose paper source
gives only a direction (Conan: its ablation table is an image in our sources) is compared against
that stated direction. A run's lexical floor row (table.json's row with `lexical_floor`,
embedkit/eval/lexical.py) ends its mini table; findings see only the other rows (`Run.floor`).

`--wandb ENTITY/PROJECT` also lists the W&B runs of each experiment's group (public API; needs
network and a `wandb login`). PNGs present in `experiments/<paper>/` are embedded as images.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from embedkit import runs
from embedkit.atomic_files import write_atomic
from embedkit.config import CONFIG_DIR
from embedkit.reporting import experiments as declared
from embedkit.reporting import fidelity as fidelity_table
from embedkit.reporting.experiments import Experiment
from embedkit.reporting.findings import TIE, Finding, evaluate  # noqa: F401  (Finding, TIE: re-exported)
from embedkit.reporting.tables import (COLUMNS, is_floor, paper_columns, read_paper_table, seed_count,
                                       to_markdown)

SPREAD_KEYS = ("seeds", "std", "n")   # a several-seed row's keys in table.json (tables.row_from_results)

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Run:
    name: str                        # experiment
    folder: Path
    rows: dict[str, dict]            # table label -> {column: score or None}
    results: dict[str, dict]         # row label -> its results.json
    config: object                   # the run's composed config (OmegaConf, unresolved)
    raw: dict                        # the same, as plain YAML (no interpolation)
    overrides: list[str]
    finished: float                  # table.json's mtime
    errors: dict[str, str] = field(default_factory=dict)
    # The lexical floor's table.json row (label, columns, `lexical_floor`: per-task scores,
    # settings), kept out of `rows` so that findings' series and first/last see only the runs.
    floor: dict | None = None


def findings(exp: Experiment, run: Run, paper: list[dict]) -> list[Finding]:
    """The experiment's declared findings (`report.findings`) on one run."""
    return evaluate(exp.findings, run, paper)


# ------------------------------------------------------------------ reading runs

def run_folders(runs_root: Path, experiment: str) -> list[Path]:
    """Finished run folders of one experiment (those holding table.json), newest last."""
    return runs.finished_runs(runs_root, experiment)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def load_run(folder: Path, experiment: str) -> Run:
    table = json.loads(runs.table_file(folder).read_text(encoding="utf-8"))
    floor = next((r for r in table if is_floor(r)), None)
    table = [r for r in table if not is_floor(r)]
    # A row run with several seeds keeps its spread ({column: std}, {column: n}) beside the means.
    rows = {r["label"]: {**{c: r.get(c) for c in COLUMNS}, **{k: r[k] for k in SPREAD_KEYS if k in r}}
            for r in table}
    errors = {r["label"]: r["error"] for r in table if r.get("error")}
    results = {}
    if runs.is_single(folder):
        res = _read_json(runs.results_file(folder))
        results = {label: res for label in rows}
    else:
        for path in runs.row_results(folder):
            res = json.loads(path.read_text(encoding="utf-8"))
            results[res.get("label", path.parent.name)] = res
    cfg_path = runs.hydra_file(folder, runs.HYDRA_CONFIG)
    config = OmegaConf.load(cfg_path) if cfg_path.is_file() else OmegaConf.create({})
    raw = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    ov_path = runs.hydra_file(folder, runs.HYDRA_OVERRIDES)
    overrides = list(yaml.safe_load(ov_path.read_text(encoding="utf-8")) or []) if ov_path.is_file() else []
    return Run(experiment, folder, rows, results, config, raw or {}, overrides,
               runs.table_file(folder).stat().st_mtime, errors, floor)


def _select(cfg, key: str):
    import embedkit.config  # noqa: F401  registers the resolvers the config may use

    try:
        return OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
    except Exception:   # noqa: BLE001  an interpolation needing Hydra's runtime: leave it out
        return None


def _data_summary(node: dict, cfg) -> str:
    """The training data of a data node: its sources (files or built-in corpora), size caps, batch."""
    if not isinstance(node, dict):
        return "?"

    def value(v):   # `${a.b}` read from the run's config
        match = re.fullmatch(r"\$\{([\w.]+)\}", v) if isinstance(v, str) else None
        return _select(cfg, match.group(1)) if match else v

    parts = []
    for src in node.get("sources") or []:
        if isinstance(src, dict):
            parts.append(src.get("file") or str(src.get("_target_", "?")).rsplit(".", 1)[-1])
    for name, task in (node.get("tasks") or {}).items():
        if isinstance(task, dict):
            inner = _data_summary(task, cfg)
            parts.append(f"{name}: {inner}")
    cap = value(node.get("max_examples"))
    batch = value(node.get("batch_size"))
    text = ", ".join(parts) or str(node.get("_target_", "?")).rsplit(".", 1)[-1]
    if cap is not None:
        text += f", at most {cap} examples"
    if isinstance(batch, int):
        text += f", batch {batch}"
    return text


def setup_lines(run: Run) -> list[str]:
    cfg, raw = run.config, run.raw
    enc = lambda k: _select(cfg, f"model.encoder.{k}")   # noqa: E731
    width, layers = enc("hidden_size"), enc("num_layers")
    model = f"{layers}-layer, {width}-wide BERT ({_select(cfg, 'model.name') or 'tiny'}), {enc('pooling')} pooling"
    if enc("projection_dim"):
        model += f", a linear head to {enc('projection_dim')}"
    if run.results:
        first = next(iter(run.results.values()))
        scale = first.get("scale", _select(cfg, "scale.name"))
    else:
        scale = _select(cfg, "scale.name")
    smoke = any(o.startswith("debug=") for o in run.overrides)
    lines = [f"- Run: `{_rel(run.folder)}`, finished {time.strftime('%Y-%m-%d %H:%M', time.localtime(run.finished))}"
             f"; command: `python run.py {' '.join(run.overrides)}`",
             f"- Scale: {scale}" + ("; **a debug run (smoke-sized): its numbers say nothing about the paper**" if smoke else ""),
             f"- Model: {model}",
             f"- Max steps per stage: {_select(cfg, 'trainer.max_steps')} (-1 = one epoch); "
             f"eval: {_select(cfg, 'eval._target_').rsplit('.', 1)[-1] if _select(cfg, 'eval._target_') else '?'}"
             + (f", at most {_select(cfg, 'eval.max_rows')} rows per task" if _select(cfg, "eval.max_rows") else "")]
    stages = raw.get("stages") or {}
    if stages:
        for name, st in stages.items():
            lines.append(f"- Data, stage `{name}`: {_data_summary((st or {}).get('data') or {}, cfg)}")
    else:
        lines.append(f"- Data: {_data_summary(raw.get('data') or {}, cfg)}")
    steps = []
    for label, res in sorted(run.results.items(), key=lambda kv: list(run.rows).index(kv[0])
                             if kv[0] in run.rows else len(run.rows)):
        st = res.get("stage_steps") or {}
        secs = res.get("train_seconds")
        steps.append(f"{label}: " + ", ".join(f"{k} {v}" for k, v in st.items())
                     + (f" ({secs:.0f} s training)" if isinstance(secs, (int, float)) else ""))
    if steps:
        lines.append("- Steps trained per row (stages a row reuses are listed with their steps): " + "; ".join(steps))
    for label, err in run.errors.items():
        lines.append(f"- **Row {label} failed**: {err[:200]}")
    return lines


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


# ------------------------------------------------------------------ writing

def _fmt(x) -> str:
    if x is None:
        return "–"
    return x if isinstance(x, str) else f"{x:+.2f}"


def _noise(f: Finding) -> str:
    return "– (1 seed)" if f.noise is None else f"{f.noise:.2f}"


def findings_table(findings: list[Finding]) -> str:
    lines = ["| finding (paper) | source | paper Δ | mini Δ | same direction | 2·SE | verdict |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for f in findings:
        lines.append(f"| {f.claim} | {f.source} | {_fmt(f.paper)} | {_fmt(f.ours)} | {f.verdict} | "
                     f"{_noise(f)} | {f.outcome} |")
    agree = sum(f.verdict == "yes" for f in findings)
    summary = f"{agree} of {len(findings)} findings agree in direction at mini scale"
    tested = [f for f in findings if f.se is not None and f.seeds > 1]
    if tested:
        calls = [f.outcome for f in tested]
        summary += (f"; tested against the seed noise (at least {min(f.seeds for f in tested)} seeds a side), "
                    f"{calls.count('agrees')} agree, {calls.count('disagrees')} disagree and "
                    f"{calls.count('within noise')} are within noise (|Δ| < 2·SE)")
    elif findings:
        summary += "; one seed per row, so no verdict is tested against the seed-to-seed noise (`seeds=3`)"
    return "\n".join(lines) + f"\n\n{summary}."


def seeds_caption(run: Run) -> list[str]:
    """A line above a table of rows run with several seeds: what its "mean ± std" cells are."""
    count = seed_count(list(run.rows.values()))
    if count < 2:
        return []
    seeds = next((r["seeds"] for r in run.rows.values() if len(r.get("seeds") or ()) == count), [])
    floor = "; the lexical floor is deterministic (one value)" if run.floor else ""
    return [f"Mean ± sample standard deviation over {count} seeds ({', '.join(map(str, seeds))}) per cell{floor}.", ""]


def experiment_section(exp: Experiment, paper_dir: Path, runs_root: Path, wandb_path: str | None) -> str:
    parts = [f"## {exp.title}", "", f"Experiment: `python run.py +experiment={exp.name}` "
             f"({_rel(exp.config_file)})."]
    paper_rows: list[dict] = []
    if exp.paper_table and (paper_dir / exp.paper_table).is_file():
        first, paper_rows = read_paper_table(paper_dir / exp.paper_table)
    folders = exp.finished_runs(runs_root)
    if not folders:
        parts += ["", f"No finished run under `{_rel(runs_root)}` (looked in `{runs.REPRODUCE}/{exp.name}/` and "
                  f"`{exp.experiment_name}/{runs.RUNS}/*/`): run `make reproduce`."]
    else:
        run = load_run(folders[-1], exp.name)
        parts += ["", "### Mini setup", "", *setup_lines(run), "", "### Mini results", "",
                  *seeds_caption(run),
                  to_markdown([{"label": k, **v} for k, v in run.rows.items()] + ([run.floor] if run.floor else []),
                              "row")]
    if paper_rows:
        parts += ["", f"### Paper (`{exp.paper_table}`)", "",
                  to_markdown(paper_rows, first, paper_columns(paper_rows))]
    else:
        parts += ["", f"Paper numbers: not available here: {exp.paper_table_note}."]
    if folders:
        parts += ["", "### Findings", "", findings_table(findings(exp, run, paper_rows))]
    for png in exp.figures:
        if (paper_dir / png).is_file():
            parts += ["", f"![{exp.title}: {png}]({png})"]
    if wandb_path:
        parts += ["", wandb_section(wandb_path, exp.experiment_name)]
    return "\n".join(parts)


def wandb_section(path: str, experiment: str) -> str:
    """The experiment's W&B runs (its group), newest first, with their tags and eval/Avg."""
    import wandb

    runs = wandb.Api().runs(path, filters={"group": experiment}, order="-created_at")
    lines = [f"### W&B runs (`{path}`, group `{experiment}`)", "", "| run | tags | eval/Avg |", "| --- | --- | --- |"]
    for r in runs:
        avg = r.summary.get("eval/Avg")
        lines.append(f"| [{r.name}]({r.url}) | {', '.join(r.tags)} | {'–' if avg is None else f'{avg:.2f}'} |")
    return "\n".join(lines)


def render(paper: str, runs_root: Path, out_root: Path, wandb_path: str | None = None,
           experiments: list[Experiment] | None = None) -> str:
    """One paper's RESULTS.md: a section per experiment that declares it (report.paper) and
    `make reproduce` runs (report.reproduce), in their order."""
    experiments = declared.load() if experiments is None else experiments
    sections = declared.papers(experiments).get(paper)
    if not sections:
        raise KeyError(f"no experiment with report.reproduce: true declares report.paper: {paper}")
    paper_dir = out_root / paper
    parts = [f"# Mini-scale results: {declared.citation(sections, paper)}", "",
             "<!-- Generated by `python -m embedkit.reporting.report` (make reproduce); do not edit. -->", "",
             "Each section shows the newest finished run of one experiment beside the paper's numbers. "
             "A finding agrees when the mini run's difference has the paper's sign; moves under "
             f"{TIE} points count as no change. With several seeds per row (`seeds=N`) a difference "
             "below two standard errors of the difference (2·SE = 2·sqrt(s_a²/n_a + s_b²/n_b)) is "
             "within noise; with one seed the verdict is the sign's alone, marked (1 seed). The mini "
             "model is far smaller than the paper's and trains for minutes on a CPU, so agreement is "
             "about direction only."]
    notes = {}
    for exp in sections:   # paper tables no experiment reproduces (report.other_tables)
        for table, note in exp.other_tables.items():
            notes.setdefault(table, note)
    for table, note in notes.items():
        if (paper_dir / table).is_file():
            parts += ["", note]
    for exp in sections:
        parts += ["", experiment_section(exp, paper_dir, runs_root, wandb_path)]
    figures = sorted(p.name for p in paper_dir.glob("*.png")
                     if p.name not in {f for e in sections for f in e.figures})
    if figures:
        parts += ["", "## Other figures", ""] + [f"![{name}]({name})" for name in figures]
    fidelity = fidelity_table.section(paper_dir)
    if fidelity:
        parts += ["", fidelity]
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default=str(REPO / "logs"), help="the logs folder (default: logs)")
    parser.add_argument("--out", default=str(REPO / "experiments"), help="the experiments folder")
    parser.add_argument("--papers", nargs="*", default=None,
                        help="the papers (report.paper) to write; default: every one an experiment declares")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", default=None,
                        help="also list each experiment's W&B runs (online, after `wandb login`)")
    parser.add_argument("--config-dir", default=str(CONFIG_DIR), help="the config folder (default: conf/)")
    parser.add_argument("--fidelity-only", action="store_true",
                        help="only refresh each RESULTS.md's paper-scale fidelity table (needs no runs)")
    parser.add_argument("--extra-config-dir", action="append", default=[],
                        help="another config folder on Hydra's search path (its experiment/*.yaml too)")
    args = parser.parse_args(argv)
    experiments = declared.load(args.config_dir, args.extra_config_dir)
    known = list(declared.papers(experiments))
    unknown = sorted(set(args.papers or ()) - set(known))
    if unknown:
        parser.error(f"unknown paper(s) {unknown}; the experiment configs declare {known}")
    written = []
    for paper in args.papers or known:
        out = Path(args.out) / paper / "RESULTS.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        if args.fidelity_only:
            current = out.read_text(encoding="utf-8") if out.is_file() else ""
            text = fidelity_table.with_section(current, fidelity_table.section(out.parent))
            write_atomic(out, lambda fh: fh.write(text))
            print(f"refreshed the fidelity table of {out}")
            written.append(out)
            continue
        out.write_text(render(paper, Path(args.runs), Path(args.out), args.wandb, experiments), encoding="utf-8")
        print(f"wrote {out}")
        written.append(out)
    return written


if __name__ == "__main__":
    main()
