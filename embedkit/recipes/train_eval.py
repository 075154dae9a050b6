"""Train, evaluate, tabulate: the whole run, top to bottom.

1. Resolve the rows to run. An experiment lists ablation rows per scale (e.g. batch sizes); a
   plain run or one job of a `-m` sweep is a single row. A row may be a chain of stages
   (RetroMAE, then general fine-tuning, then task fine-tuning): each stage's encoder initialises
   the next through `model.init_from`.
2. Read every stage's training data once and build one tokenizer from it (a character vocabulary
   for `model=tiny_zh`, the checkpoint's own for `model=hf`), so all stages share an id space.
3. Per stage: seed, build a fresh encoder (or load the previous stage's), wrap it in the stage
   objective's LightningModule, train with the configured Trainer and logger. A stage already
   trained by an earlier row with the same settings is reused, not retrained.
4. Per row: evaluate the final encoder on the configured suite (mini C-MTEB through mteb by
   default), once per variant the objective names (Matryoshka dims, M3 retrieval modes), and write
   `results.json` and the encoder into the row's folder.
5. Write the table (Markdown + CSV) and print it beside the paper's table; with eval.lexical_floor,
   the table ends with the lexical floor's row (embedkit/eval/lexical.py), scored before training.

With `seeds=N` (N > 1) steps 3-4 run N times per row, with seed = seed + k, each seed in its own
folder (`<row>/seed-<s>/`, its stages too: the seed is part of a stage's key); the row's
results.json then holds the means with every seed's scores and their spread
(embedkit/reporting/seeds.py), and the table shows "mean ± std". Every seed is evaluated on the same
tasks and rows (`eval.seed` stays the run's), so the spread is the training's.

A killed run restarted with `resume=true` runs in the same folder: rows with a clean results.json
are kept, and the interrupted stage continues from its last checkpoint (embedkit/recipes/recovery.py,
embedkit/checkpointing.py). Rows that skipped bad training rows (`data.on_bad_row=skip`) say so in
results.json (`bad_rows`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Callable, Iterable

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from embedkit import runs
from embedkit.folders import claim
from embedkit.recipes.recovery import check_seed_layout, check_settings, finished_results, variant_results
from embedkit.recipes.rows import ablation_rows, row_config, scale_problems, stage_config
from embedkit.redact import redact, write_json
from embedkit.reporting.seeds import aggregate, seeds_of

log = logging.getLogger(__name__)
DONE = runs.DONE


# ---------------------------------------------------------------- rows and stages

RESULT_PARTS = ("objective", "data", "model", "trainer", "seed", "callbacks")
# Settings that change how a run looks, not what it computes: a resume may change them freely.
# The checks during training leave the training and the exported (last) model as they are.
COSMETIC = ("trainer.enable_progress_bar", "trainer.enable_model_summary", "trainer.log_every_n_steps",
            "data.num_workers", "eval.show_progress",
            # the table's lexical floor row and its cache: no row's results depend on them
            "eval.lexical_floor", "eval.cache_dir",
            *(f"eval.during_training.{k}" for k in ("every_n_steps", "tasks", "max_rows", "keep_best")))


def resolved_parts(cfg: DictConfig, keys=RESULT_PARTS) -> dict:
    # Resolved node by node, in place: their interpolations need the root, and other stages'
    # nodes may not resolve against this stage's objective.
    return {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
            for k in keys if k in cfg}


def stage_key(cfg: DictConfig) -> str:
    """What makes a stage's result: its objective, data, model, trainer, seed and initialisation."""
    return hashlib.sha1(json.dumps(resolved_parts(cfg), sort_keys=True, default=str).encode()).hexdigest()[:10]


