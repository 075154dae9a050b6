"""Character-level WordPiece vocabulary and BERT tokenizer for Chinese.

Why character level: bert-base-chinese, and the BGE/C-Pack Chinese models built
on it, split every CJK ideograph into its own token and keep WordPiece only for
non-CJK runs (Latin words, numbers), which become one character plus ``##``
continuation characters. A small model trained from scratch here needs the
same scheme so that checkpoints behave like the models the recipes describe,
and so that no Chinese character of the training or evaluation text falls to
``[UNK]``: with a few thousand characters there is no reason to lose any.

Layout of the vocabulary (ids are positions)::

    [PAD] [UNK] [CLS] [SEP] [MASK]        ids 0-4; PAD is 0 as models assume
    a..z 0..9 and ##a..##z ##0..##9       so any ASCII word or number splits
    ASCII punctuation                     always a token of its own in BERT
    characters seen in the texts          most frequent first, ties by codepoint

Only lower-case letters are listed because the tokenizer lower-cases
(``do_lower_case=True``, as bert-base-chinese does); upper-case entries could
never be produced. Punctuation gets no ``##`` form because BERT's
pre-tokenizer always splits punctuation off, so it is never a continuation.

The characters "seen in the texts" are counted *after* the tokenizer's own
normalizer and pre-tokenizer (lower-casing, accent stripping, CJK splitting,
punctuation splitting), and a character that appears inside a non-CJK word is
also counted in its ``##`` form. So every piece the tokenizer can produce from
the training text is in the vocabulary, e.g. ``é`` arrives as ``e`` and a kana
word ``ひらがな`` needs ``ひ ##ら ##が ##な``.

Tokenizer construction: in transformers 5 ``BertTokenizerFast`` is an alias of
``BertTokenizer`` (tokenizers backend), and its ``vocab_file=`` argument is
silently ignored, leaving a 5-token vocabulary that maps every character to
``[UNK]``. The vocabulary is therefore passed as a dict (``vocab=``), saved with
``save_pretrained`` (``tokenizer.json`` + ``tokenizer_config.json``), and
``vocab.txt`` is written beside it for tools and humans that read it.
:func:`load_tokenizer` checks the loaded tokenizer against that file.
"""

from __future__ import annotations

import os
import re
import string
import uuid
from collections import Counter
from pathlib import Path
from typing import Iterable

from tokenizers import normalizers, pre_tokenizers
from transformers import AutoTokenizer, BertTokenizer, PreTrainedTokenizerFast

__all__ = [
    "SPECIAL_TOKENS",
    "base_tokens",
    "count_pieces",
    "build_char_vocab",
    "save_tokenizer",
    "load_tokenizer",
    "read_vocab_txt",
]

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
CONTINUATION = "##"
DEFAULT_MAX_LENGTH = 512


def base_tokens() -> list[str]:
    """Specials plus the fixed ASCII block; identical for every vocabulary."""
    alnum = list(string.ascii_lowercase + string.digits)
    return (
        list(SPECIAL_TOKENS)
        + alnum
        + [CONTINUATION + c for c in alnum]
        + list(string.punctuation)
    )


def _normalizer() -> normalizers.Normalizer:
    # Must match what BertTokenizer(do_lower_case=True) builds, so the counts
    # are over exactly the pieces the saved tokenizer will look up.
    return normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
    )


# Characters that always end a BERT word: whitespace (Zs and \t\n\r) and the
# basic CJK ideograph blocks, which the normalizer pads with spaces. Everything
# else is grouped into runs that the real tokenizer pipeline splits.
_BOUNDARY = " \t\n\r\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_RUN_RE = re.compile(f"[^{_BOUNDARY}]+")


class _PieceSplitter:
    """The saved tokenizer's normalizer + pre-tokenizer, applied to one string."""

    def __init__(self) -> None:
        self.norm = _normalizer()
        self.pre = pre_tokenizers.BertPreTokenizer()

    def __call__(self, text: str) -> list[str]:
        out = []
        for word, _ in self.pre.pre_tokenize_str(self.norm.normalize_str(text)):
            out.append(word[0])
            out.extend(CONTINUATION + ch for ch in word[1:])
        return out


class TextStream:
    """Texts from several parts (each a callable returning an iterable), re-iterable: every
    `iter()` calls the parts again, so a vocabulary can hash the texts, then count them, in two
    streaming passes without ever holding them in one list (C-MTP's rows come from the store)."""

    def __init__(self, parts):
        self.parts = list(parts)

    def __iter__(self):
        for part in self.parts:
            yield from part()


def count_pieces(texts: Iterable[str]) -> Counter:
    """Frequency of every character piece (plain or ``##``) the tokenizer would need.

    Equivalent to running the tokenizer's normalizer and pre-tokenizer over
    each text, but that costs seconds on the 3.5M-character People's Daily
    corpus because of per-call overhead. Since words never cross whitespace or
    a CJK ideograph, the text is cut into those boundary characters (counted
    one by one in C) and the runs between them (counted as whole strings);
    only the distinct characters and distinct runs go through the real
    pipeline.
    """
    singles: Counter = Counter()
    runs: Counter = Counter()
    for text in texts:
        if not text:
            continue
        runs.update(_RUN_RE.findall(text))
        singles.update(_RUN_RE.sub("", text))
    split = _PieceSplitter()
    pieces: Counter = Counter()
    for unit_counts in (singles, runs):
        for unit, n in unit_counts.items():
            for piece in split(unit):
                pieces[piece] += n
    return pieces


