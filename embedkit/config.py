"""Hydra/OmegaConf glue shared by `run.py` and the tests: the config folder and our resolvers.

A bottom-layer module (tests/test_layers.py): it imports only embedkit.folders and
embedkit.provenance, so any entry point (`run.py`, `python -m embedkit.mining`, the report) may
import it to register the resolvers.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "conf"


def register_resolvers() -> None:
    # `${embedkit_root:}` lets configs name files relative to the checkout, whatever the cwd.
    if not OmegaConf.has_resolver("embedkit_root"):
        OmegaConf.register_new_resolver("embedkit_root", lambda: str(REPO_ROOT))
    # `${embedkit_run_dir:base,fresh,${resume}}`: Hydra's run/sweep folder, the newest one under
    # `base` when resuming (embedkit/folders.py).
    if not OmegaConf.has_resolver("embedkit_run_dir"):
        def run_dir(base, fresh, resume=False):
            from embedkit.folders import run_dir as resolve

            return resolve(str(base), str(fresh), resume)

        OmegaConf.register_new_resolver("embedkit_run_dir", run_dir, use_cache=True)
    # `${embedkit_job_subdir:${hydra.sweep.dir},${hydra.job.num},${hydra.overrides.task}}`: a sweep
    # job's folder, found by its overrides (a resumed sweep's jobs land where they ran before).
    if not OmegaConf.has_resolver("embedkit_job_subdir"):
        def job_subdir(sweep_dir, num, overrides):
            from embedkit.folders import job_subdir as resolve

            return resolve(str(sweep_dir), num, list(overrides))

        OmegaConf.register_new_resolver("embedkit_job_subdir", job_subdir)
    # `${embedkit_hydra_subdir:${hydra.runtime.output_dir}}`: `.hydra`, or `.hydra/resumed/<time>`
    # when resuming, so the configs of the run that made the results are kept.
    if not OmegaConf.has_resolver("embedkit_hydra_subdir"):
        def hydra_subdir(output_dir):
            from embedkit.folders import hydra_subdir as resolve

            return resolve(str(output_dir))

        OmegaConf.register_new_resolver("embedkit_hydra_subdir", hydra_subdir)
    # `${embedkit_widths:${model.encoder.hidden_size},[8,4,2,1]}` -> [16, 32, 64, 128] for a 128-wide
    # model: Matryoshka widths that follow the model's width (debug=smoke's 32-wide model too).
    if not OmegaConf.has_resolver("embedkit_widths"):
        def widths(width, divisors):
            width = int(width)
            bad = [d for d in divisors if int(d) < 1 or width % int(d)]
            if bad:
                raise ValueError(f"embedkit_widths: {width} is not divisible by {bad}")
            return [width // int(d) for d in divisors]

        OmegaConf.register_new_resolver("embedkit_widths", widths)
    # `${by_scale:{mini: 3e-4, paper: 1e-5}}`: the value for the run's scale (`scale.name`,
    # conf/scale/). Experiments write every per-scale setting this way, both values side by side, so
    # `scale=paper` never inherits a mini value and a command-line override still wins.
    if not OmegaConf.has_resolver("by_scale"):
        def by_scale(values, *, _root_):
            from omegaconf import DictConfig, ListConfig

            name = OmegaConf.select(_root_, "scale.name")
            if not isinstance(values, (dict, DictConfig)):
                raise ValueError(f"by_scale takes {{scale: value, ...}}, got {values!r}")
            if name not in values:
                raise ValueError(f"by_scale: no value for scale {name!r} (has {sorted(values)}); "
                                 f"add `{name}: ...` to the setting")
            value = values[name]
            if isinstance(value, (DictConfig, ListConfig)):
                value = OmegaConf.to_container(value, resolve=True)
            return value

        OmegaConf.register_new_resolver("by_scale", by_scale)
    # `${embedkit_git_commit:}`: the checkout's commit ("unknown" outside git), for W&B tags.
    if not OmegaConf.has_resolver("embedkit_git_commit"):
        def commit():
            from embedkit.provenance import git_commit

            return git_commit(REPO_ROOT)

        OmegaConf.register_new_resolver("embedkit_git_commit", commit, use_cache=True)


register_resolvers()
