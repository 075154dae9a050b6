"""The model card (README.md) of every model folder a run exports: how its weights were made.

The recipe (embedkit/recipes/train_eval.py) writes it when a stage's encoder is exported, and
again for a row's final stage once the row is scored, now with the eval table (the row's rows of
the run's table.json, as table.md renders them). What it says comes from the stage's resolved
config and the stage's record (model/.done): where the weights started (random init, a
pre-trained checkpoint, an earlier stage's folder), the objective's settings as `plan=true`
prints them (embedkit/recipes/plan.py: loss, τ or scale, group size and negatives per query,
cross-device negatives, MRL dims, M3 heads and weights, lr, schedule), the data sources and rows,
steps, epochs, global batch, and the command and git commit (embedkit/provenance.py). The
rendering is embedkit/models/export.py `write_model_card`.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from embedkit.models.export import CARD_FILE, CardData


def stage_card(cfg: DictConfig, name: str, record: dict, eval_rows: list[dict] | None = None,
               eval_name: str | None = None) -> CardData:
    """The card of the stage `name` trained with `cfg`; `record` is its model/.done content,
    `eval_rows` its rows of the run table (tables.row_from_results), when it was scored."""
    from embedkit.config import REPO_ROOT
    from embedkit.provenance import command_line, git_commit
    from embedkit.recipes.plan import get, short, stage_lines
    from embedkit.reporting.tables import to_markdown

    base, init = _origin(cfg.model)
    obj, data = cfg.objective, cfg.data
    return CardData(
        name=f"embedkit {name}", base_model=base, init=init, loss=short(get(obj, "_target_")),
        settings=stage_lines(cfg, init, final=eval_rows is not None), sources=_sources(data),
        rows=record.get("examples"), steps=record.get("steps"), epochs=record.get("epochs"),
        batch=_batch(data, cfg.trainer), lr=get(obj, "lr"),
        eval_name=eval_name, eval_table=to_markdown(eval_rows, first="run") if eval_rows else None,
        command=command_line(REPO_ROOT), commit=git_commit(REPO_ROOT))


def _origin(model: DictConfig) -> tuple[str | None, str]:
    """(base_model for the front matter, how the weights started)."""
    from embedkit.recipes.plan import get

    init_from = get(model, "init_from")
    if init_from:
        base = card_base_model(init_from)
        return base, f"initialised from the encoder at {init_from}" + (f", based on {base}" if base else "")
    if get(model, "name") == "tiny_zh":
        return None, "trained from random init"
    source, revision = str(get(model, "name_or_path")), get(model, "revision")
    # A local folder is no hub id: its own card may name the hub model it came from.
    base = card_base_model(source) if Path(source).exists() else source
    return base, f"fine-tuned from the pre-trained {source}" + (f" at revision {revision}" if revision else "")


def card_base_model(folder: str | Path) -> str | None:
    """The base_model a model folder's card names (a stage chain keeps its root's), or None."""
    from huggingface_hub import ModelCard

    path = Path(folder) / CARD_FILE
    if not path.is_file():
        return None
    base = ModelCard.load(path).data.base_model
    return base if isinstance(base, str) else None


def _sources(data: DictConfig) -> list[str]:
    from embedkit.recipes.plan import get, sources_of

    tasks = get(data, "tasks")
    if isinstance(tasks, dict):   # MultiTaskDataModule: each task's own sources
        return [f"{task}: {s}" for task in tasks for s in _sources(data.tasks[task])]
    # The plan's existence check says nothing once the stage has read its data.
    return [s.replace(" [exists]", "") for s in sources_of(data) if s != "-"]


def _batch(data: DictConfig, trainer: DictConfig) -> str:
    from embedkit.recipes.plan import batch_line, get

    tasks = get(data, "tasks")
    if isinstance(tasks, dict):
        return "; ".join(f"{task} {batch_line(data.tasks[task], trainer)[0]}" for task in tasks)
    return batch_line(data, trainer)[0]
