"""The paper path (`scale=paper`) end to end, with only the SIZES swapped for a 2-core CPU.

Every experiment runs `python run.py +experiment=NAME scale=paper` for real: the paper configs'
model loader (`model=hf`: hf_encoder / pretrained_tokenizer, CLS pooling), their corpora globs
(conf/scale/paper.yaml `corpora`, read through EMBEDKIT_PAPER_DATA_DIR; the general stage served
from the on-disk arrow store), their stages, objectives, callbacks and eval suite
(`eval=cmteb`, OfficialCMTEB through mteb). What is swapped, and why:

- the model: a 2-layer, 32-wide BERT saved with save_pretrained in tmp_path (its WordPiece
  vocabulary: the stand-in texts' characters), given as `model.name_or_path` (every paper start:
  chinese-roberta-wwm-ext(-large), BAAI/bge-m3-unsupervised); max lengths 16-64 tokens;
- the data: a few dozen rows per corpus in the paper formats, written from zh-mini's train/ rows
  (tests/helpers.py `write_paper_standins`); two C-MTP labeled / M3 files, since those stages
  batch one file per global batch (`data.same_source_within_batch`);
- the devices: `trainer.devices=2 num_nodes=1 accelerator=cpu` (2 gloo ranks, Lightning's `ddp`
  strategy re-running the command per rank, as torchrun would), `precision=32-true` (fp16/bf16
  mixed precision needs a GPU), and for the Conan-Embedding configs `strategy=ddp` instead of
  `deepspeed_stage_1` (DeepSpeed is not installed and ZeRO-1 needs GPUs); per-device batches of
  2-4; `max_steps=2` in every stage; the experiments' rows keep their chains and non-size
  overrides, with their batch sizes, devices and nodes made small (`_small_rows`);
- the eval: `eval.tasks` lists one local mteb task (zh-mini's CMRCRetrieval, 16 rows, built by
  embedkit.eval.tasks.build_task) instead of hub task names: OfficialCMTEB evaluates given task
  objects through the same mteb path (embedkit/eval/suite.py).

What reaches the live objects is recorded by embedkit/recipes/probe.py's SettingsProbe on every
rank in every stage (each task's first batch, each loss's first call), and compared with what `python run.py ... plan=true` prints for
the same command line (the lr, τ, global batch and negatives per query as the plan computes them);
that plan's lr, τ and objective settings are in turn compared with the plan of the unmodified
paper config, so nothing but sizes differs from the paper's.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import DATA, REPO, paper_standin_texts, write_local_bert, write_paper_standins

EVAL_TASK = DATA / "eval" / "CMRCRetrieval"
SMALL_BATCH = 2          # per device
SMALL = {"devices": 2, "num_nodes": 1}

#: Per experiment: its stages' size overrides (batch sizes, lengths; nothing else).
SIZES = {
    "bge_ablation_recipe": [
        "stages.pretrain.data.batch_size=2", "stages.pretrain.data.max_len=32",
        "stages.general.data.batch_size=2", "stages.general.data.query_max_len=16",
        "stages.general.data.passage_max_len=32",
        "stages.task.data.batch_size=2", "stages.task.data.query_max_len=16",
        "stages.task.data.passage_max_len=32",
        # the mined negatives' rank window and count, for a 48-row stand-in corpus (paper: 2-200, 15)
        "stages.task.data.mining.range_for_sampling='2-20'", "stages.task.data.mining.negative_number=3",
    ],
    "bge_ablation_batchsize": [
        "stages.pretrain.data.batch_size=2", "stages.pretrain.data.max_len=32",
        "stages.general.data.query_max_len=16", "stages.general.data.passage_max_len=32",
    ],
    "bge_ablation_batchsize_gradcache": [
        "stages.pretrain.data.batch_size=2", "stages.pretrain.data.max_len=32",
        "stages.general.data.query_max_len=16", "stages.general.data.passage_max_len=32",
    ],
    "conan_ablation": [
        "stages.general.data.batch_size=2", "stages.general.data.query_max_len=16",
        "stages.general.data.passage_max_len=32",
        "finetune.retrieval_batch=2", "finetune.sts_batch=4", "finetune.max_len=32",
        "finetune.query_max_len=16", "finetune.check_every=1",
        "stages.general.trainer.strategy=ddp", "finetune.strategy=ddp",
        "stages.general.trainer.devices=2", "stages.general.trainer.num_nodes=1",
        "finetune.devices=2", "finetune.num_nodes=1",
    ],
    "m3_ablation_selfdistill": [
        "m3.batch_size=2", "m3.query_max_len=16", "m3.passage_max_len=32",
        "m3.trainer.devices=2", "m3.trainer.num_nodes=1",
        "stages.warmup.trainer.devices=2", "stages.warmup.trainer.num_nodes=1",
        "stages.unified.trainer.devices=2", "stages.unified.trainer.num_nodes=1",
    ],
    "mrl_dims": [
        "data.batch_size=2", "data.query_max_len=16", "data.passage_max_len=32",
        "trainer.strategy=ddp",
    ],
}


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    """The stand-in corpora and the local BERT, shared by the module's tests (read-only to them)."""
    root = tmp_path_factory.mktemp("paper")
    data = write_paper_standins(root / "data")
    bert = write_local_bert(root / "bert", paper_standin_texts(data, [EVAL_TASK]))
    return {"data": data, "bert": bert}