def plan_row(cfg: DictConfig, row: dict, row_dir: Path, out_dir: Path, seed: int | None = None) -> list[dict]:
    """The row's chain of stages: [{stage, name, cfg, dir, final}], each initialised from the
    previous stage's model folder. The last stage trains in the row's folder; the others in
    `stages/<stage>-<key>/`, shared by every row whose chain reaches them with the same settings.

    `seed`: one seed of a row run with several (`seeds=N`); None: the row's own `seed`, alone."""
    row_cfg = row_config(cfg, row["overrides"])
    if seed is not None:
        with open_dict(row_cfg):
            if OmegaConf.is_dict(row_cfg.get("eval")) and "seed" in row_cfg.eval and seed != row_cfg.seed:
                # The suite is built once, with the run's seed: every seed is scored on the same rows.
                row_cfg.eval.seed = row_cfg.seed
            row_cfg.seed = seed
    chain = list(row["stages"] or [None])
    init, plan = row_cfg.model.get("init_from"), []
    for i, stage in enumerate(chain):
        stage_cfg = stage_config(row_cfg, stage, init)
        final = i == len(chain) - 1
        stage_dir = row_dir if final else runs.stage_dir(out_dir, stage, stage_key(stage_cfg))
        plan.append({"stage": stage, "cfg": stage_cfg, "dir": stage_dir, "final": final,
                     "name": f"{cfg.experiment_name}/{row['label']}" + (f"/{stage}" if stage else "")
                     + ("" if seed is None else f"/{runs.seed_dir('', seed).name}")})
        init = str(runs.model_dir(stage_dir))
    return plan


def planned(cfg: DictConfig, rows: list[dict], out_dir: Path) -> list[dict]:
    """`rows`, each given its folder (`dir`), its seeds (`by_seed`: [{seed, dir, plan}], one per seed
    of `seeds`; a one-seed row runs in its own folder) and the first seed's chain of stages (`plan`,
    see `plan_row`)."""
    for row in rows:
        row["dir"] = runs.row_dir(out_dir, row["label"], single=len(rows) == 1)
        seeds = seeds_of(row_config(cfg, row["overrides"]))
        if len(seeds) == 1:
            row["by_seed"] = [{"seed": seeds[0], "dir": row["dir"], "plan": plan_row(cfg, row, row["dir"], out_dir)}]
        else:
            row["by_seed"] = [{"seed": s, "dir": runs.seed_dir(row["dir"], s),
                               "plan": plan_row(cfg, row, runs.seed_dir(row["dir"], s), out_dir, seed=s)}
                              for s in seeds]
        row["plan"] = row["by_seed"][0]["plan"]
    return rows


def row_settings(plan: list[dict]) -> dict:
    """Every resolved setting that decides the row's results, flattened ('general/objective.lr')."""
    from embedkit.recipes.recovery import flat

    out = {}
    for p in plan:
        parts = resolved_parts(p["cfg"], RESULT_PARTS + (("eval",) if p["final"] else ()))
        prefix = f"{p['stage']}/" if p["stage"] else ""
        out.update({prefix + k: v for k, v in flat(parts).items() if k not in COSMETIC})
    return out


safe_label = runs.safe_label


# ---------------------------------------------------------------- one stage

def make_logger(cfg: DictConfig, name: str, save_dir: Path) -> list | bool:
    """The stage's loggers as a list for the Trainer, or False for none (`~logger`, `logger=null`).

    `logger` is one logger config (`_target_`: conf/logger/csv.yaml, wandb.yaml) or a dict of named
    logger configs, each instantiated (conf/logger/default.yaml: W&B and CSV); a named entry set to
    null is left out."""
    node = cfg.get("logger")
    if node is None:
        return False
    if not OmegaConf.is_dict(node):
        raise ValueError(f"logger: expected a logger config (with _target_) or a dict of them "
                         f"(conf/logger/default.yaml), got {node!r}")
    named = {"": node} if "_target_" in node else {k: v for k, v in node.items() if v is not None}
    loggers = []
    for key, sub in named.items():
        if not OmegaConf.is_dict(sub) or "_target_" not in sub:
            raise ValueError(f"logger.{key}: expected a logger config with _target_ (as in "
                             f"conf/logger/csv.yaml), got {OmegaConf.to_container(sub) if OmegaConf.is_config(sub) else sub!r}")
        loggers.append(_instantiate_logger(sub, name, save_dir))
    return loggers or False


def _instantiate_logger(node: DictConfig, name: str, save_dir: Path):
    if str(node.get("_target_", "")).endswith("WandbLogger"):
        # W&B also reads its mode from the environment; offline must hold without a key or network.
        if node.get("offline", True):
            os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_SILENT", "true")
        from embedkit.console import quiet_wandb

        quiet_wandb()
        return instantiate(node, name=name, save_dir=str(save_dir))
    return instantiate(node, save_dir=str(save_dir))


