"""Paper-scale fidelity: is `scale=paper` the papers' recipe? Checked against a table per paper.

Each paper folder holds `experiments/<paper>/fidelity.yaml`, beside its paper tables: one entry
per setting, with the paper's (or the official code's) value, its source, the config key it lands
on, and where we deviate on purpose, our value and the reason:

    - setting: "general stage: temperature"
      where: {experiments: [bge_ablation_recipe, bge_ablation_batchsize], stages: [general]}
      key: objective.temperature
      paper: 0.01
      source: "FlagEmbedding README (FE@982f810): 0.01 for bge (v1), 0.02 for bge-v1.5"
      # ours: 0.02                 # only with a deviation
      # deviation: "the reason"

`check()` composes every experiment the table names at `scale=paper`, builds its rows and stages
exactly as the recipe does (`ablation_rows`, `row_config`, `stage_config`), and compares each
resolved value with the entry's (`ours` where there is a deviation, else `paper`). A mismatch names
the setting, the experiment/row/stage, both values and the source. `where` narrows an entry to
rows (`rows: [label, ...]`) and stages (`stages: [name, ...]`; `train` is a row without stages,
`final` a row's last stage, `first` its first); an entry may also `skip_missing: true` for a key
that exists on some of the stages it names (e.g. a MultiTask stage's per-task keys).

Besides config keys, `key` may name a value the plan derives (embedkit/recipes/plan.py):
`global_batch` (per-device batch x devices x nodes), `negatives_per_query` (hard + in-batch +
cross-device), `init` (`pretrained <name>`, `stage <name>` or `random`), `steps` (`N steps` or
`N epochs`), `sources` (each source's file pattern or function).

    python -m embedkit.recipes.fidelity            # check every paper's table; exit 1 on a mismatch
    python -m embedkit.recipes.fidelity --papers bge
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from omegaconf import DictConfig, OmegaConf

from embedkit.config import CONFIG_DIR, REPO_ROOT
from embedkit.recipes.plan import devices_of, get
from embedkit.recipes.rows import ablation_rows, row_config, scale_problems, stage_config
from embedkit.reporting.fidelity import TABLE, FidelityTableError, Setting, load  # noqa: F401  (the table's format)

EXPERIMENTS_DIR = REPO_ROOT / "experiments"
DERIVED = ("global_batch", "negatives_per_query", "init", "steps", "sources")


def tables(root: Path = EXPERIMENTS_DIR, papers: list[str] | None = None) -> dict[str, Path]:
    """{paper: its fidelity.yaml} under experiments/."""
    found = {p.parent.name: p for p in sorted(Path(root).glob(f"*/{TABLE}"))}
    if papers is not None:
        missing = sorted(set(papers) - set(found))
        if missing:
            raise FidelityTableError(f"no {TABLE} for {missing} under {root}; have {sorted(found)}")
        found = {p: found[p] for p in papers}
    return found


# ---------------------------------------------------------------- the composed stages

def compose_paper(experiment: str, config_dir: Path = CONFIG_DIR, overrides: tuple[str, ...] = ()) -> DictConfig:
    """conf/train.yaml with `+experiment=NAME scale=paper`, as `python run.py` composes it."""
    from embedkit.reporting.experiments import compose_experiment

    return compose_experiment(experiment, config_dir, overrides=["scale=paper", *overrides])


def paper_experiments(paper: str, config_dir: Path = CONFIG_DIR) -> list[str]:
    """The experiments whose `report.paper` is `paper`: a paper's table must cover all of them."""
    from embedkit.reporting.experiments import load as load_experiments

    return [e.name for e in load_experiments(config_dir) if e.paper == paper]


