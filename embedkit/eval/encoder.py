"""Adapter from embedkit's encoders to mteb 2.x's encoder protocol.

mteb hands the encoder a DataLoader plus the task metadata and whether the texts are queries or
documents; embedkit encoders only know ``encode(texts, batch_size) -> float32 L2-normalised array``.
This wrapper bridges the two and applies BGE's C-MTEB instruction rule.

MCLS (BGE-M3 paper, App. B.2 "MCLS Method"; in Table 4, MLDR, "Dense-w.o.long (MCLS)" lifts the
dense model trained without long data from 41.2 to 45.0 nDCG@10): for long inputs at inference,
without fine-tuning, "insert a CLS token for every fixed number of tokens (in our experiments, we
insert a [CLS] for each 256 tokens) ... the final text embedding is obtained by averaging the last
hidden states of all CLS tokens". With the text's tokens t_1..t_n and interval I, the sequence is

    [CLS] t_1 .. t_I [CLS] t_I+1 .. t_2I [CLS] ... t_n [SEP]        (k = ceil(n / I) CLS tokens)

run through the unchanged model with full attention and consecutive positions (the paper changes
neither), and e = normalize(W·(1/k Σ_j h_CLS_j) + b) with the encoder's own projection (if any) and
normalisation. A text of at most I tokens is its plain CLS embedding. `max_length` bounds the whole
sequence, inserted CLS tokens included (the paper's MCLS row runs at 8192, M3's position limit), so
a long text keeps m tokens with m + ceil(m / I) + 1 <= max_length. FlagEmbedding describes MCLS
(research/BGE_M3/README.md) but ships no code for it.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any, Protocol, Sequence

import numpy as np

from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ModelMeta, ScoringFunction
from mteb.types import PromptType

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

    from mteb.abstasks.task_metadata import TaskMetadata

log = logging.getLogger(__name__)

# BGE prepends its instruction to retrieval and reranking queries and nowhere else: not to passages,
# and not to STS / pair-classification / classification / clustering texts.
INSTRUCTION_TASK_TYPES = frozenset({"Retrieval", "Reranking"})
#: BGE-M3 App. B.2: "we insert a [CLS] for each 256 tokens".
MCLS_INTERVAL = 256


class TextEncoder(Protocol):
    def encode(self, texts: list[str], batch_size: int) -> np.ndarray: ...


class MtebEncoder(AbsEncoder):
    """Makes any ``enc.encode(texts, batch_size)`` object evaluable by ``mteb.evaluate``.

    mteb files results under ``<cache>/results/<model name>/<revision>/``, so ``model_name`` and
    ``revision`` must identify the run: two checkpoints evaluated under the same pair would overwrite
    each other's results (and with mteb's default "only-missing" strategy, the second would silently
    be skipped).

    ``max_length`` (None: the encoder's own) is the token budget per text; ``mcls`` embeds with
    BGE-M3's Multiple CLS (module docstring, `mcls_encode`), a [CLS] every ``mcls_interval`` tokens.
    Both are checked here, before mteb reads any task.
    """

    def __init__(
        self,
        enc: TextEncoder,
        model_name: str,
        revision: str,
        query_instruction: str | None = None,
        embed_dim: int | None = None,
        max_length: int | None = None,
        mcls: bool = False,
        mcls_interval: int = MCLS_INTERVAL,
    ) -> None:
        if not revision or not str(revision).strip():
            raise ValueError("revision must be a non-empty string that identifies this run")
        if not isinstance(mcls, bool):
            raise TypeError(f"eval.mcls must be true or false, got {mcls!r}")
        if mcls:
            check_mcls(enc, mcls_interval, max_length)
        elif max_length is not None:
            if not _accepts(enc, "max_length"):
                raise TypeError(f"eval.max_length: {type(enc).__name__}.encode takes no max_length")
            _check_length(enc, max_length)
        self.max_length = max_length
        self.mcls = mcls
        self.mcls_interval = mcls_interval
        # mteb requires "organization/model" names
        name = model_name if "/" in model_name else f"embedkit/{model_name}"
        self.model = enc
        self._cache: dict[str, np.ndarray] = {}
        self.query_instruction = query_instruction or None
        self.mteb_model_meta = ModelMeta(
            loader=None,
            name=name,
            revision=str(revision),
            release_date=None,
            languages=["cmn-Hans"],
            n_parameters=None,
            memory_usage_mb=None,
            max_tokens=None,
            embed_dim=embed_dim,
            license=None,
            open_weights=None,
            public_training_code=None,
            public_training_data=None,
            framework=["PyTorch"],
            similarity_fn_name=ScoringFunction.COSINE,
            use_instructions=self.query_instruction is not None,
            training_datasets=None,
        )

    def instruction_for(self, task_metadata: TaskMetadata, prompt_type: PromptType | None) -> str:
        if (
            self.query_instruction
            and prompt_type == PromptType.query
            and task_metadata.type in INSTRUCTION_TASK_TYPES
        ):
            return self.query_instruction
        return ""

    def encode(
        self,
        inputs: DataLoader,
        *,
        task_metadata: TaskMetadata,
        hf_split: str,
        hf_subset: str,
        prompt_type: PromptType | None = None,
        **kwargs: Any,
    ) -> np.ndarray:
        prefix = self.instruction_for(task_metadata, prompt_type)
        batch_size = int(kwargs.get("batch_size") or inputs.batch_size or 32)
        texts = [prefix + text for batch in inputs for text in batch["text"]]
        # The mini C-MTEB repeats texts a lot (CMRC re-ranking lists share paragraphs, TNews is both
        # classified and clustered, the SNLI tasks share hypotheses), and the model is frozen during
        # evaluation: embed each distinct text once, in one length-sorted pass, and reuse it.
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if missing:
            kind = prompt_type.value if prompt_type else "texts"
            progress = {"show_progress": bool(kwargs.get("show_progress_bar", False)),
                        "desc": f"{task_metadata.name} {kind}"}
            if self.mcls:
                vectors = mcls_encode(self.model, missing, batch_size, interval=self.mcls_interval,
                                      max_length=self.max_length, **progress)
            else:
                extra = {} if self.max_length is None else {"max_length": self.max_length}
                if _accepts(self.model, "show_progress"):
                    extra.update(progress)
                vectors = self.model.encode(missing, batch_size=batch_size, **extra)
            for text, vec in zip(missing, np.asarray(vectors, dtype=np.float32)):
                self._cache[text] = vec
        if not texts:
            return np.zeros((0, self.mteb_model_meta.embed_dim or 0), np.float32)
        return np.stack([self._cache[t] for t in texts])


def _accepts(model, argument: str) -> bool:
    import inspect

    try:
        return argument in inspect.signature(model.encode).parameters
    except (TypeError, ValueError):
        return False


# ---------------------------------------------------------------- MCLS (BGE-M3 App. B.2)

def position_limit(backbone) -> int | None:
    """The longest sequence the backbone's learned position table holds: `max_position_embeddings`,
    less RoBERTa / XLM-R's offset (their positions start at padding_idx + 1, so bge-m3's 8194
    positions hold 8192 tokens); None when the config names no limit."""
    limit = getattr(getattr(backbone, "config", None), "max_position_embeddings", None)
    if limit is None:
        return None
    padding_idx = getattr(getattr(backbone, "embeddings", None), "padding_idx", None)
    return int(limit) - (padding_idx + 1 if padding_idx is not None else 0)


def _check_length(encoder, max_length: int, mcls: bool = False) -> int:
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"eval.max_length must be a number of tokens >= 2 (or null: the encoder's "
                         f"own), got {max_length!r}")
    limit = position_limit(getattr(encoder, "backbone", None))
    if limit is not None and max_length > limit:
        raise ValueError(
            f"max_length {max_length} (eval.max_length, else the encoder's own) exceeds the model's "
            f"{limit} positions (max_position_embeddings="
            f"{encoder.backbone.config.max_position_embeddings})"
            + ("; MCLS's inserted [CLS] tokens count towards it" if mcls else "")
            + f": set eval.max_length <= {limit}")
    return max_length


def check_mcls(encoder, interval: int, max_length: int | None = None) -> int:
    """The sequence length MCLS will use for `encoder` (`max_length`, else the encoder's own), or a
    clear error for an encoder, interval or length it cannot work with."""
    missing = [a for a in ("tokenizer", "backbone", "pooling", "hidden_states") if not hasattr(encoder, a)]
    if missing:
        raise TypeError(f"eval.mcls needs embedkit's TextEncoder (a tokenizer, a backbone and CLS "
                        f"pooling); {type(encoder).__name__} has no {', '.join(missing)}")
    if encoder.pooling != "cls":
        raise ValueError(f"eval.mcls averages [CLS] states, but the encoder pools {encoder.pooling!r}; "
                         f"MCLS is defined for CLS-pooled models (BGE-M3 App. B.2)")
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise ValueError(f"eval.mcls_interval must be a positive number of tokens, got {interval!r}")
    tokenizer = encoder.tokenizer
    if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None:
        raise ValueError(f"eval.mcls: the tokenizer ({type(tokenizer).__name__}) has no CLS or SEP token")
    return _check_length(encoder, max_length if max_length is not None else encoder.max_length, mcls=True)


def mcls_kept_tokens(max_length: int, interval: int) -> int:
    """The most text tokens m that fit: m + ceil(m / interval) + 1 <= max_length (k = ceil(m / I)
    CLS tokens, one SEP)."""
    m = max_length - 2
    while m > 0 and m + math.ceil(m / interval) + 1 > max_length:
        m -= 1
    return m


def mcls_sequence(ids: Sequence[int], cls_id: int, sep_id: int, interval: int) -> tuple[list[int], list[int]]:
    """(input ids, CLS positions) of one text: a CLS before every `interval` of its token `ids`
    (given without special tokens), one SEP at the end. An empty text is [CLS] [SEP]."""
    seq: list[int] = []
    positions: list[int] = []
    for start in range(0, max(len(ids), 1), interval):
        positions.append(len(seq))
        seq.append(cls_id)
        seq.extend(ids[start:start + interval])
    seq.append(sep_id)
    return seq, positions


def mcls_encode(encoder, texts: Sequence[str], batch_size: int, interval: int = MCLS_INTERVAL,
                max_length: int | None = None, show_progress: bool = False,
                desc: str = "encode") -> np.ndarray:
    """MCLS embeddings (module docstring) of `texts`, float32, in the input order, in
    length-sorted batches as `TextEncoder.encode`."""
    import torch
    import torch.nn.functional as F

    length = check_mcls(encoder, interval, max_length)
    texts = list(texts)
    if not texts:
        return np.zeros((0, encoder.dim), dtype=np.float32)
    tok = encoder.tokenizer
    cls_id, sep_id = tok.cls_token_id, tok.sep_token_id
    # Its own frame must be CLS ... SEP, or a short text would not be its plain embedding.
    framed = tok(texts[0], truncation=False, verbose=False)["input_ids"]
    bare = tok(texts[0], add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    if framed != [cls_id, *bare, sep_id]:
        raise ValueError(f"eval.mcls: the tokenizer frames a text as {tok.convert_ids_to_tokens(framed[:1])} "
                         f"... {tok.convert_ids_to_tokens(framed[-1:])}, not {tok.cls_token} ... "
                         f"{tok.sep_token}; MCLS inserts that CLS token")
    keep = mcls_kept_tokens(length, interval)
    ids = tok(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    seqs = [mcls_sequence(x[:keep], cls_id, sep_id, interval) for x in ids]
    order = np.argsort([-len(seq) for seq, _ in seqs], kind="stable")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    out = np.empty((len(texts), encoder.dim), dtype=np.float32)
    starts = range(0, len(texts), batch_size)
    if show_progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"{desc} (MCLS)", total=(len(texts) + batch_size - 1) // batch_size,
                      leave=False)
    was_training = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    projection = getattr(encoder, "projection", None)
    try:
        with torch.no_grad():
            for start in starts:
                idx = order[start:start + batch_size]
                width = len(seqs[idx[0]][0])
                input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                weights = torch.zeros((len(idx), width))   # 1/k at each of a text's k CLS positions
                for row, i in enumerate(idx):
                    seq, positions = seqs[i]
                    input_ids[row, :len(seq)] = torch.tensor(seq)
                    mask[row, :len(seq)] = 1
                    weights[row, positions] = 1.0 / len(positions)
                hidden = encoder.hidden_states(input_ids.to(device), mask.to(device))
                emb = torch.einsum("bt,btd->bd", weights.to(device=device, dtype=hidden.dtype), hidden)
                if projection is not None:   # affine, so the mean of projections = projected mean
                    emb = projection(emb)
                if encoder.normalize:
                    emb = F.normalize(emb, dim=-1)
                out[idx] = emb.float().cpu().numpy()
    finally:
        encoder.train(was_training)
    return out
