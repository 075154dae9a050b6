"""Checks made before any training data is read, so that a run that cannot finish fails in seconds.

Why: the recipe reads every stage's training data, trains the stages of every ablation row and only
then evaluates. A value of the wrong type, a Matryoshka width the encoder does not have, a
read-only cache folder or a broken evaluation file used to surface after that work, possibly after
several rows had trained. `preflight(cfg, rows, suite)` checks, in this order:

1. the config, per row and stage exactly as the recipe will build it (`row_config`,
   `stage_config`): every value of every `_target_` node the run instantiates (`data` and its
   sources, `objective` and nested objectives such as Matryoshka's `inner`, `model.encoder`,
   `model.tokenizer`, the stage's `callbacks`, `trainer`, `logger`, `eval`) against the type hints
   of the target's signature (embedkit/recipes/signatures.py), and unknown argument names;
2. Matryoshka widths (an objective's `embedding_width_args`, e.g. `dims`, `mrl_dims`) against the
   encoder's output width (`model.encoder.projection_dim`, else `model.encoder.hidden_size`);
3. that `model.init_from`, when set, is a saved encoder (the mini base by default), and that
   `paths.output_dir` and `paths.cache_dir` take a file (created and deleted again);
4. the evaluation suite (`suite.check()`): for the mini C-MTEB, every selected task folder is read
   and decoded now and the loaded tasks stay cached in the suite, so evaluation does not read
   them again.

Steps 1-3 read no data; their problems are reported together, so one run shows all of them.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

from embedkit.recipes.signatures import check_node, target_nodes
from embedkit.recipes.rows import row_config, scale_problems, stage_config

#: The parts of a stage's config that the recipe instantiates (`eval` is checked once, per run).
STAGE_PARTS = ("data", "objective", "model", "callbacks", "trainer", "logger", "checks")
#: The parts a stage replaces whole (`stage_config`); its trainer/model tweaks merge into the run's.
STAGE_OWN = ("data", "objective", "callbacks")


class ConfigError(ValueError):
    """The run's config cannot work; the message names the key (or file) and what is wrong."""


def preflight(cfg: DictConfig, rows: Sequence[dict], suite: Any) -> None:
    """Raise ConfigError naming every problem found before training; return None if there is none."""
    problems = scale_problems(cfg)
    if not problems:   # an experiment not offered at this scale has nothing else worth checking
        problems = config_problems(cfg, rows) + init_problems(cfg) + folder_problems(cfg)
    if problems:
        raise ConfigError(_report(problems))
    check = getattr(suite, "check", None)
    if callable(check):
        try:
            check()
        except (ValueError, OSError) as err:   # TaskDataError and a missing bundle name their file
            raise ConfigError(_report([f"eval ({getattr(suite, 'name', 'suite')}): {err}"])) from err


def _report(problems: list[str]) -> str:
    if len(problems) == 1:
        return f"run stopped before training: {problems[0]}"
    return "run stopped before training:\n" + "\n".join(f"  - {p}" for p in problems)


# ---------------------------------------------------------------- the config

def config_problems(cfg: DictConfig, rows: Sequence[dict]) -> list[str]:
    """Type and width problems of every node the run builds, for every row and stage.

    A problem that only some rows have names them ("(rows: 128, 512)"); one that every row shares
    is listed once without.
    """
    seen: dict[str, list[str]] = {}
    for row in rows:
        row_cfg = row_config(cfg, row.get("overrides") or {})
        for stage in row.get("stages") or [None]:
            try:
                stage_cfg = stage_config(row_cfg, stage, None)
            except KeyError as err:
                found = [str(err.args[0]) if err.args else str(err)]
            else:
                found = _stage_problems(stage_cfg, stage)
            for problem in found:
                labels = seen.setdefault(problem, [])
                if row["label"] not in labels:
                    labels.append(row["label"])
    if "eval" in cfg and isinstance(cfg.eval, DictConfig) and "_target_" in cfg.eval:
        for problem in check_node(cfg.eval, "eval"):
            seen.setdefault(problem, [r["label"] for r in rows])
    every = [r["label"] for r in rows]
    return [p if labels == every or len(every) == 1 else f"{p} (row{'s' if len(labels) > 1 else ''}: "
            f"{', '.join(map(str, labels))})" for p, labels in seen.items()]