def _env(standins, tmp_path) -> dict:
    env = dict(os.environ, EMBEDKIT_PAPER_DATA_DIR=str(standins["data"]), EMBEDKIT_CACHE_DIR=str(tmp_path / "cache"),
               WANDB_MODE="offline", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    for key in ("CMTP_DIR", "CMTP_LABELED_DIR", "WANDB_API_KEY"):
        env.pop(key, None)
    return env


def _run(args, env, tmp_path, timeout):
    proc = subprocess.run([sys.executable, "run.py", *args, f"paths.log_dir={tmp_path}/logs"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout


def _compose(experiment, overrides=()):
    from helpers import compose

    return compose([f"+experiment={experiment}", "scale=paper", *overrides])


def _small_rows(experiment) -> list[str]:
    """The experiment's paper rows with each row's batch sizes, devices and nodes made small
    (a row's overrides win over the command line's, so they are rewritten, not overridden)."""
    from omegaconf import OmegaConf

    rows = ((_compose(experiment).get("ablation") or {}).get("rows") or {}).get("paper")
    if not rows:
        return []
    rows = OmegaConf.to_container(rows, resolve=False)
    for row in rows:
        for key, value in list((row.get("overrides") or {}).items()):
            last = key.rsplit(".", 1)[-1]
            if last == "batch_size":
                row["overrides"][key] = SMALL_BATCH
            elif last in SMALL:
                row["overrides"][key] = SMALL[last]
            elif last == "grad_cache":
                row["overrides"][key] = {**value, "mini_batch": 1}   # 1 of 2 rows per chunk: it replays
    return ["ablation.rows.paper=" + _override_value(rows)]


def _override_value(value) -> str:
    """`value` in Hydra's override grammar (dict keys bare, strings quoted)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_override_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_override_value(v) for v in value) + "]"
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return "null" if value is None else json.dumps(value)


def _stages(experiment) -> dict[str, bool]:
    """{stage: whether its data module takes num_workers} (multi-task data sets it per task)."""
    stages = _compose(experiment).get("stages") or {}
    return {name: not str(spec.data.get("_target_", "")).endswith("MultiTaskDataModule")
            for name, spec in stages.items()}


def _args(experiment, standins, probe_dir) -> list[str]:
    probe = f"{{_target_: embedkit.recipes.probe.SettingsProbe, out_dir: {probe_dir}}}"
    stages = _stages(experiment)
    args = [f"+experiment={experiment}", "scale=paper", "logger=csv", f"model.name_or_path={standins['bert']}",
            "model.encoder.max_length=64", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.num_nodes=1",
            "trainer.precision=32-true", "trainer.max_steps=2", "data.num_workers=0", "eval.batch_size=16",
            f"eval.tasks=[{{_target_: embedkit.eval.tasks.build_task, task_dir: {EVAL_TASK}, max_rows: 16}}]",
            "eval.show_progress=false", *SIZES[experiment], *_small_rows(experiment)]
    for stage, workers in stages.items():
        args += [f"++stages.{stage}.trainer.max_steps=2", f"++stages.{stage}.trainer.precision=32-true",
                 f"++stages.{stage}.trainer.accelerator=cpu", f"++stages.{stage}.callbacks.probe={probe}"]
        if workers:   # loader processes: 2 ranks x paper.yaml's 4 workers on 2 cores only slow it down
            args += [f"++stages.{stage}.data.num_workers=0"]
    if not stages:
        args.append(f"+callbacks.probe={probe}")
    return args


# ---------------------------------------------------------------- the plan, parsed

def parse_plan(text: str) -> list[dict]:
    """`plan=true`'s output as [{row, stage, dir, lines: {key: value}}], in the printed order."""
    out, row = [], None
    for line in text.splitlines():
        if m := re.match(r"== row (.+?)(?:  \(paper row: .*\))?$", line):
            row = m.group(1)
        elif m := re.match(r"\s+-- stage (\S+)\s+\((.+)\)$", line):
            out.append({"row": row, "stage": m.group(1), "dir": m.group(2), "lines": {}})
        elif out and (m := re.match(r"\s{6}(\S[^:]*):\s+(.*)$", line)):
            out[-1]["lines"][m.group(1).strip()] = m.group(2).strip()
    return out


def trained_in_order(plan: list[dict]) -> list[dict]:
    """The stages the recipe trains, in order: each row's chain, a shared stage only once."""
    seen, order = set(), []
    for stage in plan:
        if stage["dir"] not in seen:
            seen.add(stage["dir"])
            order.append(stage)
    return order


def _number(text: str) -> float:
    return float(text.replace(",", ""))


def _lr(lines) -> float:
    return _number(re.search(r"lr ([0-9.e+-]+)", lines["optimiser"]).group(1))


def _weights(text: str) -> dict:
    return {k: _number(v) for k, v in re.findall(r"(\w+) ([0-9.e+-]+)", text)}


def _dims(text: str) -> list[int]:
    return [int(d) for d in re.search(r"dims \[([0-9, ]+)\]", text).group(1).split(", ")]


def _global(text: str) -> int:
    return int(_number(re.search(r"= ([0-9,]+) global", text).group(1)))


def _negatives(text: str) -> int | None:
    m = re.match(r"([0-9,]+) =", text)
    return int(_number(m.group(1))) if m else None


# ---------------------------------------------------------------- the checks

def check_stage(stage: dict, paper: dict, records: list[dict]) -> None:
    """One trained stage: its plan lines (`stage`), the unmodified paper plan's (`paper`), and
    the probe's records of its two ranks."""
    lines, where = stage["lines"], f"{stage['row']} / {stage['stage']}"
    assert sorted(r["rank"] for r in records) == [0, 1], where
    assert _lr(lines) == _lr(paper["lines"]), where   # sizes only: the paper's lr
    for rec in records:
        assert rec["world_size"] == 2 and rec["precision"] == "32-true" and rec["max_steps"] == 2, (where, rec)
        assert rec["strategy"] == "DDPStrategy", (where, rec["strategy"])
        # the paper's lr reached the optimiser (warm-up starts from 0: the base is what was set)
        assert rec["lr"]["base_lrs"] and all(lr == pytest.approx(_lr(lines)) for lr in rec["lr"]["base_lrs"]), where
        assert all(lr == pytest.approx(_lr(lines)) for lr in rec["lr"]["initial_lr"]), where
    tasks = [k[:-len(".batch")] for k in lines if k.endswith(".batch")] or [""]
    if "mode sequential" in lines.get("tasks", ""):
        # one random task per step: check the tasks that two steps drew (the same on both ranks)
        drawn = [t for t in tasks if t in records[0]["global_batch"]]
        assert drawn and all(set(r["global_batch"]) == set(drawn) for r in records), where
        tasks = drawn
    for task in tasks:
        prefix = f"{task}." if task else ""
        for rec in records:
            assert rec["global_batch"][task] == _global(lines[prefix + "batch"]), (where, task, rec["global_batch"])
            assert rec["global_batch"][task] == 2 * rec["batch"][task], (where, task)
        if prefix + "temperature" in lines:
            assert lines[prefix + "temperature"] == paper["lines"][prefix + "temperature"], where
            for rec in records:
                assert _task_loss(rec, task)["temperature"] == pytest.approx(_number(lines[prefix + "temperature"])), where
        expected = _negatives(lines.get(prefix + "negatives/query", ""))
        if expected is not None:
            for rec in records:   # in-batch + hard + cross-device, as the step's passages counted it
                assert _task_loss(rec, task)["candidates_per_query"] - 1 == expected, (where, task, rec["losses"])
    if "mask ratios" in lines:   # RetroMAE's, as the data module masks
        assert lines["mask ratios"] == paper["lines"]["mask ratios"], where
        ratios = _weights(lines["mask ratios"])
        for rec in records:
            assert rec["data"]["encoder_mask_ratio"] == ratios["encoder"], where
            assert rec["data"]["decoder_mask_ratio"] == ratios["decoder"], where
            stream = re.match(r"query stream (\w+)", lines["decoder"]).group(1)
            assert rec["losses"][""]["query_stream"] == stream, where
    if "batches by source" in lines:
        assert all(rec["data"]["same_source_within_batch"] for rec in records), where
    objective_settings(lines, paper["lines"], records, where)


def _task_loss(record: dict, task: str) -> dict:
    """The loss module holding a task's scores: the innermost one with a temperature."""
    prefix = f"tasks.{task}" if task else ""
    found = [v for k, v in record["losses"].items() if k.startswith(prefix) and "temperature" in v]
    assert found, (task, record["losses"])
    return found[-1]


def objective_settings(lines: dict, paper: dict, records: list[dict], where: str) -> None:
    """The experiments' own settings: M3 loss weights and self-distillation, CBB task weights,
    Matryoshka dims; each as planned, as in the paper's plan, and live."""
    for rec in records:
        losses = rec["losses"]
        if "loss weights" in lines and "M3 heads" in lines:
            assert lines["loss weights"] == paper["loss weights"], where
            assert losses[""]["loss_weights"] == pytest.approx(_weights(lines["loss weights"])), where
            assert losses[""]["ensemble_weights"] == pytest.approx(_weights(lines["ensemble weights"])), where
            assert losses[""]["self_distill"] == ("self-distillation on" in lines["M3 heads"]), where
        if "tasks" in lines:
            assert lines["tasks"] == paper["tasks"], where
            assert rec["data"]["mode"] == re.match(r"mode (\w+)", lines["tasks"]).group(1), where
            if m := re.search(r"weights (.*?), retrieval shards", lines["tasks"]):   # CBB's L_ret + 0.8·L_cos
                assert losses[""]["weights"] == pytest.approx(_weights(m.group(1))), where
            if "MRL dims" in lines["tasks"]:
                assert losses["tasks.retrieval"]["dims"] == _dims(lines["tasks"].replace("MRL dims", "dims")), where
                assert rec["embedding_dim"] == max(losses["tasks.retrieval"]["dims"]), where
        if lines.get("loss", "").startswith("Matryoshka"):
            assert lines["loss"] == paper["loss"], where
            assert losses[""]["dims"] == _dims(lines["loss"]), where
            assert rec["embedding_dim"] == max(losses[""]["dims"]), where


@pytest.mark.slow
@pytest.mark.parametrize("experiment", list(SIZES))
def test_paper_path_end_to_end(experiment, standins, tmp_path):
    env = _env(standins, tmp_path)
    probe_dir = tmp_path / "probe"
    args = _args(experiment, standins, probe_dir)
    plan = parse_plan(_run([*args, "plan=true"], env, tmp_path / "plan", timeout=120))
    paper = {(s["row"], s["stage"]): s for s in parse_plan(
        _run([f"+experiment={experiment}", "scale=paper", "plan=true"], env, tmp_path / "paper-plan", timeout=120))}
    start = time.perf_counter()
    _run(args, env, tmp_path, timeout=900)
    print(f"{experiment}: {time.perf_counter() - start:.0f} s")

    order = trained_in_order(plan)
    for k, stage in enumerate(order):
        records = [json.loads((probe_dir / f"fit-{k:02d}-rank{r}.json").read_text()) for r in (0, 1)]
        # a single-row run's row label is its override string: match its one row by position
        key = (stage["row"], stage["stage"]) if len(paper) == len(plan) and (stage["row"], stage["stage"]) in paper \
            else next(iter(paper.items()))[0]
        check_stage(stage, paper[key], records)
    assert not (probe_dir / f"fit-{len(order):02d}-rank0.json").exists()   # no stage beyond the plan's

    (run_dir,) = (tmp_path / "logs" / experiment / "runs").iterdir()
    results = [json.loads(p.read_text()) for p in run_dir.rglob("results.json") if p.parent.name != "variants"]
    scored = [r for r in results if "CMRCRetrieval" in (r.get("tasks") or {})]
    assert scored and all(r["suite"] == "cmteb" and r["scale"] == "paper" for r in scored)
    assert all(0.0 <= r["tasks"]["CMRCRetrieval"] <= 100.0 for r in scored)


# ---------------------------------------------------------------- the eval seam, fast

def test_official_cmteb_evaluates_given_task_objects_without_the_hub():
    """eval=cmteb's suite takes mteb task objects beside (or instead of) C-MTEB names: the paper
    path's eval runs on a local stand-in through the same code; names are still checked."""
    from embedkit.eval.suite import OfficialCMTEB
    from embedkit.eval.tasks import build_task

    local = build_task(EVAL_TASK, max_rows=8)
    assert OfficialCMTEB(tasks=[local]).tasks() == [local]
    mixed = OfficialCMTEB(tasks=["T2Retrieval", local]).tasks()
    assert [t.metadata.name for t in mixed] == ["T2Retrieval", "CMRCRetrieval"]
    with pytest.raises(ValueError, match="not C-MTEB tasks"):
        OfficialCMTEB(tasks=["NoSuchTask", local]).tasks()
    with pytest.raises(TypeError, match="neither C-MTEB task names nor mteb tasks"):
        OfficialCMTEB(tasks=[{"task_dir": str(EVAL_TASK)}]).tasks()
    with pytest.raises(ValueError, match="no tasks selected"):
        OfficialCMTEB(tasks=[]).tasks()


def test_long_labels_make_folder_names_that_fit():
    """A plain run's row label is its whole override string (the paper path's runs: ~1,000
    characters), and it names the row's mteb revision folder: past 255 bytes mkdir failed
    (OSError: File name too long). Long labels keep their start and end in a hash of the label."""
    from embedkit.runs import MAX_LABEL, safe_label

    assert safe_label("BGE w.o. pre-train") == "BGE_w.o._pre-train"   # short ones as before
    assert safe_label("x" * MAX_LABEL) == "x" * MAX_LABEL
    a, b = "data.batch_size=2," * 60 + "seed=1", "data.batch_size=2," * 60 + "seed=2"
    for label in (a, b):
        name = safe_label(label)
        assert len(name) == MAX_LABEL and name.startswith("data.batch_size=2,data.batch_size=2")
        assert name.endswith("_" + __import__("hashlib").sha1(label.encode()).hexdigest()[:10])
    assert safe_label(a) != safe_label(b)
