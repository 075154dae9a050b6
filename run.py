"""embedkit's entry point: `python run.py +experiment=bge_ablation_batchsize [overrides]`.

Kept thin on purpose: Hydra composes `conf/`, the recipe in embedkit/recipes/train_eval.py does
the work. Heavy libraries (Lightning, mteb, wandb) are imported inside the recipe, so `--help`
and config errors answer fast.
"""

import os

# On small shared machines, OpenMP threads that spin while waiting made the same training steps
# swing from 3 s to 50 s; passive waiting keeps them steady. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

import embedkit.config  # noqa: F401  registers the ${embedkit_root:} resolver


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from embedkit import console
    from embedkit.recipes.recovery import guarded
    from embedkit.recipes.train_eval import run

    # After Hydra's logging setup: warnings to run.log, third-party noise off the console.
    console.setup()

    # In a `-m` sweep a failing job records its error in its results.json and the sweep goes on.
    return guarded(run, cfg)


if __name__ == "__main__":
    main()
