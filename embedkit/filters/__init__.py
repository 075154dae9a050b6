"""Data-quality filters for training pairs (C-Pack, Conan): each is a pipeline stage, called on
FlagEmbedding rows, that returns the rows it keeps and a report of what it kept and dropped."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class FilterReport:
    name: str
    kept: int = 0
    dropped: int = 0
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"name": self.name, "kept": self.kept, "dropped": self.dropped, **self.extra}

    def __str__(self) -> str:
        more = "".join(f", {k} {v}" for k, v in self.extra.items())
        return f"{self.name}: kept {self.kept}, dropped {self.dropped}{more}"