def finish_logger(loggers) -> None:
    """Flush `loggers` (a list, one logger, or False) and close their W&B runs, so the next
    stage's WandbLogger starts its own run instead of appending to this one."""
    for logger in loggers if isinstance(loggers, (list, tuple)) else [loggers]:
        if not logger:
            continue
        # The eval metrics come after fit's own flush: CSVLogger buffers them until save().
        logger.save()
        if type(logger).__name__ == "WandbLogger":
            logger.experiment.finish()


def build_stage(cfg: DictConfig, tokenizer):
    """The stage's encoder (initialised from `model.init_from` if set) wrapped in its objective."""
    from embedkit.models.build import init_encoder_from

    encoder = instantiate(cfg.model.encoder, tokenizer=tokenizer)
    if cfg.model.get("init_from"):
        init_encoder_from(encoder, cfg.model.init_from)
    return instantiate(cfg.objective, encoder=encoder)


def train_stage(cfg: DictConfig, name: str, tokenizer, examples: list[dict], out_dir: Path) -> dict:
    """Train one stage; returns {module, logger, seconds, record} (record: what model/.done holds)."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import LearningRateMonitor

    from embedkit.checkpointing import (CKPT_DIR, AtomicCheckpointIO, RngState, latest_checkpoint,
                                        step_checkpoint)
    from embedkit.console import StageProgress
    from embedkit.eval.callback import best_record
    from embedkit.eval.callback import from_config as eval_during_training
    from embedkit.models.export import export_sentence_transformers
    from embedkit.recipes.health import TrainingHealth
    from embedkit.recipes.model_card import stage_card

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    data = instantiate(cfg.data)
    data.use_examples(examples)
    data.attach_tokenizer(tokenizer)
    module = build_stage(cfg, tokenizer)

    logger = make_logger(cfg, name, out_dir)
    if logger:
        # This stage's config as it ran; the other stages' nodes are left out (they may not resolve
        # against this stage's objective).
        hparams = redact(OmegaConf.to_container(
            OmegaConf.masked_copy(cfg, [k for k in cfg if k != "stages"]), resolve=True))
        for one in logger:
            one.log_hyperparams(hparams)
    callbacks = [LearningRateMonitor(logging_interval="step")] if logger else []
    # `callbacks: {name: {_target_: ...}}` (conf/callbacks/): e.g. dynamic hard-negative mining.
    stage_callbacks = {k: instantiate(v) for k, v in (cfg.get("callbacks") or {}).items() if v is not None}
    health = instantiate(cfg.checks) if cfg.get("checks") else TrainingHealth()
    callbacks += list(stage_callbacks.values()) + [health]
    if cfg.trainer.get("enable_progress_bar", True):
        # Steps, loss, samples/s, ETA and a summary line; plain lines outside a terminal.
        callbacks.append(StageProgress(name))
    # eval.during_training: a subset of the suite every N steps (val/*), and the best check's weights.
    evaluator, best = eval_during_training(cfg, name, out_dir)
    every = int((cfg.get("checkpoint") or {}).get("every_n_train_steps") or 0)
    ckpt_dir, resume_from, extra = out_dir / CKPT_DIR, None, {}
    if evaluator is not None:
        callbacks.append(evaluator)
    if every > 0 or best is not None:
        extra = {"enable_checkpointing": True, "plugins": [AtomicCheckpointIO()]}
    if best is not None:
        callbacks.append(best)
    if every > 0:
        callbacks += [step_checkpoint(ckpt_dir, every), RngState()]
        resume_from = latest_checkpoint(ckpt_dir)
    # GradCache runs under manual optimisation: it takes clipping and accumulation from the trainer.
    trainer = instantiate(cfg.trainer, logger=logger, callbacks=callbacks, **extra,
                          **module.trainer_overrides(cfg.trainer))

    log.info("%s: training %s with %s%s", name, cfg.model.name,
             cfg.objective._target_.rsplit(".", 1)[-1],
             f" from {cfg.model.init_from}" if cfg.model.get("init_from") else "")
    if resume_from is not None:
        log.info("%s: resuming from %s", name, resume_from)
    start = time.perf_counter()
    trainer.fit(module, datamodule=data, ckpt_path=str(resume_from) if resume_from else None)
    seconds = time.perf_counter() - start
    health.verdict(name)   # no steps, all skipped, or all-zero losses: stop before exporting

    model_dir = runs.model_dir(out_dir)
    record = {"steps": int(trainer.global_step), "final_train_loss": _metric(trainer, "train/loss"),
              "train_seconds": round(seconds, 1), "training": health.summary(),
              "examples": _row_counts(examples), "epochs": _epochs(trainer)}
    if best_record(best) is not None:
        record["best"] = best_record(best)   # model/ below is the last step's, not the best's
    # save_pretrained's files plus sentence-transformers' module files and the model card:
    # `load_encoder(model_dir)` and `SentenceTransformer(model_dir)` both read the folder
    # (embedkit/models/export.py); a final stage's card gets its eval table once scored (`run`).
    export_sentence_transformers(module.encoder, model_dir, card=stage_card(cfg, name, record))
    module.save_extras(model_dir)
    for cb_name, cb in {**stage_callbacks, "eval_during_training": evaluator}.items():
        if hasattr(cb, "summary"):   # what the callback did (DHNM: refresh counts, score curves)
            write_json(runs.callback_summary(out_dir, cb_name), cb.summary())
    write_json(model_dir / DONE, record)   # last: the stage counts as trained from here on
    return {"module": module, "logger": logger, "seconds": seconds, "record": record}


def load_trained_stage(cfg: DictConfig, name: str, tokenizer, out_dir: Path) -> dict:
    """A stage whose training finished in an earlier attempt (model/.done): its trained encoder and
    extras in the stage's objective, ready to evaluate, in the same form as `train_stage` returns."""
    model_dir = runs.model_dir(out_dir)
    record = json.loads((model_dir / DONE).read_text(encoding="utf-8"))
    with open_dict(cfg):
        cfg.model.init_from = str(model_dir)
    module = build_stage(cfg, tokenizer)
    module.load_extras(model_dir)
    log.info("%s: trained in an earlier attempt (%s), evaluating it", name, model_dir)
    return {"module": module, "logger": make_logger(cfg, name, out_dir), "seconds": 0.0, "record": record}


