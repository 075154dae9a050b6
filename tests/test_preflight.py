"""What a run checks before it reads any training data (embedkit/recipes/preflight.py): config value
types and Matryoshka widths, the output and cache folders, and the evaluation tasks."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra.utils import instantiate

import embedkit.recipes.train_eval as recipe
from embedkit.eval.tasks import TaskDataError, load_local_tasks, read_jsonl
from embedkit.recipes.preflight import ConfigError, config_problems, preflight, scale_problems

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("EMBEDKIT_DATA_DIR", REPO.parent / "shared" / "data" / "zh-mini"))
EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))


def _eval_copy(root: Path, *tasks: str) -> Path:
    """A small bundle-shaped folder (root/eval/<task>) holding copies of some zh-mini tasks."""
    for task in tasks:
        shutil.copytree(DATA / "eval" / task, root / "eval" / task)
    return root


def _break_utf8(path: Path, line: int) -> None:
    """Put a byte that is never valid UTF-8 into one line of a jsonl file."""
    lines = path.read_bytes().splitlines(keepends=True)
    lines[line - 1] = lines[line - 1][:15] + b"\xff" + lines[line - 1][15:]
    path.write_bytes(b"".join(lines))


# ---------------------------------------------------------------- eval task folders

def test_invalid_utf8_in_a_task_file_names_the_file_and_line(tmp_path):
    root = _eval_copy(tmp_path, "STSB")
    _break_utf8(root / "eval" / "STSB" / "data.jsonl", 3)
    with pytest.raises(TaskDataError, match=r"STSB/data.jsonl, line 3: invalid UTF-8"):
        read_jsonl(root / "eval" / "STSB" / "data.jsonl")
    (root / "eval" / "STSB" / "task.json").write_bytes(b'{\n "name": "STSB",\n "source": "\xff"\n}')
    with pytest.raises(TaskDataError, match=r"STSB/task.json: invalid UTF-8 at line 3"):
        load_local_tasks(root / "eval")


def test_eval_task_names_an_empty_list_is_an_error_and_null_means_all(tmp_path):
    root = _eval_copy(tmp_path, "STSB", "AFQMC")
    with pytest.raises(TaskDataError, match=r"no tasks selected .*\['AFQMC', 'STSB'\]"):
        load_local_tasks(root / "eval", names=[], max_rows=8)
    with pytest.raises(TaskDataError, match=r"no task folder\(s\) \['STS'\]; found \['AFQMC', 'STSB'\]"):
        load_local_tasks(root / "eval", names=["STS"], max_rows=8)
    assert [t.metadata.name for t in load_local_tasks(root / "eval", names=None, max_rows=8)] == ["AFQMC", "STSB"]


@pytest.mark.parametrize("tasks,message", [
    ("eval.tasks=[]", r"eval \(mini_cmteb\): .*no tasks selected"),
    ("eval.tasks=[STSB,Nope]", r"no task folder\(s\) \['Nope'\]; found \['AFQMC', 'STSB'\]"),
])
def test_preflight_rejects_an_empty_or_unknown_task_selection(compose_run, tmp_path, tasks, message):
    root = _eval_copy(tmp_path / "bundle", "STSB", "AFQMC")
    cfg = compose_run([f"eval.data_dir={root}", "eval.task_dirs=[AFQMC,STSB]", tasks])
    with pytest.raises(ConfigError, match=message):
        preflight(cfg, recipe.ablation_rows(cfg), instantiate(cfg.eval))


def test_a_broken_eval_file_fails_preflight_and_good_tasks_stay_loaded(compose_run, tmp_path, monkeypatch):
    root = _eval_copy(tmp_path / "bundle", "STSB", "AFQMC")
    cfg = compose_run([f"eval.data_dir={root}", "eval.task_dirs=[AFQMC,STSB]", "eval.max_rows=16"])
    suite = instantiate(cfg.eval)
    preflight(cfg, recipe.ablation_rows(cfg), suite)
    # The suite keeps what preflight read: evaluation reads no file again (mteb skips load_data
    # for a task whose data is loaded).
    monkeypatch.setattr("embedkit.eval.tasks.read_jsonl", lambda *a, **k: pytest.fail("read again"))
    assert [(t.metadata.name, t.data_loaded) for t in suite.tasks()] == [("AFQMC", True), ("STSB", True)]
    monkeypatch.undo()

    _break_utf8(root / "eval" / "STSB" / "data.jsonl", 7)
    with pytest.raises(ConfigError, match=r"eval \(mini_cmteb\): .*STSB/data.jsonl, line 7: invalid UTF-8"):
        preflight(cfg, recipe.ablation_rows(cfg), instantiate(cfg.eval))
    (root / "eval" / "STSB" / "data.jsonl").write_text('{"sentence1": "a", "sentence2": "b", "score": 1}\n{"sentence1": ')
    with pytest.raises(ConfigError, match=r"STSB/data.jsonl, line 2: malformed JSON"):
        preflight(cfg, recipe.ablation_rows(cfg), instantiate(cfg.eval))
    (root / "eval" / "STSB" / "task.json").write_text(json.dumps({"name": "STSB", "type": "Ranking", "main_score": "x"}))
    with pytest.raises(ConfigError, match=r"STSB/task.json: unknown task type 'Ranking'"):
        preflight(cfg, recipe.ablation_rows(cfg), instantiate(cfg.eval))


# ---------------------------------------------------------------- config value types

@pytest.mark.parametrize("overrides,message", [
    (["data.batch_size=abc"], "data.batch_size: expected int, got 'abc' (str)"),
    (["objective.temperature=abc"], "objective.temperature: expected float, got 'abc' (str)"),
    (["data.group_by_length=1"], "data.group_by_length: expected bool, got 1 (int)"),
    (["objective=matryoshka", "objective.inner.temperature=warm"],
     "objective.inner.temperature: expected float, got 'warm' (str)"),
    (["objective=matryoshka", "objective.dims=[16,x]"], "objective.dims: expected list of int, got [16, 'x'] (list)"),
    (["model.encoder.hidden_size=1.5"], "model.encoder.hidden_size: expected int, got 1.5 (float)"),
    (["model.tokenizer.min_freq=often"], "model.tokenizer.min_freq: expected int, got 'often' (str)"),
    (["eval.max_rows=some"], "eval.max_rows: expected int or None, got 'some' (str)"),
    (["+data.batch_sise=8"], "data.batch_sise: embedkit.data.contrastive.ContrastiveDataModule takes no argument 'batch_sise'"),
    (["data.sources.0.max_pairs=many"], "data.sources.0.max_pairs: expected int or None, got 'many' (str)"),
    # a stage's node is checked as the recipe builds it, named by where it is written
    (["+experiment=conan_ablation", "stages.cbb.objective.retrieval_shards=two"],
     "stages.cbb.objective.retrieval_shards: expected int, got 'two' (str) (row: +CBB)"),
    (["+experiment=conan_ablation", "stages.general.data.batch_size=big"],
     "stages.general.data.batch_size: expected int, got 'big' (str)"),
    (["+experiment=bge_ablation_recipe", "stages.pretrain.data.encoder_mask_ratio=[0.3]"],
     "stages.pretrain.data.encoder_mask_ratio: expected float, got [0.3] (list)"),
])
def test_a_value_of_the_wrong_type_fails_before_any_data_is_read(compose_run, monkeypatch, overrides, message):
    cfg = compose_run(overrides)
    monkeypatch.setattr(recipe.Examples, "get", lambda self, data_cfg: pytest.fail("training data was read"))
    with pytest.raises(ConfigError) as err:
        recipe.run(cfg)
    assert message in str(err.value)


def test_an_interpolated_value_names_where_it_comes_from(compose_run):
    cfg = compose_run(["objective=matryoshka", "objective.lr=fast"])   # the inner objective follows it
    problems = config_problems(cfg, recipe.ablation_rows(cfg))
    assert "objective.inner.lr: expected float or None, got 'fast' (str) (from ${..lr})" in problems
    assert "objective.lr: expected float or None, got 'fast' (str)" in problems


@pytest.mark.parametrize("experiment", [None, *EXPERIMENTS])
@pytest.mark.parametrize("scale,debug", [("mini", []), ("mini", ["debug=smoke"]), ("paper", [])])
def test_every_shipped_experiment_passes_the_config_checks(compose_run, experiment, scale, debug):
    overrides = ([f"+experiment={experiment}"] if experiment else []) + [f"scale={scale}", *debug]
    cfg = compose_run(overrides)
    if cfg.experiment_scales and scale not in cfg.experiment_scales:
        assert scale_problems(cfg) and "experiment_scales" in scale_problems(cfg)[0]
        return
    assert scale_problems(cfg) == []
    assert config_problems(cfg, recipe.ablation_rows(cfg)) == []


# ---------------------------------------------------------------- Matryoshka widths

@pytest.mark.parametrize("overrides,message", [
    (["objective=matryoshka", "objective.dims=[16,256]"],
     "objective.dims: [16, 256] go beyond the encoder's output width 128 (model.encoder.hidden_size)"),
    (["objective=matryoshka", "objective.dims=[16,256]", "+model.encoder.projection_dim=192"],
     "objective.dims: [16, 256] go beyond the encoder's output width 192 (model.encoder.projection_dim)"),
    (["+experiment=conan_ablation", "debug=smoke", "stages.conan.objective.mrl_dims=[16,32,64,128]"],
     "stages.conan.objective.mrl_dims: [16, 32, 64, 128] go beyond the encoder's output width 32 "
     "(model.encoder.hidden_size); drop [64, 128]"),
])
def test_matryoshka_widths_beyond_the_encoder_fail_before_training(compose_run, overrides, message):
    cfg = compose_run(overrides)
    with pytest.raises(ConfigError) as err:
        preflight(cfg, recipe.ablation_rows(cfg), None)
    assert message in str(err.value)


def test_matryoshka_widths_within_a_projection_pass(compose_run):
    cfg = compose_run(["objective=matryoshka", "objective.dims=[64,256]", "+model.encoder.projection_dim=256"])
    assert config_problems(cfg, recipe.ablation_rows(cfg)) == []


# ---------------------------------------------------------------- folders

def test_a_cache_folder_that_takes_no_file_is_named_with_its_key(compose_run, tmp_path, monkeypatch):
    monkeypatch.setattr(recipe.Examples, "get", lambda self, data_cfg: pytest.fail("training data was read"))
    (tmp_path / "a-file").write_text("not a folder")
    cfg = compose_run([f"paths.cache_dir={tmp_path}/a-file/cache"])
    with pytest.raises(ConfigError, match=r"paths.cache_dir / EMBEDKIT_CACHE_DIR: cannot write to "
                                          rf"{tmp_path}/a-file/cache \(NotADirectoryError"):
        recipe.run(cfg)

    # A read-only folder (chmod cannot stop root, who runs the tests here: refuse the write itself).
    import tempfile

    readonly = tmp_path / "readonly-cache"
    readonly.mkdir()
    real = tempfile.mkstemp

    def refuse(*args, dir=None, **kwargs):
        if Path(dir) == readonly:
            raise PermissionError(13, "Permission denied")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    cfg = compose_run([f"paths.cache_dir={readonly}"])
    with pytest.raises(ConfigError, match=rf"paths.cache_dir / EMBEDKIT_CACHE_DIR: cannot write to {readonly} "
                                          r"\(PermissionError: Permission denied\)"):
        recipe.run(cfg)
    # the probe file is gone again (the run's own lock stays until the process ends)
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name != ".lock") == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder anyway")
def test_a_read_only_cache_folder_is_refused(compose_run, tmp_path):
    readonly = tmp_path / "readonly-cache"
    readonly.mkdir()
    readonly.chmod(0o555)
    try:
        cfg = compose_run([f"paths.cache_dir={readonly}"])
        with pytest.raises(ConfigError, match=rf"paths.cache_dir / EMBEDKIT_CACHE_DIR: cannot write to {readonly}"):
            preflight(cfg, recipe.ablation_rows(cfg), None)
    finally:
        readonly.chmod(0o755)


# ---------------------------------------------------------------- end to end

@pytest.mark.slow
def test_a_broken_eval_folder_stops_the_run_before_training(tmp_path):
    root = _eval_copy(tmp_path / "bundle", "STSB")
    _break_utf8(root / "eval" / "STSB" / "data.jsonl", 5)
    env = dict(os.environ, EMBEDKIT_CACHE_DIR=str(tmp_path / "cache"), WANDB_MODE="offline", OMP_NUM_THREADS="1")
    env.pop("WANDB_API_KEY", None)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "run.py", "experiment_name=preflight", "debug=smoke", "logger=csv",
                           "eval.tasks=[STSB]", "eval.max_rows=32", f"eval.data_dir={root}",
                           f"paths.log_dir={tmp_path}/logs"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - start
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "STSB/data.jsonl, line 5: invalid UTF-8" in out, out[-3000:]
    assert "ConfigError: run stopped before training" in out and "training tiny_zh" not in out
    (run_dir,) = (tmp_path / "logs" / "preflight" / "runs").iterdir()
    assert not list(run_dir.rglob("*.ckpt")) and not (run_dir / "model").exists()
    assert not (run_dir / "tokenizer").exists()   # not even the training data was read
    print(f"failed after {seconds:.1f} s")
