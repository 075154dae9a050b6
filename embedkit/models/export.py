"""Write a `TextEncoder` as a sentence-transformers model folder, beside embedkit's own files.

Why: a trained model is only useful outside embedkit if the usual tools load it. With these files a
`save_pretrained` folder is also `SentenceTransformer(path)` (and so `mteb`, LangChain, ...), with
the same embeddings as `TextEncoder.encode`; `load_encoder` keeps reading the same folder.

The layout is the one sentence-transformers has written since v2 and still loads in 5.x and 6.x
(6.x maps the `sentence_transformers.models.*` type names and the legacy pooling keys onto its
new modules), i.e. what BGE / Conan checkpoints on the hub ship:

    modules.json                      0: Transformer at "", 1: Pooling, [Dense], [Normalize]
    sentence_bert_config.json         {"max_seq_length": ..., "do_lower_case": false}
    config_sentence_transformers.json model type, similarity function, prompts
    config.json, model.safetensors    the backbone (written by TextEncoder.save_pretrained)
    tokenizer files                   (written by TextEncoder.save_pretrained)
    1_Pooling/config.json             CLS or mean, as the encoder was trained
    2_Dense/{config.json, model.safetensors}   only with a projection: W·x + b, identity activation
    <n>_Normalize/                    only when the encoder L2-normalises
    README.md                         the model card (below)

The model card is a Hugging Face card as sentence-transformers' own generator writes one
(sentence_transformers/base/model_card.py: YAML front matter with library_name, pipeline_tag,
tags, language and base_model; then the model's details, usage, evaluation and training details),
filled from what the run knew (`CardData`: the recipe builds it, embedkit/recipes/model_card.py):
where the weights started, the objective and its settings, the data, steps, epochs, batch, lr, the
eval table once the run has scored the model, and the command and git commit that made it. The
architecture lines are read back from the module files just written, so they say what loads.

Module folders are numbered by their position, as sentence-transformers numbers them, so the
Normalize folder is `2_Normalize` without a projection and `3_Normalize` with one.

sentence_transformers is not imported here: it is a dev dependency only, and the files are plain
JSON plus safetensors. The backbone is saved without BERT's pooler; sentence-transformers rebuilds
the model class with a (randomly initialised, unused) pooler and may log that it is missing, which
does not change the token embeddings it pools.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from embedkit.models.encoder import TextEncoder

MODULES_FILE = "modules.json"
TRANSFORMER_CONFIG = "sentence_bert_config.json"
MODEL_CONFIG = "config_sentence_transformers.json"
POOLING_DIR = "1_Pooling"
DENSE_DIR = "2_Dense"
CARD_FILE = "README.md"

TRANSFORMER_TYPE = "sentence_transformers.models.Transformer"
POOLING_TYPE = "sentence_transformers.models.Pooling"
DENSE_TYPE = "sentence_transformers.models.Dense"
NORMALIZE_TYPE = "sentence_transformers.models.Normalize"
IDENTITY_ACTIVATION = "torch.nn.modules.linear.Identity"

# Every legacy pooling switch, so that readers which require all of them (5.x) find them.
_POOLING_FLAGS = ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens",
                  "weightedmean_tokens", "lasttoken")
_POOLING_FLAG = {"cls": "cls_token", "mean": "mean_tokens"}


def export_sentence_transformers(encoder: TextEncoder, out_dir: str | Path, card: CardData | None = None) -> Path:
    """Save `encoder` into `out_dir` so that both `load_encoder` and `SentenceTransformer` read it.

    Writes everything `TextEncoder.save_pretrained` writes (backbone, tokenizer, embedkit settings,
    projection) plus the sentence-transformers module files and the model card README.md (`card`,
    or one that says only what the folder itself shows when no run details are given). Returns the
    folder.
    """
    if not isinstance(encoder, TextEncoder):
        raise TypeError(f"export_sentence_transformers needs an embedkit TextEncoder, got "
                        f"{type(encoder).__name__} (a Matryoshka view or M3 search model is not one)")
    if encoder.pooling not in _POOLING_FLAG:
        raise ValueError(f"pooling {encoder.pooling!r} has no sentence-transformers equivalent here; "
                         f"known: {sorted(_POOLING_FLAG)}")
    out = encoder.save_pretrained(out_dir)
    hidden = int(encoder.backbone.config.hidden_size)

    modules = [{"idx": 0, "name": "0", "path": "", "type": TRANSFORMER_TYPE},
               {"idx": 1, "name": "1", "path": POOLING_DIR, "type": POOLING_TYPE}]
    _write_json(out / TRANSFORMER_CONFIG, {"max_seq_length": int(encoder.max_length),
                                           "do_lower_case": False})
    pooling = {"word_embedding_dimension": hidden}
    pooling.update({f"pooling_mode_{flag}": flag == _POOLING_FLAG[encoder.pooling]
                    for flag in _POOLING_FLAGS})
    pooling["include_prompt"] = True
    _write_json(out / POOLING_DIR / "config.json", pooling)

    if encoder.projection is not None:
        _write_dense(encoder, out / DENSE_DIR)
        modules.append({"idx": 2, "name": "2", "path": DENSE_DIR, "type": DENSE_TYPE})
    else:
        _remove_stale(out / DENSE_DIR, ("config.json", "model.safetensors"))
    for stale in ("2_Normalize", "3_Normalize"):
        _remove_stale(out / stale, ())
    if encoder.normalize:
        idx = len(modules)
        path = f"{idx}_Normalize"
        (out / path).mkdir(exist_ok=True)   # Normalize has no files; its folder is still expected
        modules.append({"idx": idx, "name": str(idx), "path": path, "type": NORMALIZE_TYPE})
    _write_json(out / MODULES_FILE, modules)
    _write_json(out / MODEL_CONFIG, _model_config())
    write_model_card(out, card or CardData())
    return out


def _write_dense(encoder: TextEncoder, folder: Path) -> None:
    """The projection as sentence-transformers' Dense: `linear.weight` / `linear.bias`, no activation."""
    from safetensors.torch import save_file

    proj = encoder.projection
    folder.mkdir(parents=True, exist_ok=True)
    state = {f"linear.{k}": v.detach().cpu().contiguous() for k, v in proj.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    _write_json(folder / "config.json", {"in_features": int(proj.in_features),
                                         "out_features": int(proj.out_features),
                                         "bias": proj.bias is not None,
                                         "activation_function": IDENTITY_ACTIVATION})


def _model_config() -> dict:
    """config_sentence_transformers.json. The sentence-transformers version is left out on purpose:
    it is not a dependency, and a version newer than the reader's only earns a warning."""
    import torch
    import transformers

    return {"model_type": "SentenceTransformer",
            "__version__": {"transformers": transformers.__version__, "pytorch": torch.__version__},
            "prompts": {}, "default_prompt_name": None, "similarity_fn_name": "cosine"}


# ---------------------------------------------------------------- the model card

@dataclass
class CardData:
    """What a model card says beyond the folder's own files; every field may stay empty.

    `settings` and `eval_table` come rendered from the recipe (the plan's lines, the run table's
    Markdown), so the card says what the plan and table.md say."""

    name: str | None = None                 # the card's title: "embedkit <experiment>/<row>/<stage>"
    base_model: str | None = None           # a hub id, for the front matter's base_model
    init: str | None = None                 # "trained from random init", "fine-tuned from ..."
    loss: str | None = None                 # the objective's class: InfoNCE, CoSENT, M3, ...
    settings: list[tuple[str, str]] = field(default_factory=list)   # the objective and its settings
    sources: list[str] = field(default_factory=list)                # training data sources
    rows: int | dict[str, int] | None = None                         # training rows (per task)
    steps: int | None = None
    epochs: float | None = None             # passes over the training rows (fractional)
    batch: str | None = None                # the global batch, as the plan words it
    lr: float | None = None
    eval_name: str | None = None            # the suite, e.g. "mini C-MTEB"
    eval_table: str | None = None           # Markdown: categories + Avg, one row per variant
    command: str | None = None
    commit: str | None = None
    language: str = "zh"
    tags: list[str] = field(default_factory=list)


def write_model_card(folder: str | Path, card: CardData) -> Path:
    """Write `folder/README.md` from `card` and the folder's sentence-transformers files (written
    first by `export_sentence_transformers`). Credentials in the text are masked (embedkit/redact.py)."""
    from huggingface_hub import ModelCardData

    from embedkit.atomic_files import write_text_atomic
    from embedkit.redact import redact_text

    folder = Path(folder)
    arch = _architecture(folder)
    tags = ["sentence-transformers", "sentence-similarity", "feature-extraction", "embedkit"]
    if card.loss:
        tags.append(f"loss:{card.loss}")
    total = sum(card.rows.values()) if isinstance(card.rows, dict) else card.rows
    if total:
        tags.append(f"dataset_size:{total}")
    tags += [t for t in card.tags if t not in tags]
    front = ModelCardData(language=card.language, library_name="sentence-transformers",
                          pipeline_tag="sentence-similarity", tags=tags, base_model=card.base_model)
    text = "---\n" + front.to_yaml() + "\n---\n\n" + _card_body(card, arch)
    return write_text_atomic(folder / CARD_FILE, redact_text(text))


def _architecture(folder: Path) -> dict:
    """Width, length, pooling and module list as the folder's own files give them."""
    modules = json.loads((folder / MODULES_FILE).read_text(encoding="utf-8"))
    pooling = json.loads((folder / POOLING_DIR / "config.json").read_text(encoding="utf-8"))
    width = pooling["word_embedding_dimension"]
    mode = next((flag for flag, name in _POOLING_FLAG.items() if pooling.get(f"pooling_mode_{name}")), "?")
    lines = []
    for m in modules:
        kind = m["type"].rsplit(".", 1)[-1]
        if kind == "Pooling":
            kind += f" ({mode}, {width} dims)"
        elif kind == "Dense":
            dense = json.loads((folder / m["path"] / "config.json").read_text(encoding="utf-8"))
            width = dense["out_features"]
            kind += f" ({dense['in_features']} -> {width}, no activation)"
        lines.append(f"({m['idx']}): {kind}" + (f"  [{m['path']}/]" if m["path"] else ""))
    max_len = json.loads((folder / TRANSFORMER_CONFIG).read_text(encoding="utf-8"))["max_seq_length"]
    return {"width": width, "max_length": max_len, "pooling": mode, "modules": lines,
            "normalized": any(m["type"] == NORMALIZE_TYPE for m in modules)}


def _card_body(card: CardData, arch: dict) -> str:
    title = card.name or "an embedkit model"
    started = card.init or "training details not recorded"
    out = [f"# {title}", "",
           f"A [sentence-transformers](https://www.SBERT.net) model trained with embedkit ({started}). "
           f"It maps Chinese text to a {arch['width']}-dimensional dense vector space "
           f"({arch['pooling']} pooling{', L2-normalised' if arch['normalized'] else ''}).", "",
           "## Model Details", "",
           "- **Model Type:** Sentence Transformer",
           f"- **Base model:** {_hub_link(card.base_model) if card.base_model else 'none (' + started + ')'}",
           f"- **Maximum Sequence Length:** {arch['max_length']} tokens",
           f"- **Output Dimensionality:** {arch['width']} dimensions",
           "- **Similarity Function:** Cosine Similarity",
           f"- **Language:** {card.language}", "",
           "### Full Model Architecture", "", "```", *arch["modules"], "```", "",
           "## Usage", "", "```python", "from sentence_transformers import SentenceTransformer", "",
           'model = SentenceTransformer("path/to/this/folder")',
           'embeddings = model.encode(["今天天气很好", "北京是中国的首都"])',
           "similarities = model.similarity(embeddings, embeddings)", "```", ""]
    if card.eval_table:
        suite = card.eval_name or "The run's evaluation suite"
        out += ["## Evaluation", "", f"{suite} through mteb, scores x100 (each category the mean of "
                "its tasks; Avg over all tasks, C-MTEB's rule):", "", card.eval_table, ""]
    out += ["## Training Details", ""]
    rows = (", ".join(f"{k} {v:,}" for k, v in card.rows.items()) if isinstance(card.rows, dict)
            else f"{card.rows:,}" if card.rows is not None else "-")
    facts = [("Loss", card.loss), ("Training rows", rows), ("Steps", card.steps),
             ("Epochs", None if card.epochs is None else f"{card.epochs:g}"),
             ("Batch", card.batch), ("Learning rate", None if card.lr is None else f"{card.lr:g}")]
    out += [f"- **{k}:** {'-' if v is None else v}" for k, v in facts]
    if card.sources:
        out += ["", "### Training Data", ""] + [f"- {s}" for s in card.sources]
    if card.settings:
        out += ["", "### Objective and Settings", "", "| setting | value |", "| --- | --- |"]
        out += [f"| {k} | {str(v).replace('|', '/')} |" for k, v in card.settings]
    out += ["", "### Framework Versions", ""] + [f"- {k}: {v}" for k, v in _versions().items()]
    out += ["", "## Provenance", "",
            f"- **Command:** `{card.command}`" if card.command else "- **Command:** not recorded",
            f"- **Git commit:** {card.commit or 'not recorded'}", ""]
    return "\n".join(out)


def _hub_link(model: str) -> str:
    return f"[{model}](https://huggingface.co/{model})"


def _versions() -> dict:
    import platform

    import torch
    import transformers

    return {"Python": platform.python_version(), "Transformers": transformers.__version__,
            "PyTorch": torch.__version__}


def _remove_stale(folder: Path, files: tuple[str, ...]) -> None:
    """Drop a module folder an earlier export wrote and this one does not list (only our files)."""
    if not folder.is_dir():
        return
    for name in files:
        (folder / name).unlink(missing_ok=True)
    if not any(folder.iterdir()):
        shutil.rmtree(folder)


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
