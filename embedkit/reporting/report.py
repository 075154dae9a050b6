"""Generate `experiments/<paper>/RESULTS.md`: the newest mini-scale run of each experiment beside the
paper's numbers, and, for every paper finding, whether the mini run moves the same way.

    python -m embedkit.reporting.report [--runs logs] [--out experiments] [--wandb ENTITY/PROJECT]

Local run folders are always read: `<runs>/reproduce/<experiment>/` (`make reproduce`) and
`<runs>/<experiment>/runs/<time>/` (plain `python run.py`), the newest finished one (by its
`table.json`) per experiment. Everything in a RESULTS.md is computed from files: the tables from
`table.json`, the setup (model size, data, steps) from the rows' `results.json` and the run's
`.hydra/config.yaml` / `overrides.yaml`, the paper's numbers from `experiments/*/*.csv`, and each
finding's verdict from the two deltas. A finding whose paper source gives only a direction (M3,
Conan: their tables are not in our sources) is compared against that stated direction.

`--wandb ENTITY/PROJECT` also lists the W&B runs of each experiment's group (public API; needs
network and a `wandb login`). PNGs present in `experiments/<paper>/` are embedded as images.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from embedkit.folders import safe_label
from embedkit.reporting.tables import COLUMNS, read_paper_table, to_markdown

REPO = Path(__file__).resolve().parents[2]
# A move smaller than this (score points, x100) counts as no move: mteb rounds main scores to 1e-5.
TIE = 0.005


@dataclass
class Finding:
    claim: str           # the paper's finding, in words
    source: str          # where the paper states it
    paper: float | str   # the paper's delta (points), or its stated direction ("up") without numbers
    ours: float | None   # our delta in points; None = a row is missing

    @property
    def paper_sign(self) -> int:
        if isinstance(self.paper, str):
            return {"up": 1, "down": -1}[self.paper]
        return _sign(self.paper)

    @property
    def verdict(self) -> str:
        if self.ours is None or (isinstance(self.ours, float) and math.isnan(self.ours)):
            return "n/a (row missing)"
        if _sign(self.ours) == 0:
            return "no (no change)"
        return "yes" if _sign(self.ours) == self.paper_sign else "no"


def _sign(x: float) -> int:
    return 0 if abs(x) < TIE else (1 if x > 0 else -1)


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


@dataclass
class Experiment:
    name: str
    title: str
    paper_table: str | None                   # file under the paper folder, or None
    paper_table_note: str | None              # why there is none
    findings: callable                        # (Run, paper rows) -> list[Finding]
    figures: tuple[str, ...]                  # PNGs the notebooks write for it


# ------------------------------------------------------------------ finding rules

def _score(run: Run, label: str, col: str = "Avg") -> float | None:
    value = run.rows.get(label, {}).get(col)
    return None if value is None else float(value)


def _delta(a, b):
    return None if a is None or b is None else a - b


def batchsize_findings(run: Run, paper: list[dict]) -> list[Finding]:
    """C-Pack Table 4: per category, the move from the smallest to the largest batch."""
    labels = sorted(run.rows, key=lambda s: float(re.sub(r"[^0-9.]", "", s) or "nan"))
    by_paper = {r["label"]: r for r in paper}
    out = []
    if not labels or len(by_paper) < 2:
        return out
    small, large = labels[0], labels[-1]
    p_small = by_paper[run.results.get(small, {}).get("paper_row") or paper[0]["label"]]
    p_large = by_paper[run.results.get(large, {}).get("paper_row") or paper[-1]["label"]]
    for col in COLUMNS:
        out.append(Finding(
            claim=f"{col}: batch {p_small['label']} → {p_large['label']} (ours {small} → {large})",
            source="C-Pack Table 4",
            paper=p_large[col] - p_small[col],
            ours=_delta(_score(run, large, col), _score(run, small, col))))
    return out


def recipe_findings(run: Run, paper: list[dict]) -> list[Finding]:
    """C-Pack Table 3: each recipe step, read as the Avg difference of two rows."""
    p = {r["label"]: r for r in paper}
    steps = [("RetroMAE pre-training helps", "BGE-pretrain", "BGE w.o. pre-train"),
             ("task fine-tuning helps", "BGE w.o. Instruct", "BGE-pretrain"),
             ("the instruction helps", "BGE-finetune", "BGE w.o. Instruct")]
    return [Finding(claim=f"{claim}: Avg {a} − {b}", source="C-Pack Table 3",
                    paper=p[a]["Avg"] - p[b]["Avg"],
                    ours=_delta(_score(run, a), _score(run, b)))
            for claim, a, b in steps if a in p and b in p]


M3_MODES = ("", "sparse", "multivec", "dense+sparse", "all")


def m3_findings(run: Run, paper: list[dict]) -> list[Finding]:
    """BGE-M3: self-distillation helps every retrieval mode (Retrieval column), sparse the most."""
    out, gains = [], {}
    for mode in M3_MODES:
        with_kd = _score(run, f"self-distill {mode}".strip(), "Retrieval")
        without = _score(run, f"no self-distill {mode}".strip(), "Retrieval")
        gains[mode or "dense"] = _delta(with_kd, without)
        out.append(Finding(claim=f"self-distillation helps {mode or 'dense'} retrieval (Retrieval, with − without)",
                           source="BGE-M3 §4 ablation (direction only)", paper="up",
                           ours=gains[mode or "dense"]))
    if all(g is not None for g in gains.values()):
        others = max(g for m, g in gains.items() if m != "sparse")
        out.append(Finding(claim="sparse gains the most (sparse gain − largest other gain)",
                           source="BGE-M3 §4 ablation (direction only)", paper="up",
                           ours=gains["sparse"] - others))
    return out


def _mrl_width(label: str) -> int | None:
    match = re.search(r"dim=(\d+)", label)
    return int(match.group(1)) if match else None


def mrl_findings(run: Run, paper: list[dict]) -> list[Finding]:
    """MRL as Conan uses it: a wider prefix scores higher; the narrowest keeps most of the score."""
    widths = sorted((w, label) for label in run.rows if (w := _mrl_width(label)) is not None)
    if len(widths) < 2:
        return []
    (w0, small), (w1, large) = widths[0], widths[-1]
    out = [Finding(claim=f"{col}: width {w0} → {w1}",
                   source="Conan-Embedding §3 (MRL; Kusupati et al. 2022); direction only",
                   paper="up", ours=_delta(_score(run, large, col), _score(run, small, col)))
           for col in ("Avg", "Retrieval")]
    steps = [_delta(_score(run, b, "Avg"), _score(run, a, "Avg"))
             for (_, a), (_, b) in zip(widths, widths[1:])]
    if all(s is not None for s in steps):
        out.append(Finding(claim="Avg never falls as the width grows (smallest step between neighbouring widths)",
                           source="MRL (Kusupati et al. 2022); direction only", paper="up",
                           ours=min(steps)))
    return out


def conan_findings(run: Run, paper: list[dict]) -> list[Finding]:
    """Conan Table 3 as its text states it: DHNM and CBB each beat Vanilla; Conan gains in Retrieval/Re-rank."""
    conan = next((label for label in run.rows if label.startswith("Conan")), "Conan")
    src = "Conan-Embedding §4 / Table 3 text (direction only)"
    out = [Finding(claim="+DHNM beats Vanilla (Avg)", source=src, paper="up",
                   ours=_delta(_score(run, "+DHNM"), _score(run, "Vanilla"))),
           Finding(claim="+CBB beats Vanilla (Avg)", source=src, paper="up",
                   ours=_delta(_score(run, "+CBB"), _score(run, "Vanilla")))]
    for col in ("Retrieval", "Rerank"):
        out.append(Finding(claim=f"Conan beats Vanilla on {col}", source=src, paper="up",
                           ours=_delta(_score(run, conan, col), _score(run, "Vanilla", col))))
    return out


PAPERS = {
    "bge": ("C-Pack (BGE): Xiao et al. 2023, arXiv:2309.07597", [
        Experiment("bge_ablation_batchsize", "C-Pack Table 4: batch size", "cpack_table4.csv", None,
                   batchsize_findings, ("batch_size_vs_score.png",)),
        Experiment("bge_ablation_recipe", "C-Pack Table 3: the training recipe", "cpack_table3.csv", None,
                   recipe_findings, ("recipe_ablation.png",)),
    ]),
    "m3": ("BGE-M3: Chen et al. 2024, arXiv:2402.03216", [
        Experiment("m3_ablation_selfdistill", "BGE-M3: self-knowledge distillation", None,
                   "the paper's ablation table (MIRACL nDCG@10) is not in our sources; only its finding is",
                   m3_findings, ("m3_modes.png",)),
    ]),
    "conan": ("Conan-Embedding: Li et al. 2024, arXiv:2408.15710", [
        Experiment("mrl_dims", "Conan-Embedding: Matryoshka widths", None,
                   "Conan reports no per-width scores; the finding is MRL's",
                   mrl_findings, ("mrl_dims.png",)),
        Experiment("conan_ablation", "Conan-Embedding Table 3: fine-tuning methods", None,
                   "Table 3 is an image in our sources (conan_table3.csv lists its rows, without numbers)",
                   conan_findings, ("dhnm_scores.png", "cbb_vs_sequential_loss.png")),
    ]),
}


# ------------------------------------------------------------------ reading runs

def run_folders(runs_root: Path, experiment: str) -> list[Path]:
    """Finished run folders of one experiment (those holding table.json), newest last."""
    found = [runs_root / "reproduce" / experiment] + sorted((runs_root / experiment / "runs").glob("*"))
    found = [p for p in found if (p / "table.json").is_file()]
    return sorted(found, key=lambda p: (p / "table.json").stat().st_mtime)


def _row_results(folder: Path, label: str, single: bool) -> dict:
    path = folder / "results.json" if single else folder / "rows" / safe_label(label) / "results.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def load_run(folder: Path, experiment: str) -> Run:
    table = json.loads((folder / "table.json").read_text(encoding="utf-8"))
    rows = {r["label"]: {c: r.get(c) for c in COLUMNS} for r in table}
    errors = {r["label"]: r["error"] for r in table if r.get("error")}
    results = {}
    single = (folder / "results.json").is_file() and not (folder / "rows").is_dir()
    if single:
        res = _row_results(folder, "", True)
        results = {label: res for label in rows}
    else:
        for row_dir in sorted((folder / "rows").glob("*/results.json")):
            res = json.loads(row_dir.read_text(encoding="utf-8"))
            results[res.get("label", row_dir.parent.name)] = res
    cfg_path = folder / ".hydra" / "config.yaml"
    config = OmegaConf.load(cfg_path) if cfg_path.is_file() else OmegaConf.create({})
    raw = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    ov_path = folder / ".hydra" / "overrides.yaml"
    overrides = list(yaml.safe_load(ov_path.read_text(encoding="utf-8")) or []) if ov_path.is_file() else []
    return Run(experiment, folder, rows, results, config, raw or {}, overrides,
               (folder / "table.json").stat().st_mtime, errors)


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


def findings_table(findings: list[Finding]) -> str:
    lines = ["| finding (paper) | source | paper Δ | mini Δ | same direction |", "| --- | --- | --- | --- | --- |"]
    for f in findings:
        lines.append(f"| {f.claim} | {f.source} | {_fmt(f.paper)} | {_fmt(f.ours)} | {f.verdict} |")
    agree = sum(f.verdict == "yes" for f in findings)
    return "\n".join(lines) + f"\n\n{agree} of {len(findings)} findings agree in direction at mini scale."


def experiment_section(exp: Experiment, paper_dir: Path, runs_root: Path, wandb_path: str | None) -> str:
    parts = [f"## {exp.title}", "", f"Experiment: `python run.py +experiment={exp.name}` "
             f"(conf/experiment/{exp.name}.yaml)."]
    paper_rows: list[dict] = []
    if exp.paper_table and (paper_dir / exp.paper_table).is_file():
        first, paper_rows = read_paper_table(paper_dir / exp.paper_table)
    folders = run_folders(runs_root, exp.name)
    if not folders:
        parts += ["", f"No finished run under `{_rel(runs_root)}` (looked in `reproduce/{exp.name}/` and "
                  f"`{exp.name}/runs/*/`): run `make reproduce`."]
    else:
        run = load_run(folders[-1], exp.name)
        parts += ["", "### Mini setup", "", *setup_lines(run), "", "### Mini results", "",
                  to_markdown([{"label": k, **v} for k, v in run.rows.items()], "row")]
    if paper_rows:
        parts += ["", f"### Paper (`{exp.paper_table}`)", "", to_markdown(paper_rows, first)]
    else:
        parts += ["", f"Paper numbers: not available here: {exp.paper_table_note}."]
    if folders:
        parts += ["", "### Findings", "", findings_table(exp.findings(run, paper_rows))]
    for png in exp.figures:
        if (paper_dir / png).is_file():
            parts += ["", f"![{exp.title}: {png}]({png})"]
    if wandb_path:
        parts += ["", wandb_section(wandb_path, exp.name)]
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


def render(paper: str, runs_root: Path, out_root: Path, wandb_path: str | None = None) -> str:
    citation, experiments = PAPERS[paper]
    paper_dir = out_root / paper
    parts = [f"# Mini-scale results: {citation}", "",
             "<!-- Generated by `python -m embedkit.reporting.report` (make reproduce); do not edit. -->", "",
             "Each section shows the newest finished run of one experiment beside the paper's numbers. "
             "A finding agrees when the mini run's difference has the paper's sign; moves under "
             f"{TIE} points count as no change. The mini model is far smaller than the paper's and "
             "trains for minutes on a CPU, so agreement is about direction only."]
    if paper == "bge" and (paper_dir / "cpack_table2.csv").is_file():
        parts += ["", "C-Pack Table 2 (the C-MTEB leaderboard of released models) is in `cpack_table2.csv`; "
                  "no mini experiment corresponds to it."]
    for exp in experiments:
        parts += ["", experiment_section(exp, paper_dir, runs_root, wandb_path)]
    figures = sorted(p.name for p in paper_dir.glob("*.png")
                     if p.name not in {f for e in experiments for f in e.figures})
    if figures:
        parts += ["", "## Other figures", ""] + [f"![{name}]({name})" for name in figures]
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default=str(REPO / "logs"), help="the logs folder (default: logs)")
    parser.add_argument("--out", default=str(REPO / "experiments"), help="the experiments folder")
    parser.add_argument("--papers", nargs="*", default=list(PAPERS), choices=list(PAPERS))
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", default=None,
                        help="also list each experiment's W&B runs (online, after `wandb login`)")
    args = parser.parse_args(argv)
    written = []
    for paper in args.papers:
        out = Path(args.out) / paper / "RESULTS.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(render(paper, Path(args.runs), Path(args.out), args.wandb), encoding="utf-8")
        print(f"wrote {out}")
        written.append(out)
    return written


if __name__ == "__main__":
    main()