# ---------------------------------------------------------------- the run

class Examples:
    """Training rows read once per distinct set of rows, shared by rows and stages.

    Which rows a data config reads is its module's to say (`examples_key()`,
    embedkit/data/base.py): configs that differ only in how rows are batched share one read."""

    def __init__(self):
        self._by_key: dict[str, list[dict]] = {}
        self._bad_rows: dict[str, dict] = {}

    def key(self, data_cfg: DictConfig) -> str:
        # Building the module reads nothing (sources are partials); its interpolations
        # (${paths.data_dir}) resolve against the whole config, in place.
        return instantiate(data_cfg).examples_key()

    def get(self, data_cfg: DictConfig) -> tuple[list[dict], Callable[[], Iterable[str]]]:
        """The rows, and a callable streaming their texts for a vocabulary (nothing is read
        for it unless the tokenizer is built from text)."""
        data = instantiate(data_cfg)
        key = data.examples_key()
        if key not in self._by_key:
            self._by_key[key] = data.examples
            self._bad_rows[key] = data.bad_rows
        data.use_examples(self._by_key[key])
        return self._by_key[key], data.vocab_texts

    def bad_rows(self, data_cfg: DictConfig) -> dict[str, dict]:
        """{file: {"count", "first"}} of the rows `data.on_bad_row=skip` left out."""
        return {path: {"count": len(rows), "first": [f"line {n}: {why}" for n, why in rows[:5]]}
                for path, rows in self._bad_rows.get(self.key(data_cfg), {}).items()}


