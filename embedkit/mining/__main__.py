"""`python -m embedkit.mining [overrides]`: filter and mine a FlagEmbedding jsonl (conf/mine.yaml).

Examples:
  python -m embedkit.mining                                      # zh-mini task data, fresh tiny_zh
  python -m embedkit.mining model.init_from=logs/.../model miner.range_for_sampling=2-200
  python -m embedkit.mining +filter@filters.teacher=teacher filters.teacher.model_path=/path/bge-large-zh-v1.5
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # as run.py: steady timings on small machines

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

import embedkit.config  # noqa: F401,E402  registers the ${embedkit_root:} resolver


@hydra.main(version_base="1.3", config_path="../../conf", config_name="mine")
def main(cfg: DictConfig) -> None:
    from embedkit.mining.pipeline import run

    run(cfg)


if __name__ == "__main__":
    main()
