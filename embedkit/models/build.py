"""Factories that `conf/model/*.yaml` instantiate: a tokenizer, then an encoder around a backbone.

Two options share one `TextEncoder`:
- `tiny_zh`: a small BERT built from a config, with a character-level Chinese WordPiece vocabulary
  built from the training text, so the mini scale needs no download.
- `hf`: any Hugging Face encoder by hub name or local path (BAAI/bge-base-zh-v1.5,
  hfl/chinese-roberta-wwm-ext, ...), the paper scale's starting points.

Every `from_pretrained` here passes `trust_remote_code` explicitly, False unless the config's
`model.trust_remote_code` (conf/model/hf.yaml) turns it on: with it on, transformers imports and
runs Python files named by the checkpoint, so it must be a decision made in the config.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Callable, Iterable, Sequence

from embedkit.models.encoder import ENCODER_CONFIG, PROJECTION_WEIGHTS, TextEncoder

log = logging.getLogger(__name__)


def trust_remote_code_flag(value) -> bool:
    """The `trust_remote_code` switch as a real bool. A string such as "false" (a quoted override)
    would be truthy and turn remote code on, so anything but a bool is a configuration error."""
    if value is None:
        return False
    if not isinstance(value, bool):
        raise TypeError(f"trust_remote_code must be true or false, got {value!r} "
                        f"({type(value).__name__}); set model.trust_remote_code=true or false unquoted")
    return value


def char_level_tokenizer(texts: Iterable[str] | None, out_dir: str | Path, min_freq: int = 1,
                         max_size: int | None = None, cache_dir: str | Path | None = None,
                         corpora: Sequence[Callable[[], list[str]]] = (), on_bad_row: str = "error"):
    """Build (or reuse from `cache_dir`) a character vocabulary, saved into `out_dir`.

    The vocabulary covers the run's training `texts` plus the texts of `corpora`, configured
    sources that return texts when called (conf/model/tiny_zh.yaml: People's Daily paragraphs and
    the zh-mini training files), so that every stage of a multi-stage recipe (RetroMAE on People's
    Daily, then fine-tuning on zh-mini) shares one id space. It is keyed by a hash of all the text
    and settings, so a sweep builds it once. `on_bad_row` is the run's data policy, handed to every
    corpus that reads files (unless its config sets its own): a row the data skips must not stop
    the vocabulary.
    """
    from embedkit.data.sources import call_source
    from embedkit.models.vocab import (TextStream, build_char_vocab, load_tokenizer, read_vocab_txt,
                                       save_tokenizer)

    # Two streaming passes (hash, then count on a cache miss): `texts` is re-iterable (the
    # recipe's TextStream reads the training rows again) or is materialised once here.
    if texts is None:
        texts = ()
    elif iter(texts) is texts:
        texts = list(texts)
    corpus_texts = [t for corpus in corpora for t in call_source(corpus, on_bad_row)]
    all_texts = TextStream([lambda: texts, lambda: corpus_texts])
    digest = hashlib.sha1()
    for t in all_texts:
        digest.update(t.encode("utf-8"))
        digest.update(b"\0")
    digest.update(f"{min_freq}/{max_size}".encode())
    key = digest.hexdigest()[:16]
    cached = Path(cache_dir) / "vocab" / key if cache_dir else None
    if cached is not None and (cached / "vocab.txt").exists():
        vocab = read_vocab_txt(cached / "vocab.txt")
    else:
        vocab = build_char_vocab(all_texts, min_freq=min_freq, max_size=max_size)
        if cached is not None:
            save_tokenizer(vocab, cached)
    save_tokenizer(vocab, out_dir)
    log.info("character vocabulary: %d entries (key %s), saved to %s", len(vocab), key, out_dir)
    return load_tokenizer(out_dir)


def pretrained_tokenizer(name_or_path: str, out_dir: str | Path | None = None,
                         revision: str | None = None, trust_remote_code: bool = False,
                         texts: Sequence[str] | None = None, **_ignored):
    """The tokenizer that ships with a hub checkpoint; `texts` is accepted and unused."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name_or_path, revision=revision,
                                        trust_remote_code=trust_remote_code_flag(trust_remote_code))
    if out_dir is not None:
        tok.save_pretrained(out_dir)
    return tok


