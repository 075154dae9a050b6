"""Hydra/OmegaConf glue shared by `run.py` and the tests: the config folder and our resolvers."""

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
    # `base` when resuming (embedkit/recipes/recovery.py).
    if not OmegaConf.has_resolver("embedkit_run_dir"):
        def run_dir(base, fresh, resume=False):
            from embedkit.recipes.recovery import run_dir as resolve

            return resolve(str(base), str(fresh), resume)

        OmegaConf.register_new_resolver("embedkit_run_dir", run_dir)
    # `${embedkit_git_commit:}`: the checkout's commit ("unknown" outside git), for W&B tags.
    if not OmegaConf.has_resolver("embedkit_git_commit"):
        def commit():
            from embedkit.provenance import git_commit

            return git_commit(REPO_ROOT)

        OmegaConf.register_new_resolver("embedkit_git_commit", commit, use_cache=True)


register_resolvers()
