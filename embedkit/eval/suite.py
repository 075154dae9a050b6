"""Evaluation suites that `conf/eval/*.yaml` instantiate; the recipe calls `suite.evaluate(...)`.

- `MiniCMTEB`: the six-category mini C-MTEB read from the zh-mini bundle, scored by mteb.
- `OfficialCMTEB`: C-MTEB's own tasks by name, as `mteb` defines them (needs the hub).

Both use the same mteb encoder wrapper, so the model name and a per-run revision keep results of
different runs apart, and BGE's instruction goes to retrieval and re-ranking queries only.

`suite.floor()` scores the lexical floor (embedkit/eval/lexical.py) on the suite's tasks with that
same evaluation, when `lexical_floor` is on (conf/eval/mini_cmteb.yaml), cached under `cache_dir`.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Mapping, Sequence

log = logging.getLogger(__name__)


_SUITE_DEFAULT = object()


class _Suite:
    name = "suite"

    def __init__(self, batch_size: int = 128, query_instruction: str | None = None,
                 show_progress: bool = True, max_length: int | None = None, mcls: bool = False,
                 mcls_interval: int = 256,   # 256: BGE-M3 App. B.2, as MCLS_INTERVAL
                 lexical_floor: bool = False, cache_dir: str | Path | None = None,
                 during_training: Mapping | None = None):
        if not isinstance(lexical_floor, bool):
            raise ValueError(f"eval.lexical_floor must be true or false, got {lexical_floor!r}")
        self.batch_size = batch_size
        # `eval.during_training` (conf/eval/mini_cmteb.yaml): read by embedkit/eval/callback.py,
        # which scores `subset(...)` of this suite every N optimizer steps.
        self.during_training = dict(during_training or {})
        self.query_instruction = query_instruction
        self.show_progress = show_progress
        # The dense encoding's token budget and BGE-M3's Multiple CLS (embedkit/eval/encoder.py).
        self.max_length = max_length
        self.mcls = mcls
        self.mcls_interval = mcls_interval
        self.lexical_floor = lexical_floor
        self.cache_dir = cache_dir
        self._tasks = None

    def tasks(self):
        if self._tasks is None:
            self._tasks = self._load_tasks()
        return self._tasks

    def _load_tasks(self):
        raise NotImplementedError

    def subset(self, tasks: Sequence[str] | None = None, max_rows: int | None = None) -> "_Suite":
        """A copy of the suite on the tasks named `tasks` (None: the suite's own selection) with at
        most `max_rows` rows each (None: the suite's own cap; never above it), without progress output."""
        if max_rows is not None:
            raise ValueError(f"{type(self).__name__} takes no row cap: eval.during_training.max_rows "
                             f"must be null for eval={self.name}")
        part = copy.copy(self)
        part._tasks, part.show_progress = None, False
        if tasks is not None:
            part.task_names = list(tasks)
        return part

    def check(self) -> None:
        """Load the tasks now, before training (embedkit/recipes/preflight.py): an unknown task
        name or a broken task file then fails in seconds, not after the training it would waste.
        The loaded tasks stay cached, so `evaluate` does not read them again."""
        self.tasks()

    def evaluate(self, encoder=None, *, model_name: str, revision: str, output_dir: str | Path,
                 task_types: Sequence[str] | None = None, mteb_model=None,
                 query_instruction: str | None | object = _SUITE_DEFAULT) -> dict:
        """Score `encoder` (or a ready mteb model, e.g. M3's own search) on the suite's tasks.

        `task_types` restricts the run to some mteb task types (e.g. Retrieval and Reranking for a
        retrieval-only mode); the results then carry only those categories. `query_instruction`
        overrides the suite's for this call (a recipe row evaluates with its last stage's).
        """
        from embedkit.eval.cmteb import evaluate_tasks
        from embedkit.eval.encoder import MtebEncoder

        if mteb_model is None:
            mteb_model = MtebEncoder(encoder, model_name=model_name, revision=revision,
                                     query_instruction=self.query_instruction
                                     if query_instruction is _SUITE_DEFAULT else query_instruction,
                                     embed_dim=getattr(encoder, "dim", None),
                                     max_length=self.max_length, mcls=self.mcls,
                                     mcls_interval=self.mcls_interval)
        elif self.mcls or self.max_length is not None:
            log.info("%s: eval.mcls / eval.max_length apply to the dense encoder; this model "
                     "(%s) encodes as it is built", model_name, type(mteb_model).__name__)
        tasks = self.tasks()
        if task_types:
            tasks = [t for t in tasks if t.metadata.type in set(task_types)]
        results = evaluate_tasks(mteb_model, tasks, output_dir, batch_size=self.batch_size,
                                 show_progress=self.show_progress)
        results["suite"] = self.name
        return results

    def floor(self) -> dict | None:
        """The lexical floor's results on the suite's tasks with the suite's instruction (the
        texts every row's table shares), or None when `lexical_floor` is off. Cached on disk under
        `cache_dir` by a hash of the task data, those texts and the floor's settings."""
        if not self.lexical_floor:
            return None
        from embedkit.eval.lexical import lexical_floor

        results = lexical_floor(self.tasks(), cache_dir=self.cache_dir, query_instruction=self.query_instruction,
                                batch_size=self.batch_size, show_progress=self.show_progress)
        results["suite"] = self.name
        return results


class MiniCMTEB(_Suite):
    """The suite's tasks are folders: `task_dirs` names folders of the bundle's `eval/` (the config
    lists the 12 of the mini C-MTEB; None here means every folder there), `extra_task_dirs` adds
    folders anywhere else (a user's own tasks, same layout). Unlisted folders are never read, so a
    folder added to the bundle changes no average. `tasks` selects among them by folder name."""

    name = "mini_cmteb"

    def __init__(self, data_dir: str, tasks: Sequence[str] | None = None,
                 max_rows: int | None = None, seed: int = 0,
                 task_dirs: Sequence[str] | None = None, extra_task_dirs: Sequence[str] = (),
                 **kwargs):
        super().__init__(**kwargs)
        self.data_dir = data_dir
        self.task_names = None if tasks is None else list(tasks)   # [] selects nothing: an error
        self.max_rows = max_rows
        self.seed = seed
        self.task_dirs = None if task_dirs is None else list(task_dirs)
        self.extra_task_dirs = list(extra_task_dirs or ())

    def subset(self, tasks: Sequence[str] | None = None, max_rows: int | None = None) -> "MiniCMTEB":
        part = super().subset(tasks)
        if max_rows is not None:   # never more rows than the suite itself reads (debug=smoke caps it)
            part.max_rows = max_rows if self.max_rows is None else min(max_rows, self.max_rows)
        return part

    def task_folders(self) -> list[Path]:
        """The suite's task folders, bundled ones first, in the configured order."""
        from embedkit.data.paths import require_data_dir

        folders: list[Path] = []
        if self.task_dirs is None or self.task_dirs:
            eval_dir = require_data_dir(self.data_dir, needs="eval") / "eval"
            names = (sorted(p.name for p in eval_dir.iterdir() if p.is_dir())
                     if self.task_dirs is None else self.task_dirs)
            folders += [eval_dir / str(name) for name in names]
        return folders + [Path(str(d)).expanduser() for d in self.extra_task_dirs]

    def _load_tasks(self):
        from embedkit.eval.tasks import load_task_dirs

        return load_task_dirs(self.task_folders(), names=self.task_names, max_rows=self.max_rows,
                              seed=self.seed, where=f"{self.data_dir}/eval (eval.task_dirs, eval.extra_task_dirs)")


class OfficialCMTEB(_Suite):
    """`tasks` names C-MTEB tasks; an entry may also be an mteb task object (e.g.
    `{_target_: embedkit.eval.tasks.build_task, task_dir: ...}`, a local folder standing in for a
    hub task): it is evaluated as given, through the same mteb path, and needs no hub."""

    name = "cmteb"

    def __init__(self, task_types: Sequence[str] | None = None,
                 tasks: Sequence | None = None, **kwargs):
        super().__init__(**kwargs)
        self.task_types = None if task_types is None else list(task_types)
        tasks = None if tasks is None else list(tasks)   # [] selects nothing: an error
        self.given_tasks = [t for t in tasks or () if not isinstance(t, str)]
        self.task_names = None if tasks is None else [t for t in tasks if isinstance(t, str)]

    def _load_tasks(self):
        from embedkit.eval.cmteb import official_cmteb_tasks

        if self.task_types == [] or (self.task_names == [] and not self.given_tasks):
            raise ValueError("no tasks selected: eval.task_types or eval.tasks is an empty list; "
                             "name some, or give null for every C-MTEB task")
        bad = [t for t in self.given_tasks if not hasattr(t, "metadata")]
        if bad:
            raise TypeError(f"eval.tasks: {bad} are neither C-MTEB task names nor mteb tasks")
        if self.given_tasks and not self.task_names:
            return list(self.given_tasks)
        tasks = official_cmteb_tasks(self.task_types)
        if self.task_names is not None:
            known = {t.metadata.name for t in tasks}
            missing = sorted(set(self.task_names) - known)
            if missing:
                raise ValueError(f"not C-MTEB tasks: {missing}; known: {sorted(known)}")
            tasks = [t for t in tasks if t.metadata.name in self.task_names]
        return tasks + self.given_tasks