def _count_pieces_reference(texts: Iterable[str]) -> Counter:
    """Straightforward per-text version of :func:`count_pieces`, for tests."""
    split = _PieceSplitter()
    pieces: Counter = Counter()
    for text in texts:
        pieces.update(split(text))
    return pieces


def build_char_vocab(
    texts: Iterable[str],
    min_freq: int = 1,
    max_size: int | None = None,
    always_include: Iterable[str] = (),
) -> list[str]:
    """Vocabulary list (index = token id); see the module docstring for layout.

    ``max_size`` caps the total size, fixed block included, by dropping the
    rarest characters of ``texts``.

    ``always_include`` is text whose pieces must never become ``[UNK]`` even if
    ``texts`` lacks them or has them below ``min_freq``, e.g. evaluation text:
    its characters are appended after the frequency-ranked ones, in codepoint
    order, and do not influence that ranking. Their embeddings then simply get
    no training signal, as in bert-base-chinese's rare rows, which beats every
    such character collapsing onto one shared ``[UNK]`` vector.
    """
    if min_freq < 1:
        raise ValueError(f"min_freq must be >= 1, got {min_freq}")
    vocab = base_tokens()
    present = set(vocab)
    extra = sorted(set(count_pieces(always_include)) - present)
    room = None if max_size is None else max_size - len(vocab) - len(extra)
    if room is not None and room < 0:
        raise ValueError(
            f"max_size={max_size} leaves no room: the fixed block has {len(vocab)} tokens "
            f"and always_include needs {len(extra)}"
        )
    extra_set = set(extra)
    ranked = sorted(
        (
            (tok, n)
            for tok, n in count_pieces(texts).items()
            if n >= min_freq and tok not in present and tok not in extra_set
        ),
        key=lambda kv: (-kv[1], kv[0]),
    )
    if room is not None:
        ranked = ranked[:room]
    vocab.extend(tok for tok, _ in ranked)
    vocab.extend(extra)
    return vocab


def _check_vocab(vocab: list[str]) -> None:
    if list(vocab[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
        raise ValueError(f"vocab must start with {SPECIAL_TOKENS}, got {list(vocab[:5])}")
    dupes = [t for t, n in Counter(vocab).items() if n > 1]
    if dupes:
        raise ValueError(f"vocab has duplicate tokens: {dupes[:10]}")
    bad = [t for t in vocab if not t or any(ch.isspace() for ch in t)]
    if bad:
        raise ValueError(f"vocab tokens must be non-empty and contain no whitespace: {bad[:10]}")


def read_vocab_txt(path: str | os.PathLike) -> list[str]:
    with open(path, encoding="utf-8") as fh:
        return [line.rstrip("\n") for line in fh if line.rstrip("\n")]


def save_tokenizer(
    vocab: list[str], out_dir: str | os.PathLike, model_max_length: int = DEFAULT_MAX_LENGTH
) -> PreTrainedTokenizerFast:
    """Write ``vocab.txt`` and a loadable fast tokenizer; return it as reloaded from disk.

    Returning the reloaded tokenizer (not the in-memory one) means the caller
    uses exactly what ``AutoTokenizer.from_pretrained(out_dir)`` will give the
    training code and sentence-transformers later.
    """
    vocab = list(vocab)
    _check_vocab(vocab)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = BertTokenizer(
        vocab={t: i for i, t in enumerate(vocab)},
        do_lower_case=True,
        tokenize_chinese_chars=True,
        strip_accents=None,
        model_max_length=model_max_length,
    )
    tok.save_pretrained(str(out))
    # vocab.txt is written last and atomically: a parallel job that finds it in a shared cache
    # (embedkit.models.build.char_level_tokenizer) reads a whole file, never a half-written one.
    tmp = out / f"vocab.txt.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
        fh.write("\n".join(vocab) + "\n")
    os.replace(tmp, out / "vocab.txt")
    return load_tokenizer(out)


def load_tokenizer(directory: str | os.PathLike) -> PreTrainedTokenizerFast:
    """``AutoTokenizer.from_pretrained`` plus a check against ``vocab.txt``.

    The check exists because a tokenizer that silently lost its vocabulary
    still loads and runs; it just returns ``[UNK]`` for everything.
    """
    directory = Path(directory)
    tok = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)  # a vocabulary, no code
    vocab_txt = directory / "vocab.txt"
    if vocab_txt.is_file():
        expected = read_vocab_txt(vocab_txt)
        got = tok.get_vocab()
        if len(got) != len(expected) or any(got.get(t) != i for i, t in enumerate(expected)):
            raise ValueError(
                f"tokenizer in {directory} does not match its vocab.txt "
                f"({len(got)} vs {len(expected)} tokens); was it built from vocab_file=?"
            )
    if tok.pad_token_id != 0:
        raise ValueError(f"tokenizer in {directory} has pad_token_id={tok.pad_token_id}, expected 0")
    return tok