def run(cfg: DictConfig) -> float | None:
    refused = scale_problems(cfg)
    if refused:   # before the plan too: a plan of settings never meant for this scale misleads
        from embedkit.recipes.preflight import ConfigError

        raise ConfigError(f"run stopped before training: {refused[0]}")
    if cfg.get("plan"):
        # `plan=true`: print the rows and stages this run would train, as below, and stop. Before
        # the folder claim, preflight and any data read (embedkit/recipes/plan.py).
        from embedkit.recipes.plan import print_plan

        out_dir = Path(cfg.paths.output_dir)
        print_plan(cfg, planned(cfg, ablation_rows(cfg), out_dir), out_dir)
        return None
    from embedkit.recipes.preflight import preflight
    from embedkit.reporting.tables import floor_row, seed_count, side_by_side, write_table

    out_dir = Path(cfg.paths.output_dir)
    claim(out_dir)   # a live run writing this folder (e.g. the same hydra.run.dir) stops this one
    rows = ablation_rows(cfg)
    suite = instantiate(cfg.eval)
    preflight(cfg, rows, suite)   # config types, widths, folders, eval data: before any data is read
    # The lexical floor row (eval.lexical_floor): before training, so that a failure costs none.
    floor = suite.floor() if hasattr(suite, "floor") else None
    examples = Examples()

    # A resumed row must have been run with these very settings (and as many seeds' folders).
    for row in planned(cfg, rows, out_dir):
        several = len(row["by_seed"]) > 1
        check_seed_layout(row["dir"], len(row["by_seed"]), f"row {row['label']!r}")
        for one in row["by_seed"]:
            check_settings(one["dir"], row_settings(one["plan"]),
                           f"row {row['label']!r}" + (f", seed {one['seed']}," if several else ""))

    # One tokenizer for every stage of every row: read all their data first. The vocabulary comes
    # from the first seed's data alone, so that it, and that seed's results, equal a one-seed run's.
    vocab_parts = []   # each distinct data's texts, streamed when (and only if) a vocabulary is built
    seen, policies = set(), set()
    for first in (True, False):
        for row in rows:
            for one in row["by_seed"][:1] if first else row["by_seed"][1:]:
                for step in one["plan"]:
                    data_cfg = step["cfg"].data
                    policies.add(data_cfg.get("on_bad_row", "error"))
                    key = examples.key(data_cfg)
                    if key not in seen:
                        seen.add(key)
                        texts = examples.get(data_cfg)[1]
                        if first:
                            vocab_parts.append(texts)
    if cfg.model.get("init_from"):
        # Starting from a saved encoder: its ids are fixed, so its own tokenizer comes with it
        # (a vocabulary rebuilt from this run's data would not match its embedding table).
        from embedkit.models.build import pretrained_tokenizer

        tokenizer = pretrained_tokenizer(cfg.model.init_from, out_dir=out_dir / runs.TOKENIZER)
    else:
        # The vocabulary's own corpora re-read training files: they skip bad rows as the data does.
        from embedkit.models.vocab import TextStream

        tokenizer = instantiate(cfg.model.tokenizer, texts=TextStream(vocab_parts), out_dir=str(out_dir / runs.TOKENIZER),
                                on_bad_row="skip" if "skip" in policies else "error")

    table_rows, last = [], None
    for row in rows:
        several = len(row["by_seed"]) > 1
        # A plain run's label is its override string ("logger=csv ..."): its variants
        # (Matryoshka widths) read better alone. Ablation rows keep "<row> <variant>".
        plain = len(rows) == 1 and row.get("paper_row") is None and not row.get("stages")
        per_seed = {}
        for one in row["by_seed"]:
            seed_dir, what = one["dir"], row["label"] + (f" seed {one['seed']}" if several else "")
            seed_dir.mkdir(parents=True, exist_ok=True)
            results = finished_results(seed_dir, row["label"])
            if results is not None:
                log.info("%s: done in an earlier run (%s), kept", what, runs.results_file(seed_dir))
            else:
                # A seed of several is recorded in its results (`seed`); a one-seed row's are as ever.
                seeded = {**row, "plan": one["plan"], **({"seed": one["seed"]} if several else {})}
                results = run_row(cfg, seeded, tokenizer, examples, suite, seed_dir, out_dir)
            per_seed[one["seed"]] = results
            _card_with_eval(one["plan"][-1], seed_dir, _table_rows(row, results, plain), suite.name)
        results = write_seed_means(row["dir"], per_seed) if several else per_seed[row["by_seed"][0]["seed"]]
        row_table = _table_rows(row, results, plain)
        last = row_table[-1].get("Avg") if row_table else last
        table_rows += row_table

    if floor is not None:
        table_rows.append(floor_row(floor))
    ablation = cfg.get("ablation") or {}
    markdown = write_table(table_rows, out_dir, first=ablation.get("column", "run"))
    seeds = seed_count(table_rows)
    title = f"embedkit {cfg.experiment_name} ({cfg.scale.name} scale, {suite.name}" + (
        f"; mean ± std over {seeds} seeds" if seeds > 1 else "") + ")"
    paper = ablation.get("paper_table")
    print("\n" + side_by_side(markdown, title, paper if paper and Path(paper).exists() else None,
                              ablation.get("paper_title", "Paper")) + "\n")
    if ablation.get("paper_finding"):
        print(f"Paper finding to compare against: {ablation.paper_finding}\n")
    print(f"Tables written to {runs.table_file(out_dir, 'md')} and {runs.table_name('csv')}")
    return last