@dataclass
class Stage:
    experiment: str
    row: str
    stage: str            # the stage's name, or "train" for a row without stages
    cfg: DictConfig
    first: bool
    final: bool
    previous: str | None

    def matches(self, s: Setting) -> bool:
        if self.experiment not in s.experiments:
            return False
        if s.rows is not None and self.row not in s.rows:
            return False
        if s.stages is None:
            return True
        return (self.stage in s.stages or ("final" in s.stages and self.final)
                or ("first" in s.stages and self.first))

    @property
    def label(self) -> str:
        return f"{self.experiment} / row {self.row!r} / stage {self.stage}"


def stages(experiment: str, cfg: DictConfig) -> Iterator[Stage]:
    """Every (row, stage) of a composed experiment, configured as the recipe configures it; none
    for an experiment the run refuses at this scale (`experiment_scales`, e.g. a mini-only control)."""
    if scale_problems(cfg):
        return
    for row in ablation_rows(cfg):
        row_cfg = row_config(cfg, row["overrides"])
        chain = list(row["stages"] or [None])
        previous = None
        for i, name in enumerate(chain):
            init = f"<stage {previous}>" if previous is not None else None
            yield Stage(experiment, row["label"], name or "train", stage_config(row_cfg, name, init),
                        first=i == 0, final=i == len(chain) - 1, previous=previous)
            previous = name


# ---------------------------------------------------------------- resolved values

_MISSING = object()


def value(stage: Stage, key: str) -> Any:
    """The stage's resolved value at `key` (a config key or a DERIVED name); _MISSING if absent."""
    cfg = stage.cfg
    if key == "init":
        if stage.previous is not None:
            return f"stage {stage.previous}"
        init = get(cfg.model, "init_from")
        if init:
            return f"saved {init}"
        if get(cfg.model, "name") == "tiny_zh":
            return "random"
        return f"pretrained {get(cfg.model, 'name_or_path')}"
    if key == "steps":
        max_steps = int(get(cfg.trainer, "max_steps", -1) or -1)
        return f"{max_steps} steps" if max_steps > 0 else f"{get(cfg.trainer, 'max_epochs', 1)} epochs"
    if key in ("global_batch", "negatives_per_query"):
        if get(cfg.data, "batch_size") is None:
            return _MISSING   # a MultiTask stage: per task, data.tasks.<name>.batch_size
        _, devices = devices_of(cfg.trainer)
        world = None if devices is None else devices * int(get(cfg.trainer, "num_nodes", 1) or 1)
        batch = int(get(cfg.data, "batch_size", 0) or 0)
        if world is None:
            return "unknown (devices at launch)"
        if key == "global_batch":
            return batch * world
        group = int(get(cfg.data, "train_group_size", 1) or 1)
        cross = bool(get(cfg.objective, "negatives_cross_device", False))
        return batch * group * (world if cross else 1) - 1
    if key == "sources" or key.endswith(".sources") and key.split(".")[0] == "data":
        node = OmegaConf.select(cfg, key if key != "sources" else "data.sources", default=None)
        if node is None:
            return _MISSING
        # paths under the paper data folder are shown relative to it: the table is machine-independent
        root = str(get(cfg, "paths.paper_data_dir", "")) or None
        return [_source_text(s, root) for s in OmegaConf.to_container(node, resolve=True)]
    found = OmegaConf.select(cfg, key, default=_MISSING, throw_on_missing=False)
    if found is _MISSING:
        return _MISSING
    return get(cfg, key)


def _source_text(src: dict, paper_data_dir: str | None) -> str:
    text = str(src.get("_target_", src)).rsplit(".", 1)[-1]
    if src.get("pattern"):
        where = str(src["pattern"])
        if paper_data_dir and where.startswith(paper_data_dir.rstrip("/") + "/"):
            where = "${paths.paper_data_dir}" + where[len(paper_data_dir.rstrip("/")):]
        return f"{text} {where}"
    if src.get("file"):
        return f"{text} {src['file']}"
    return text


