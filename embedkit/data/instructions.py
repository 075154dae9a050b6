"""Which instruction a training query gets.

BGE adds its retrieval instruction to the queries of retrieval data only: symmetric pairs (NLI,
STS) keep plain queries on both sides (FlagEmbedding README §2.2; its C-MTEB script likewise uses
the instruction for Retrieval and Reranking queries only). FlagEmbedding expresses this per row:
a row's `prompt` field, when present, replaces the global instruction, and `""` means none. A
source can stamp its rows with a prompt (`embedkit.data.sources.zh_mini_jsonl(prompt=...)`).
"""

from __future__ import annotations


def instructed_query(example: dict, instruction: str | None) -> str:
    """The query text as the model sees it: the row's own `prompt`, else `instruction`, in front."""
    prompt = example.get("prompt")
    return (instruction or "" if prompt is None else prompt) + example["query"]