def _table_rows(row: dict, results: dict[str, dict], plain: bool) -> list[dict]:
    """The table's rows of one row's {variant: results}."""
    from embedkit.reporting.tables import row_from_results

    return [row_from_results(row["label"] if not variant else (variant if plain else f"{row['label']} {variant}"), res)
            for variant, res in results.items()]


def _root_results(all_results: dict[str, dict]) -> dict:
    """The row's root results.json from its {variant: results}: the plain variant's, or, for
    variant-only objectives (Matryoshka), the last variant's with every variant's scores (for sweeps)."""
    if "" in all_results:
        root = dict(all_results[""])
    else:
        root = dict(list(all_results.values())[-1])
        root["variants"] = {k: {"categories": v.get("categories"), "Avg": v.get("Avg")}
                            for k, v in all_results.items()}
    root["variant_names"] = [v for v in all_results if v]
    return root


def write_seed_means(row_dir: Path, per_seed: dict[int, dict[str, dict]]) -> dict[str, dict]:
    """A several-seed row's own results from its seeds' {variant: results}: each variant's means
    and spread (embedkit/reporting/seeds.py) in `variants/<v>/results.json`, then the root's in the
    row's results.json, laid out as a one-seed row's; returns {variant: results}. Rewritten from
    the seeds' files on every run, so a resumed run's means include the seeds it added."""
    variants = list(dict.fromkeys(v for results in per_seed.values() for v in results))
    means = {v: aggregate({s: results[v] for s, results in per_seed.items() if v in results}) for v in variants}
    for variant, results in means.items():
        if variant:
            write_json(runs.results_file(runs.variant_dir(row_dir, variant)), results)
    root = _root_results(means)
    write_json(runs.results_file(row_dir), root)
    if "" in means:
        means[""] = root
    return means


