"""Train, evaluate, tabulate: the whole run, top to bottom.

1. Resolve the rows to run. An experiment lists ablation rows per scale (e.g. batch sizes); a
   plain run or one job of a `-m` sweep is a single row.
2. Read the training data once and build the tokenizer from it (a character vocabulary for
   `model=tiny_zh`, the checkpoint's own for `model=hf`).
3. Per row: seed, build a fresh encoder, wrap it in the objective's LightningModule, train with
   the configured Trainer and logger.
4. Per row: evaluate on the configured suite (mini C-MTEB through mteb by default) and write
   `results.json` and the encoder into the row's folder.
5. Write the table (Markdown + CSV) and print it beside the paper's table.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)


def ablation_rows(cfg: DictConfig) -> list[dict]:
    """[{label, paper_row, overrides}] for this invocation."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    rows = (cfg.get("ablation") or {}).get("rows", {}).get(cfg.scale.name) if cfg.get("ablation") else None
    if multirun or not rows:
        label = "run"
        if HydraConfig.initialized() and HydraConfig.get().job.override_dirname:
            label = HydraConfig.get().job.override_dirname
        return [{"label": label, "paper_row": None, "overrides": {}}]
    return [OmegaConf.to_container(r, resolve=False) for r in rows]


def row_config(cfg: DictConfig, overrides: dict) -> DictConfig:
    row_cfg = cfg.copy()
    with open_dict(row_cfg):
        for key, value in overrides.items():
            OmegaConf.update(row_cfg, key, value, merge=False)
    return row_cfg


def make_logger(cfg: DictConfig, row_label: str, row_dir: Path):
    if cfg.get("logger") is None:
        return False
    target = cfg.logger.get("_target_", "")
    if target.endswith("WandbLogger"):
        # W&B reads its mode from the environment too; offline must hold without a key or network.
        import os

        if cfg.logger.get("offline", True):
            os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_SILENT", "true")
        return instantiate(cfg.logger, name=f"{cfg.experiment_name}/{row_label}",
                           save_dir=str(row_dir))
    return instantiate(cfg.logger, save_dir=str(row_dir))


def safe_label(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=,+-]+", "_", str(label)) or "run"


def train_and_evaluate(cfg: DictConfig, row: dict, tokenizer, examples, out_dir: Path,
                       suite) -> dict:
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import LearningRateMonitor

    row_cfg = row_config(cfg, row["overrides"])
    pl.seed_everything(row_cfg.seed, workers=True, verbose=False)

    data = instantiate(row_cfg.data)
    data.use_examples(examples)
    data.attach_tokenizer(tokenizer)
    encoder = instantiate(row_cfg.model.encoder, tokenizer=tokenizer)
    module = instantiate(row_cfg.objective, encoder=encoder)

    logger = make_logger(row_cfg, row["label"], out_dir)
    if logger:
        logger.log_hyperparams(OmegaConf.to_container(row_cfg, resolve=True))
    callbacks = [LearningRateMonitor(logging_interval="step")] if logger else []
    trainer = instantiate(row_cfg.trainer, logger=logger, callbacks=callbacks)

    log.info("row %s: training %s with %s", row["label"], row_cfg.model.name,
             row_cfg.objective._target_.rsplit(".", 1)[-1])
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    train_seconds = time.perf_counter() - start

    encoder.save_pretrained(out_dir / "model")
    start = time.perf_counter()
    results = suite.evaluate(encoder, model_name=f"embedkit/{cfg.experiment_name}",
                             revision=safe_label(row["label"]), output_dir=out_dir)
    eval_seconds = time.perf_counter() - start

    results.update({
        "label": row["label"], "paper_row": row.get("paper_row"), "overrides": row["overrides"],
        "scale": cfg.scale.name, "steps": int(trainer.global_step),
        "train_seconds": round(train_seconds, 1), "eval_seconds": round(eval_seconds, 1),
        "final_train_loss": _final(trainer, "train/loss"),
    })
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False),
                                          encoding="utf-8")
    if logger:
        logger.log_metrics({f"eval/{k}": v for k, v in results.get("categories", {}).items()}
                           | {"eval/Avg": results.get("Avg")}, step=int(trainer.global_step))
        if hasattr(logger, "experiment") and type(logger).__name__ == "WandbLogger":
            logger.experiment.finish()
    return results


def _final(trainer, key: str):
    value = trainer.callback_metrics.get(key)
    return None if value is None else float(value)


def run(cfg: DictConfig) -> float | None:
    from embedkit.reporting.tables import row_from_results, side_by_side, write_table

    out_dir = Path(cfg.paths.output_dir)
    rows = ablation_rows(cfg)

    data = instantiate(cfg.data)
    examples = data.examples
    tokenizer = instantiate(cfg.model.tokenizer, texts=data.vocab_texts(),
                            out_dir=str(out_dir / "tokenizer"))
    suite = instantiate(cfg.eval)

    table_rows, last = [], None
    for row in rows:
        row_dir = out_dir if len(rows) == 1 else out_dir / "rows" / safe_label(row["label"])
        row_dir.mkdir(parents=True, exist_ok=True)
        results = train_and_evaluate(cfg, row, tokenizer, examples, row_dir, suite)
        table_rows.append(row_from_results(row["label"], results))
        last = results.get("Avg")

    ablation = cfg.get("ablation") or {}
    first = ablation.get("column", "run")
    markdown = write_table(table_rows, out_dir, first=first)
    title = f"embedkit {cfg.experiment_name} ({cfg.scale.name} scale, {suite.name})"
    report = side_by_side(markdown, title, ablation.get("paper_table"),
                          ablation.get("paper_title", "Paper"))
    print("\n" + report + "\n")
    print(f"Tables written to {out_dir}/table.md and table.csv")
    return last
