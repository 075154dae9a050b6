"""Adapter from embedkit's encoders to mteb 2.x's encoder protocol.

mteb hands the encoder a DataLoader plus the task metadata and whether the texts are queries or
documents; embedkit encoders only know ``encode(texts, batch_size) -> float32 L2-normalised array``.
This wrapper bridges the two and applies BGE's C-MTEB instruction rule.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ModelMeta, ScoringFunction
from mteb.types import PromptType

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

    from mteb.abstasks.task_metadata import TaskMetadata

# BGE prepends its instruction to retrieval and reranking queries and nowhere else: not to passages,
# and not to STS / pair-classification / classification / clustering texts.
INSTRUCTION_TASK_TYPES = frozenset({"Retrieval", "Reranking"})


class TextEncoder(Protocol):
    def encode(self, texts: list[str], batch_size: int) -> np.ndarray: ...


class MtebEncoder(AbsEncoder):
    """Makes any ``enc.encode(texts, batch_size)`` object evaluable by ``mteb.evaluate``.

    mteb files results under ``<cache>/results/<model name>/<revision>/``, so ``model_name`` and
    ``revision`` must identify the run: two checkpoints evaluated under the same pair would overwrite
    each other's results (and with mteb's default "only-missing" strategy, the second would silently
    be skipped).
    """

    def __init__(
        self,
        enc: TextEncoder,
        model_name: str,
        revision: str,
        query_instruction: str | None = None,
        embed_dim: int | None = None,
    ) -> None:
        if not revision or not str(revision).strip():
            raise ValueError("revision must be a non-empty string that identifies this run")
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
            vectors = self.model.encode(missing, batch_size=batch_size,
                                        show_progress=bool(kwargs.get("show_progress_bar", False)),
                                        desc=f"{task_metadata.name} {kind}") \
                if _accepts_progress(self.model) else self.model.encode(missing, batch_size=batch_size)
            for text, vec in zip(missing, np.asarray(vectors, dtype=np.float32)):
                self._cache[text] = vec
        if not texts:
            return np.zeros((0, self.mteb_model_meta.embed_dim or 0), np.float32)
        return np.stack([self._cache[t] for t in texts])


def _accepts_progress(model) -> bool:
    import inspect

    try:
        return "show_progress" in inspect.signature(model.encode).parameters
    except (TypeError, ValueError):
        return False
