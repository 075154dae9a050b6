"""embedkit's entry point: `python run.py +experiment=bge_ablation_batchsize [overrides]`.

Kept thin on purpose: Hydra composes `conf/`, the recipe in embedkit/recipes/train_eval.py does
the work. Heavy libraries (Lightning, mteb, wandb) are imported inside the recipe, so `--help`
and config errors answer fast.
"""

import hydra
from omegaconf import DictConfig

import embedkit.config  # noqa: F401  registers the ${embedkit_root:} resolver


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from embedkit.recipes.train_eval import run

    return run(cfg)


if __name__ == "__main__":
    main()
