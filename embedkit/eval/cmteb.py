"""Run mteb on (mini or official) C-MTEB tasks and aggregate the scores the way C-MTEB does.

C-MTEB reports main scores x100, a mean per task category, and an overall "Avg" that is the mean over
all tasks (not over categories, so categories with many tasks weigh more).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embedkit.redact import write_json

if TYPE_CHECKING:
    from mteb.abstasks.abstask import AbsTask

    from embedkit.eval.encoder import MtebEncoder

# mteb task type -> short column name, in the order C-MTEB tables use
CATEGORIES = {
    "Retrieval": "Retrieval",
    "STS": "STS",
    "PairClassification": "PairCLF",
    "Classification": "CLF",
    "Reranking": "Rerank",
    "Clustering": "Cluster",
}

OFFICIAL_BENCHMARK = "MTEB(cmn, v1)"  # mteb's name for C-MTEB (aliases "CMTEB", "MTEB(Chinese)")


class HubUnavailableError(RuntimeError):
    """The official C-MTEB datasets live on the Hugging Face hub, which could not be reached."""


def summarize(task_scores: Mapping[str, tuple[str, float]]) -> dict[str, Any]:
    """C-MTEB aggregation of ``{task name: (mteb task type, main score)}``.

    Returns ``{"tasks": {name: score}, "categories": {short name: mean}, "Avg": mean over tasks}``;
    scores are passed through unscaled.
    """
    if not task_scores:
        raise ValueError("no task scores to summarize")
    by_category: dict[str, list[float]] = {}
    for name, (task_type, score) in task_scores.items():
        if task_type not in CATEGORIES:
            raise ValueError(f"task {name!r} has type {task_type!r}; known types are {list(CATEGORIES)}")
        by_category.setdefault(CATEGORIES[task_type], []).append(float(score))
    categories = {
        short: sum(by_category[short]) / len(by_category[short])
        for short in CATEGORIES.values()
        if short in by_category
    }
    all_scores = [float(score) for _, score in task_scores.values()]
    return {
        "tasks": {name: float(score) for name, (_, score) in task_scores.items()},
        "categories": categories,
        "Avg": sum(all_scores) / len(all_scores),
    }


def _is_hub_error(error: BaseException) -> bool:
    from huggingface_hub.errors import LocalEntryNotFoundError

    return isinstance(error, ConnectionError | LocalEntryNotFoundError)


def evaluate_tasks(
    encoder_wrapper: MtebEncoder,
    tasks: Sequence[AbsTask],
    output_dir: str | Path,
    batch_size: int,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Evaluates with ``mteb.evaluate`` and writes ``output_dir/results.json``.

    mteb's own per-task result files go to ``output_dir/mteb/results/<model>/<revision>/``. Every call
    recomputes (overwrite strategy "always"): a re-run after retraining must not be served stale scores.
    """
    import datasets
    import mteb
    from threadpoolctl import threadpool_limits

    from embedkit.console import progress

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    cache = mteb.ResultCache(cache_path=output_dir / "mteb")
    meta = encoder_wrapper.mteb_model_meta

    task_scores: dict[str, tuple[str, float]] = {}
    with contextlib.ExitStack() as stack:
        if datasets.is_progress_bar_enabled():
            datasets.disable_progress_bars()  # mteb's dataset.map calls would print one bar each
            stack.callback(datasets.enable_progress_bars)
        # mteb scores with many small numpy/scipy BLAS calls (logistic regression probes, correlations); on
        # our 2-core machines multi-threaded OpenBLAS made those ~10x slower than one thread (TNews
        # classification on 150 rows: 20 s -> 2 s). torch has its own thread pool; encoding is unaffected.
        stack.enter_context(threadpool_limits(limits=1, user_api="blas"))
        # One bar over the tasks (plain lines outside a terminal: embedkit/console.py); the bars
        # inside a task (our encoder's batches, mteb's corpus chunks and reranked queries) are off:
        # nested in ours they broke into fragments, and a task takes seconds at mini scale.
        bar = progress(tasks, desc="mteb tasks", enabled=show_progress)
        for task in bar:
            name = task.metadata.name
            bar.set_postfix_str(name)
            try:
                result = mteb.evaluate(
                    encoder_wrapper,
                    task,
                    cache=cache,
                    overwrite_strategy="always",
                    encode_kwargs={"batch_size": batch_size, "show_progress_bar": False},
                    show_progress_bar=False,
                    co2_tracker=False,
                    raise_error=True,
                )
            except KeyError as e:
                if e.args and e.args[0] == task.metadata.main_score:
                    raise ValueError(
                        f"task {name!r}: mteb computed no score named {e.args[0]!r}; fix main_score "
                        "(mteb 2.x names, e.g. ndcg_at_10, map_at_1000, cosine_spearman, max_ap, accuracy, v_measure)"
                    ) from e
                raise
            except Exception as e:
                if _is_hub_error(e) and not hasattr(task, "task_dir"):  # local tasks never touch the hub
                    raise HubUnavailableError(
                        f"Evaluating the official C-MTEB task {name!r} needs the Hugging Face hub: eval=cmteb "
                        f"downloads its datasets from there, and the hub could not be reached ({e}). Run with "
                        "network access and HF_HUB_OFFLINE/HF_DATASETS_OFFLINE unset, or evaluate the local "
                        "zh-mini tasks instead."
                    ) from e
                raise
            # get_score(): mean of mteb's main_score over the evaluated splits and subsets
            task_scores[name] = (task.metadata.type, 100.0 * float(result.task_results[0].get_score()))

    summary = summarize(task_scores)
    summary["main_score_names"] = {task.metadata.name: task.metadata.main_score for task in tasks}
    summary["task_types"] = {name: task_type for name, (task_type, _) in task_scores.items()}
    summary["model"] = {"name": meta.name, "revision": meta.revision}
    summary["mteb_results_dir"] = str(cache.cache_path / "results" / meta.model_name_as_path() / meta.revision)
    write_json(output_dir / "results.json", summary)   # redacted: no credential ever lands in results
    return summary


def official_cmteb_tasks(task_types: Iterable[str] | None = None) -> list[AbsTask]:
    """The official C-MTEB tasks as mteb defines them (metadata ships with mteb, so this works offline).

    ``task_types`` filters by mteb task type (keys of ``CATEGORIES``). The data itself is downloaded from
    the hub when the tasks are evaluated.
    """
    import mteb

    wanted = None if task_types is None else list(task_types)
    if wanted is not None:
        unknown = [t for t in wanted if t not in CATEGORIES]
        if unknown:
            raise ValueError(f"unknown task type(s) {unknown}; valid types are {list(CATEGORIES)}")
    benchmark = mteb.get_benchmark(OFFICIAL_BENCHMARK)
    return [task for task in benchmark.tasks if wanted is None or task.metadata.type in wanted]