def tiny_zh_encoder(tokenizer, hidden_size: int = 256, num_layers: int = 4, num_heads: int = 4,
                    intermediate_size: int = 1024, max_position_embeddings: int = 512,
                    dropout: float = 0.1, attn_implementation: str = "sdpa",
                    pooling: str = "cls", normalize: bool = True, max_length: int = 128,
                    projection_dim: int | None = None,
                    gradient_checkpointing: bool = False, unpad: bool = False,
                    compile: bool = False) -> TextEncoder:
    """A freshly initialised BERT sized for a 2-core CPU (`projection_dim`, `unpad`, `compile`:
    see TextEncoder; `gradient_checkpointing`: see `enable_gradient_checkpointing`)."""
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings, hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout, pad_token_id=tokenizer.pad_token_id,
    )
    # The attention backend is a config attribute; BertModel(...) does not take it as an argument.
    config._attn_implementation = attn_implementation
    backbone = BertModel(config, add_pooling_layer=False)
    enable_gradient_checkpointing(backbone, gradient_checkpointing)
    return TextEncoder(backbone, tokenizer, pooling=pooling, normalize=normalize,
                       max_length=max_length, projection_dim=projection_dim, unpad=unpad,
                       compile=compile)


def enable_gradient_checkpointing(backbone, on: bool = True):
    """Recompute each layer's activations in backward instead of storing them (HF's
    `gradient_checkpointing_enable`, renamed `activation_checkpointing_enable` in transformers 5): how C-Pack fit 800 texts per GPU at length 128 (with
    DeepSpeed and fp16, FlagEmbedding #153). Non-reentrant checkpointing, which works when the
    inputs need no grad and under GradCache's no-grad first pass."""
    if on:
        if not getattr(backbone, "supports_gradient_checkpointing", False):
            raise ValueError(f"{type(backbone).__name__} does not support gradient checkpointing")
        kwargs = {"use_reentrant": False}
        if hasattr(backbone, "activation_checkpointing_enable"):
            backbone.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return backbone


def hf_encoder(tokenizer, name_or_path: str, revision: str | None = None, pooling: str = "cls",
               normalize: bool = True, max_length: int = 512, trust_remote_code: bool = False,
               attn_implementation: str | None = "sdpa",
               projection_dim: int | None = None,
               gradient_checkpointing: bool = False, unpad: bool = False,
               compile: bool = False) -> TextEncoder:
    """A pre-trained Hugging Face encoder without its pooler head (`projection_dim`: a fresh
    linear head after pooling, e.g. Conan's 1024 -> 1792; `unpad`, `compile`: see TextEncoder)."""
    kwargs = dict(revision=revision, trust_remote_code=trust_remote_code)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    backbone = enable_gradient_checkpointing(_backbone_without_pooler(name_or_path, **kwargs),
                                             gradient_checkpointing)
    return TextEncoder(backbone, tokenizer,
                       pooling=pooling, normalize=normalize, max_length=max_length,
                       projection_dim=projection_dim, unpad=unpad, compile=compile)


def _backbone_without_pooler(name_or_path, trust_remote_code: bool = False, **kwargs):
    from transformers import AutoModel

    trust = trust_remote_code_flag(trust_remote_code)
    try:
        return AutoModel.from_pretrained(name_or_path, add_pooling_layer=False,
                                         trust_remote_code=trust, **kwargs)
    except TypeError:
        # Encoders without a pooler (DistilBERT, ELECTRA, ...) do not accept the switch.
        return AutoModel.from_pretrained(name_or_path, trust_remote_code=trust, **kwargs)