def same(expected: Any, actual: Any) -> bool:
    if isinstance(expected, bool) or isinstance(actual, bool):
        return expected is actual or expected == actual and type(expected) is type(actual)
    if isinstance(expected, (int, float)) and isinstance(actual, (int, float)):
        return math.isclose(float(expected), float(actual), rel_tol=1e-12, abs_tol=0.0)
    if isinstance(expected, (list, tuple)) and isinstance(actual, (list, tuple)):
        return len(expected) == len(actual) and all(same(e, a) for e, a in zip(expected, actual))
    return expected == actual


# ---------------------------------------------------------------- the check

def check(path: Path, config_dir: Path = CONFIG_DIR) -> list[str]:
    """Every mismatch between one fidelity.yaml and the composed `scale=paper` experiments."""
    settings = load(path)
    problems: list[str] = []
    composed: dict[str, list[Stage]] = {}
    for s in settings:
        for name in s.experiments:
            if name not in composed:
                if not (Path(config_dir) / "experiment" / f"{name}.yaml").is_file():
                    problems.append(f"{s.where}: no experiment {name!r} (conf/experiment/{name}.yaml)")
                    composed[name] = []
                    continue
                composed[name] = list(stages(name, compose_paper(name, config_dir)))
        matched = [st for name in s.experiments for st in composed[name] if st.matches(s)]
        if not matched:
            problems.append(f"{s.where}: `where` matches no row or stage of {s.experiments}")
        for st in matched:
            actual = value(st, s.key)
            if actual is _MISSING:
                if not s.skip_missing:
                    problems.append(f"{s.setting}: {st.label} has no `{s.key}` ({s.where})")
                continue
            if not same(s.expected, actual):
                what = "ours (a stated deviation)" if s.has_ours else "paper"
                problems.append(f"{s.setting}: {st.label}: `{s.key}` is {actual!r}, {what} {s.expected!r} "
                                f"(source: {s.source}; {s.where})")
    return problems


#: The settings that decide a stage's result: each one a stage has must have a fidelity entry, so
#: that `scale=paper` cannot silently keep a mini value (a MultiTask stage has them per task).
DECIDING = ("init", "global_batch", "objective.lr", "objective.warmup_ratio",
            "objective.optimizer.weight_decay", "objective.temperature", "data.train_group_size",
            "data.query_max_len", "data.passage_max_len", "data.max_len", "sources", "trainer.precision",
            "steps", "data.query_instruction")
PER_TASK = ("batch_size", "train_group_size", "query_max_len", "passage_max_len", "max_len", "sources",
            "query_instruction")


def deciding_keys(stage: Stage) -> list[str]:
    keys = [k for k in DECIDING if value(stage, k) is not _MISSING]
    if "objective.temperature" in keys:
        keys.append("negatives_per_query")
    if get(stage.cfg, "data.tasks"):
        keys += ["trainer.devices", "trainer.num_nodes"]   # the global batch of each task
    for task in (get(stage.cfg, "data.tasks", {}) or {}):
        keys += [f"data.tasks.{task}.{k}" for k in PER_TASK
                 if value(stage, f"data.tasks.{task}.{k}") is not _MISSING]
    if stage.final:
        keys.append("eval.query_instruction")
    return keys


def uncovered(path: Path, experiments: list[str], config_dir: Path = CONFIG_DIR) -> list[str]:
    """Each (experiment, row, stage, deciding key) of `experiments` at scale=paper that no entry of
    the table checks."""
    settings = load(path)
    out = []
    for name in experiments:
        for st in stages(name, compose_paper(name, config_dir)):
            keys = {s.key for s in settings if st.matches(s)}
            out += [f"{st.label}: `{k}` has no entry in {Path(path).name}" for k in deciding_keys(st) if k not in keys]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--papers", nargs="*", default=None, help="default: every experiments/*/fidelity.yaml")
    args = parser.parse_args(argv)
    failed = 0
    for paper, path in tables(papers=args.papers).items():
        problems = check(path)
        print(f"{paper}: {len(load(path))} settings, " + (f"{len(problems)} mismatch(es)" if problems else "all match"))
        for p in problems:
            print(f"  - {p}")
        failed += bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
