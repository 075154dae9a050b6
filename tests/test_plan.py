"""`plan=true` (embedkit/recipes/plan.py): every experiment at both scales prints its rows, stages
and the settings that decide their results, and trains, reads and creates nothing."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from helpers import REPO

EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))
# Lines every stage shows (a MultiTask stage shows the loss lines per task: `retrieval.batch:`).
STAGE_KEYS = ("model:", "init:", "batch:", "loss:", "negatives/query:", "optimiser:", "schedule:",
              "steps:", "precision:", "GradCache:", "source:", "max lengths:")


def _plan(compose_run, capsys, *overrides) -> tuple[object, str]:
    from embedkit.recipes.train_eval import run

    cfg = compose_run([*overrides, "plan=true"])
    assert run(cfg) is None
    return cfg, capsys.readouterr().out


@pytest.mark.parametrize("scale", ["mini", "paper"])
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_plan_shows_every_row_and_stage(compose_run, capsys, tmp_path, experiment, scale):
    from embedkit.recipes.rows import ablation_rows

    offered = compose_run([f"+experiment={experiment}"]).experiment_scales
    if offered and scale not in offered:   # e.g. the mini base: refused, not planned
        from embedkit.recipes.preflight import ConfigError

        with pytest.raises(ConfigError, match="experiment_scales"):
            _plan(compose_run, capsys, f"+experiment={experiment}", f"scale={scale}")
        return
    cfg, out = _plan(compose_run, capsys, f"+experiment={experiment}", f"scale={scale}")
    rows = ablation_rows(cfg)
    assert out.startswith(f"Plan: {cfg.experiment_name} at scale={scale}, {len(rows)} row")
    for row in rows:
        assert f"== row {row['label']}" in out
        for stage in row["stages"] or ["train"]:
            assert f"-- stage {stage}" in out
    n_stages = sum(len(r["stages"] or [None]) for r in rows)
    assert out.count("-- stage ") == n_stages
    masked_lm = cfg.objective._target_ == "embedkit.objectives.mlm.MaskedLM"   # no pairs, no scores
    for key in STAGE_KEYS:
        assert key in out, key
    if not masked_lm:
        assert "temperature:" in out or "scale (1/τ):" in out
    if not masked_lm:   # plain text: no queries to instruct
        assert "instruction (train):" in out
    assert out.count("instruction (eval):") == len(rows)
    assert "<unresolved" not in out
    assert not (tmp_path / "run").exists()   # no claim, no tokenizer, no row folders


def test_plan_batch_and_negatives_at_paper_scale(compose_run, capsys):
    _, out = _plan(compose_run, capsys, "+experiment=bge_ablation_batchsize_gradcache", "scale=paper")
    assert "800 per device x 8 devices x 3 nodes = 19,200 global" in out
    assert "2,400 per device x 8 devices x 1 node = 19,200 global" in out
    # cross-device negatives: every passage of the 19,200-query global batch but the positive
    assert "19,199 = 0 hard + 2,399 in-batch + 16,800 cross-device" in out
    assert "GradCache:           on: mini-batch 128" in out
    assert "precision:           16-mixed" in out
    # C-Pack's tables are bge-large v1: lr 1e-5, τ 0.01 (experiments/bge/fidelity.yaml)
    assert "lr 1e-05" in out and "temperature:         0.01" in out


def test_plan_hard_negatives_instructions_and_weights(compose_run, capsys):
    _, out = _plan(compose_run, capsys, "+experiment=m3_ablation_selfdistill", "scale=paper")
    assert "383 = 7 hard + 376 in-batch (on this device; cross-device off)" in out   # 48 x group 8
    assert "steps:               6,000 steps" in out   # the heads' warm-up (BGE-M3 App. B.1)
    assert "loss weights:        dense 1, sparse 0.1, multivec 1" in out
    assert "self-distillation on" in out and "self-distillation off" in out
    _, out = _plan(compose_run, capsys, "+experiment=bge_ablation_recipe")
    # the task stage's instruction; the row that drops it says none
    row = out.split("== row BGE w.o. Instruct")[1].split("== row")[0]
    assert 'instruction (train): none' in row.split("-- stage task")[1]
    final = out.split("== row BGE-finetune")[1].split("-- stage task")[1]
    assert 'instruction (train): "为这个句子生成表示以用于检索相关文章："' in final
    assert "init:                stage general (stages/general-" in final
    assert "RetroMAE" in out and "mask ratios:" in out


def test_plan_reads_no_training_data(compose_run, capsys, monkeypatch):
    import embedkit.data.sources as sources
    import embedkit.data.sts as sts
    from embedkit.recipes import train_eval

    def refuse(*args, **kwargs):
        raise AssertionError("plan=true read training data")

    for name in ("get", "key", "bad_rows"):
        monkeypatch.setattr(train_eval.Examples, name, refuse)
    for name in ("people_daily_pairs", "zh_mini_jsonl", "jsonl_files", "jsonl_texts"):
        monkeypatch.setattr(sources, name, refuse)
    monkeypatch.setattr(sts, "sts_jsonl", refuse)
    monkeypatch.setattr(train_eval, "instantiate", refuse)
    monkeypatch.setattr(train_eval, "claim", refuse)
    for experiment in ("conan_ablation", "bge_ablation_recipe"):
        _, out = _plan(compose_run, capsys, f"+experiment={experiment}")
        assert "[exists]" in out   # zh-mini's files were only looked at


def test_run_py_plan_paper_scale(tmp_path):
    """The command line answers in seconds, without torch, and Hydra's files are all it writes."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-X", "importtime", "run.py", "+experiment=bge_ablation_batchsize",
                           "scale=paper", "plan=true", f"hydra.run.dir={run_dir}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "== row 19,200" in proc.stdout
    assert "800 per device x 8 devices x 3 nodes = 19,200 global" in proc.stdout
    imported = set(re.findall(r"\|\s+([\w.]+)\s*$", proc.stderr, re.M))
    assert not imported & {"torch", "pytorch_lightning", "mteb", "transformers"}
    assert {p.name for p in run_dir.iterdir()} <= {".hydra", "run.log"}