def run_row(cfg: DictConfig, row: dict, tokenizer, examples: Examples, suite, row_dir: Path,
            out_dir: Path) -> dict[str, dict]:
    """Train the row's stages, evaluate every variant; returns {variant label: results}.

    A stage trained in an earlier attempt (model/.done) is reused, the final one too; a variant
    scored in an earlier attempt is kept. The row's root results.json is written last: it marks
    the row finished (embedkit/recipes/recovery.py `finished_results`). A row given a `seed` is one
    seed of several (`seeds=N`): its results record it."""
    plan = row.get("plan") or plan_row(cfg, row, row_dir, out_dir)
    chain = [p["stage"] for p in plan]
    steps, train_seconds, bad_rows, training = {}, 0.0, {}, {}
    for p in plan:
        stage_cfg, stage_dir, name = p["cfg"], p["dir"], p["name"]
        bad_rows.update(examples.bad_rows(stage_cfg.data))   # a reused stage's data counts too
        if runs.done_file(stage_dir).exists():
            if p["final"]:
                stage = load_trained_stage(stage_cfg, name, tokenizer, stage_dir)
            else:
                log.info("%s: reusing %s", name, stage_dir)
                stage = {"record": json.loads(runs.done_file(stage_dir).read_text(encoding="utf-8"))}
        else:
            stage_examples, _ = examples.get(stage_cfg.data)
            stage = train_stage(stage_cfg, name, tokenizer, stage_examples, stage_dir)
            if not p["final"]:
                train_seconds += stage["seconds"]   # the final stage's time is in its record
                finish_logger(stage["logger"])
                _drop_checkpoints(cfg, stage_dir)   # model/.done now stands for the stage
        steps[p["stage"] or "train"] = int(stage["record"]["steps"])
        training[p["stage"] or "train"] = stage["record"].get("training")
    module, logger, record = stage["module"], stage["logger"], stage["record"]

    all_results: dict[str, dict] = {}
    instruction = stage_cfg.eval.get("query_instruction") if "eval" in stage_cfg else None
    for variant, kwargs in module.eval_targets().items():
        kwargs = {"query_instruction": instruction, **kwargs}
        variant_dir = runs.variant_dir(row_dir, variant)
        earlier = variant_results(variant_dir, variant) if variant else None
        if earlier is not None:
            log.info("%s %s: scored in an earlier attempt, kept", row["label"], variant)
            all_results[variant] = earlier
            continue
        start = time.perf_counter()
        results = suite.evaluate(**kwargs, model_name=f"embedkit/{cfg.experiment_name}",
                                 revision=safe_label(f"{row['label']}-{variant}" if variant else row["label"]),
                                 output_dir=variant_dir)
        results.update({
            "label": row["label"], "variant": variant, "paper_row": row.get("paper_row"),
            "overrides": row["overrides"], "stages": chain if chain != [None] else None,
            "scale": cfg.scale.name, "steps": steps.get(chain[-1] or "train"), "stage_steps": steps,
            # stages this row trained in this attempt, plus its final stage (trained now or earlier)
            "train_seconds": round(train_seconds + record.get("train_seconds", 0.0), 1),
            "eval_seconds": round(time.perf_counter() - start, 1),
            "final_train_loss": record.get("final_train_loss"),
            "training": training,   # per stage: batches, optimizer steps, skipped, zero-loss batches
            "bad_rows": bad_rows,   # {file: {count, first}}: rows data.on_bad_row=skip left out
        })
        if row.get("seed") is not None:
            results["seed"] = row["seed"]
        if variant:
            write_json(runs.results_file(variant_dir), results)   # redacted (embedkit/redact.py)
        all_results[variant] = results
        prefix = f"eval/{variant}/" if variant else "eval/"
        for one in logger or []:
            one.log_metrics({f"{prefix}{k}": v for k, v in results.get("categories", {}).items()}
                            | {f"{prefix}Avg": results.get("Avg")}, step=int(record["steps"]))
    root = _root_results(all_results)
    write_json(runs.results_file(row_dir), root)   # last: the row is finished once this exists
    if "" in all_results:
        all_results[""] = root
    finish_logger(logger)
    _drop_checkpoints(cfg, row_dir)   # the row is done: results.json and model/ are what it keeps
    return all_results


def _card_with_eval(step: dict, row_dir: Path, eval_rows: list[dict], suite_name: str) -> None:
    """Rewrite the row's final model card with its scores: the rows it adds to table.json."""
    from embedkit.models.export import write_model_card
    from embedkit.recipes.model_card import stage_card

    done = runs.done_file(row_dir)
    if not done.is_file():
        return
    record = json.loads(done.read_text(encoding="utf-8"))
    write_model_card(done.parent, stage_card(step["cfg"], step["name"], record, eval_rows, suite_name))


def _row_counts(examples) -> int | dict[str, int] | None:
    """Training rows of a stage: a count, or one per task (MultiTaskDataModule's {task: rows});
    None for rows that do not know their number."""
    if isinstance(examples, dict):
        return {k: _row_counts(v) for k, v in examples.items()}
    try:
        return len(examples)
    except TypeError:
        return None


def _epochs(trainer) -> float | None:
    """Passes over the training data: batches run (a resumed fit counts its restored ones) over
    batches per epoch; None when an epoch has no length."""
    per_epoch = trainer.num_training_batches
    if not per_epoch or per_epoch == float("inf"):
        return None
    return round(trainer.fit_loop.epoch_loop.batch_progress.total.completed / per_epoch, 3)


def _drop_checkpoints(cfg: DictConfig, stage_dir: Path) -> None:
    """Delete a finished stage's Lightning checkpoints, unless `checkpoint.keep=true`."""
    import shutil

    from embedkit.checkpointing import CKPT_DIR

    if not (cfg.get("checkpoint") or {}).get("keep", False) and (stage_dir / CKPT_DIR).is_dir():
        shutil.rmtree(stage_dir / CKPT_DIR)


def _metric(trainer, key: str):
    value = trainer.callback_metrics.get(key)
    return None if value is None else float(value)