def load_encoder(path: str | Path, device: str = "cpu", trust_remote_code: bool = False,
                 unpad: bool = False, compile: bool = False) -> TextEncoder:
    """Reload an encoder written by `TextEncoder.save_pretrained` (or any HF encoder folder).

    `trust_remote_code` stays off unless the caller turns it on: a model folder is data, and with
    it on, transformers would import and run Python files that the folder names. `unpad` and
    `compile`: TextEncoder's speed switches (not stored in the folder).
    """
    import json

    from transformers import AutoTokenizer

    path = Path(path)
    settings = {"pooling": "cls", "normalize": True, "max_length": 512}
    if (path / ENCODER_CONFIG).exists():
        settings.update(json.loads((path / ENCODER_CONFIG).read_text()))
    trust = trust_remote_code_flag(trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
    backbone = _backbone_without_pooler(path, trust_remote_code=trust)
    encoder = TextEncoder(backbone, tokenizer, **settings, unpad=unpad, compile=compile)
    if encoder.projection is not None:
        if not (path / PROJECTION_WEIGHTS).exists():
            raise FileNotFoundError(f"{path / ENCODER_CONFIG} names a projection of width "
                                    f"{encoder.projection_dim}, but {PROJECTION_WEIGHTS} is missing")
        encoder.load_projection(path / PROJECTION_WEIGHTS)
    return encoder.to(device)


#: sentence-transformers module types, by class name (the end of the dotted type: 2.x-5.x write
#: `sentence_transformers.models.Pooling`, 6.x `sentence_transformers.sentence_transformer.modules.pooling.Pooling`).
_ST_TRANSFORMER, _ST_POOLING, _ST_NORMALIZE = "Transformer", "Pooling", "Normalize"
#: sentence-transformers' legacy pooling switches (pooling_mode_<flag>) and the mode each stands for.
_ST_POOLING_FLAGS = {"cls_token": "cls", "max_tokens": "max", "mean_tokens": "mean",
                     "mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                     "weightedmean_tokens": "weightedmean", "lasttoken": "lasttoken"}


def sentence_transformers_settings(path: str | Path) -> dict | None:
    """How a sentence-transformers model folder embeds, from its module files; None without
    `modules.json` (a plain HF or embedkit folder).

    Read as sentence-transformers reads them (2.x to 6.x): `modules.json` lists the Transformer (its
    folder, "" = the root, holds `sentence_bert_config.json`), a Pooling module
    (`<dir>/config.json`: `pooling_mode` in 6.x, else the legacy `pooling_mode_*` switches, none set
    meaning mean) and an optional Normalize. Returns

        {"transformer": the backbone's folder, "pooling": the mode ("cls", "mean", "max", ...; a
         tuple when several are concatenated), "pooling_config": the file it was read from,
         "normalize": bool, "max_length": max_seq_length or None (the tokenizer's then),
         "do_lower_case": bool (sentence-transformers lower-cases the text before tokenising)}

    A module `TextEncoder` cannot reproduce (Dense, or anything but Transformer, Pooling and
    Normalize) is an error naming modules.json, so that a caller never embeds differently from the
    checkpoint without knowing; `load_sentence_transformers_encoder` checks the pooling mode.
    """
    import json

    from embedkit.models.export import MODULES_FILE, TRANSFORMER_CONFIG

    root = Path(path)
    modules_file = root / MODULES_FILE
    if not modules_file.is_file():
        return None
    modules = json.loads(modules_file.read_text(encoding="utf-8"))
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    if kinds not in ([_ST_TRANSFORMER, _ST_POOLING], [_ST_TRANSFORMER, _ST_POOLING, _ST_NORMALIZE]):
        raise ValueError(f"{modules_file}: modules {kinds}; only Transformer, Pooling[, Normalize] "
                         f"can be loaded as an embedkit encoder (no Dense or other modules)")
    transformer = root / modules[0].get("path", "")
    st_config_file = transformer / TRANSFORMER_CONFIG
    st_config = (json.loads(st_config_file.read_text(encoding="utf-8"))
                 if st_config_file.is_file() else {})
    pooling_file = root / modules[1]["path"] / "config.json"
    pooling_config = json.loads(pooling_file.read_text(encoding="utf-8"))
    mode = pooling_config.get("pooling_mode")
    if mode is None:
        mode = [m for flag, m in _ST_POOLING_FLAGS.items() if pooling_config.get(f"pooling_mode_{flag}")]
        mode = mode or "mean"
    if isinstance(mode, (list, tuple)):
        mode = mode[0] if len(mode) == 1 else tuple(mode)
    return {"transformer": transformer, "pooling": mode, "pooling_config": pooling_file,
            "normalize": len(kinds) == 3, "max_length": st_config.get("max_seq_length"),
            "do_lower_case": bool(st_config.get("do_lower_case", False))}


def load_sentence_transformers_encoder(path: str | Path, device: str = "cpu", pooling: str | None = None,
                                       trust_remote_code: bool = False) -> TextEncoder:
    """A sentence-transformers model folder as a `TextEncoder` with the folder's own pooling,
    normalisation and truncation length (`sentence_transformers_settings`), or `pooling` instead
    of the folder's. Without `max_seq_length` the length is the tokenizer's `model_max_length`
    capped at the model's position embeddings, as sentence-transformers does. Lower-casing
    (`do_lower_case`) is the caller's to apply to the texts. `trust_remote_code` as `load_encoder`."""
    from transformers import AutoTokenizer

    from embedkit.models.encoder import POOLINGS

    settings = sentence_transformers_settings(path)
    if settings is None:
        raise FileNotFoundError(f"{Path(path)}: no modules.json, not a sentence-transformers model folder")
    chosen = pooling or settings["pooling"]
    if chosen not in POOLINGS:
        raise ValueError(f"{settings['pooling_config']}: pooling {chosen!r} is not one embedkit's "
                         f"encoder computes {POOLINGS}; choose one of those to load it anyway")
    trust = trust_remote_code_flag(trust_remote_code)
    folder = settings["transformer"]
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust)
    backbone = _backbone_without_pooler(folder, trust_remote_code=trust)
    max_length = settings["max_length"]
    if max_length is None:
        max_length = min(tokenizer.model_max_length,
                         getattr(backbone.config, "max_position_embeddings", tokenizer.model_max_length))
    encoder = TextEncoder(backbone, tokenizer, pooling=chosen, normalize=settings["normalize"],
                          max_length=int(max_length))
    return encoder.to(device)


def init_encoder_from(encoder: TextEncoder, path: str | Path) -> TextEncoder:
    """Load a previous stage's weights (a `save_pretrained` folder) into a freshly built encoder.

    Strict: the architecture and vocabulary must match, which the shared character vocabulary and
    the stage's own model config guarantee; a mismatch is a configuration error worth stopping on.
    """
    from safetensors.torch import load_file

    path = Path(path)
    weights = path / "model.safetensors"
    if not weights.exists():
        raise FileNotFoundError(f"{weights}: no encoder weights to initialise from (model.init_from)")
    state = load_file(str(weights))
    try:
        missing, unexpected = encoder.backbone.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches: torch lists every tensor; the first few name the cause
        lines = [line.strip() for line in str(e).splitlines() if "size mismatch" in line]
        more = f" (and {len(lines) - 3} more)" if len(lines) > 3 else ""
        raise ValueError(f"{weights} does not fit the configured encoder (model.encoder widths, "
                         f"layers, vocabulary): {'; '.join(lines[:3]) or e}{more}") from e
    missing = [k for k in missing if "position_ids" not in k]
    if missing or unexpected:
        raise ValueError(f"{weights} does not fit the configured encoder: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]} (is the model config the same as that stage's?)")
    # The optional projection head (TextEncoder.projection_dim) travels with the backbone. A stage
    # that adds one starts it fresh; dropping a trained one would lose weights, so that stops.
    projection = path / PROJECTION_WEIGHTS
    if projection.exists():
        if encoder.projection is None:
            raise ValueError(f"{path} holds a trained projection head ({PROJECTION_WEIGHTS}), but the "
                             f"configured encoder has none; set model.encoder.projection_dim")
        encoder.load_projection(projection)
    elif encoder.projection is not None:
        log.info("%s has no projection head; the encoder's projection starts from scratch", path)
    log.info("initialised the encoder from %s", path)
    return encoder
