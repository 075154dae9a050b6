"""Rows and stages as the recipe runs them: which rows an invocation has, and each one's config.

- `ablation_rows`: an experiment's rows for the current scale (`ablation.rows.<scale>`), or one
  row for a plain run or a `-m` sweep job.
- `row_config`: the run's config with a row's `overrides` applied.
- `scale_problems`: an experiment offered at some scales only (`experiment_scales`) run at another.
- `stage_config`: a row's config with one stage's parts (`stages.<name>.objective`, `.data`,
  `.callbacks`, `.instruction`, trainer/model tweaks) swapped in.

The recipe (embedkit/recipes/train_eval.py) and its checks before training
(embedkit/recipes/preflight.py) both build rows and stages with these, so both see one config.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf, open_dict

from embedkit.redact import redact_text


def ablation_rows(cfg: DictConfig) -> list[dict]:
    """[{label, paper_row, overrides, stages}] for this invocation."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_on = HydraConfig.initialized()
    multirun = hydra_on and HydraConfig.get().mode == RunMode.MULTIRUN
    ablation = cfg.get("ablation") or {}
    rows = (ablation.get("rows") or {}).get(cfg.scale.name)
    if multirun or not rows:
        label = (HydraConfig.get().job.override_dirname if hydra_on else "") or "run"
        label = redact_text(label)   # it names folders and mteb revisions: no `api_key=...` in them
        return [{"label": label, "paper_row": None, "overrides": {}, "stages": None}]
    out = []
    for r in rows:
        row = OmegaConf.to_container(r, resolve=False)
        row.setdefault("overrides", {})
        row["stages"] = list(row.get("stages") or []) or None
        out.append(row)
    return out


def row_config(cfg: DictConfig, overrides: dict) -> DictConfig:
    row_cfg = cfg.copy()
    with open_dict(row_cfg):
        for key, value in overrides.items():
            OmegaConf.update(row_cfg, key, value, merge=False)
    return row_cfg


def stage_config(row_cfg: DictConfig, stage: str | None, init_from: str | None) -> DictConfig:
    """The row's config with one stage's objective, data, callbacks and instruction swapped in (and
    its trainer/model tweaks)."""
    cfg = row_cfg.copy()
    with open_dict(cfg):
        if stage is not None:
            if stage not in (cfg.get("stages") or {}):
                raise KeyError(f"row uses stage {stage!r}, but `stages` defines {list(cfg.get('stages') or {})}")
            spec = cfg.stages[stage]
            cap = cfg.data.get("max_examples")
            cfg.objective = spec.objective
            cfg.data = spec.data
            if cap and not cfg.data.get("max_examples"):
                cfg.data.max_examples = cap   # a cap on the run (debug=smoke) caps every stage
            for part in ("trainer", "model"):
                if spec.get(part) is not None:
                    cfg[part] = OmegaConf.merge(cfg[part], spec[part])
            if "callbacks" in spec:
                cfg.callbacks = spec.callbacks   # a stage's own training callbacks (e.g. DHNM)
            if spec.get("instruction") is not None:
                # The stage's query instruction (conf/instruction/), which its data and the eval
                # read as ${instruction.query}; a stage without one keeps the run's.
                cfg.instruction = spec.instruction
        if init_from is not None:
            cfg.model.init_from = init_from
    return cfg


def scale_problems(cfg: DictConfig) -> list[str]:
    """An experiment offered at some scales only (`experiment_scales`, e.g. the mini base) refuses
    the others, instead of running there on settings that were never meant for them."""
    offered = cfg.get("experiment_scales")
    name = (cfg.get("scale") or {}).get("name")
    if offered and name not in offered:
        return [f"experiment {cfg.get('experiment_name')!r} is offered at scale={'/'.join(offered)} "
                f"only, not scale={name} (experiment_scales)"]
    return []
