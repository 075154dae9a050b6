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
from pathlib import Path

from embedkit.models.encoder import TextEncoder

MODULES_FILE = "modules.json"
TRANSFORMER_CONFIG = "sentence_bert_config.json"
MODEL_CONFIG = "config_sentence_transformers.json"
POOLING_DIR = "1_Pooling"
DENSE_DIR = "2_Dense"

TRANSFORMER_TYPE = "sentence_transformers.models.Transformer"
POOLING_TYPE = "sentence_transformers.models.Pooling"
DENSE_TYPE = "sentence_transformers.models.Dense"
NORMALIZE_TYPE = "sentence_transformers.models.Normalize"
IDENTITY_ACTIVATION = "torch.nn.modules.linear.Identity"

# Every legacy pooling switch, so that readers which require all of them (5.x) find them.
_POOLING_FLAGS = ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens",
                  "weightedmean_tokens", "lasttoken")
_POOLING_FLAG = {"cls": "cls_token", "mean": "mean_tokens"}


def export_sentence_transformers(encoder: TextEncoder, out_dir: str | Path) -> Path:
    """Save `encoder` into `out_dir` so that both `load_encoder` and `SentenceTransformer` read it.

    Writes everything `TextEncoder.save_pretrained` writes (backbone, tokenizer, embedkit settings,
    projection) plus the sentence-transformers module files. Returns the folder.
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