def _stage_problems(cfg: DictConfig, stage: str | None) -> list[str]:
    problems: list[str] = []
    skip_tokenizer = bool((cfg.get("model") or {}).get("init_from"))   # its own tokenizer comes along
    for part in STAGE_PARTS:
        node = cfg.get(part)
        if not OmegaConf.is_config(node):
            continue
        # A stage's objective, data and callbacks are written under `stages.<name>.`: name them so.
        staged = stage is not None and part in STAGE_OWN
        prefix = f"stages.{stage}.{part}" if staged else part
        for key, sub in target_nodes(node, prefix):
            if skip_tokenizer and key == "model.tokenizer":
                continue
            problems += check_node(sub, key)
    problems += _width_problems(cfg, stage)
    return problems


def _width_problems(cfg: DictConfig, stage: str | None) -> list[str]:
    """Matryoshka widths wider than the encoder's embeddings (they fail only once training starts)."""
    from hydra.utils import get_object

    encoder = (cfg.get("model") or {}).get("encoder") or {}
    width, source = encoder.get("projection_dim"), "model.encoder.projection_dim"
    if width is None:
        width, source = encoder.get("hidden_size"), "model.encoder.hidden_size"
    if not isinstance(width, int) or isinstance(width, bool):
        return []   # a hub checkpoint's width is in its own config; the type check covers the rest
    prefix = f"stages.{stage}.objective" if stage is not None else "objective"
    problems = []
    node = cfg.get("objective")
    for key, sub in target_nodes(node, prefix) if OmegaConf.is_config(node) else ():
        try:
            target = get_object(str(sub._target_))
        except Exception:   # noqa: BLE001  reported by the type check
            continue
        for arg in getattr(target, "embedding_width_args", ()):
            dims = sub.get(arg)
            dims = OmegaConf.to_container(dims, resolve=True) if OmegaConf.is_config(dims) else dims
            if not isinstance(dims, list):
                continue
            wide = [d for d in dims if isinstance(d, int) and d > width]
            if wide:
                problems.append(f"{key}.{arg}: {dims} go beyond the encoder's output width {width} "
                                f"({source}); drop {wide} or widen the encoder "
                                f"(model.encoder.projection_dim)")
    return problems


# ---------------------------------------------------------------- folders

def init_problems(cfg: DictConfig) -> list[str]:
    """`model.init_from` must be a saved encoder: the mini scale's default is the committed base."""
    model = cfg.get("model") or {}
    init = model.get("init_from")
    if not init:
        return []
    if not (Path(str(init)) / "model.safetensors").is_file():
        hint = (" (the mini base: `make base` rebuilds it, conf/experiment/mini_base.yaml; "
                "model.init_from=null trains from scratch)" if Path(str(init)).name == "zh_mini_base" else "")
        return [f"model.init_from: {init} holds no model.safetensors{hint}"]
    return []


def folder_problems(cfg: DictConfig) -> list[str]:
    """The run folder and the cache folder must take files: tried with a temp file, then deleted."""
    paths = cfg.get("paths") or {}
    problems = []
    for key, env in (("output_dir", None), ("cache_dir", "EMBEDKIT_CACHE_DIR")):
        if paths.get(key) is None:
            continue
        where = f"paths.{key}" + (f" / {env}" if env else "")
        problem = unwritable(Path(str(paths[key])))
        if problem:
            problems.append(f"{where}: cannot write to {paths[key]} ({problem})")
    return problems


def unwritable(folder: Path) -> str | None:
    """Why a file cannot be created in `folder` (made if missing), or None if one can."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".embedkit-write-check-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        return f"{type(err).__name__}: {err.strerror or err}"
    return None
