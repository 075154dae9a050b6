"""Loading never runs code it was not told to, and runs never write credentials to disk.

- every `torch.load` in embedkit uses weights_only=True (a pickle can run code);
- `trust_remote_code` is off unless the config turns it on, and reaches every from_pretrained;
- the saved Hydra configs (.hydra/*.yaml, multirun.yaml), results.json and the hyper-parameters
  handed to the logger hold no WANDB_API_KEY value and no value of a key named like a credential.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from embedkit.config import REPO_ROOT
from embedkit.redact import MASK, is_secret_key, redact, redact_text, secret_env_values
from helpers import compose as _compose

SOURCES = sorted((REPO_ROOT / "embedkit").rglob("*.py")) + [REPO_ROOT / "run.py"]
WANDB_KEY = "0123456789abcdef0123456789abcdef01234567"   # the shape of a W&B key, not a real one
OVERRIDE_KEY = "sk-override-secret-98765"


def _calls(predicate):
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Call) and predicate(node):
                yield path.relative_to(REPO_ROOT), node


def _attr_call(node: ast.Call, attr: str) -> bool:
    return isinstance(node.func, ast.Attribute) and node.func.attr == attr


def _keyword(node: ast.Call, name: str):
    return next((k.value for k in node.keywords if k.arg == name), None)


# ---------------------------------------------------------------------- loading


def test_every_torch_load_is_weights_only():
    bad = [f"{path}:{node.lineno}" for path, node in _calls(
        lambda n: _attr_call(n, "load") and isinstance(n.func.value, ast.Name) and n.func.value.id == "torch")
        if not (isinstance(_keyword(node, "weights_only"), ast.Constant)
                and _keyword(node, "weights_only").value is True)]
    assert not bad, f"torch.load without weights_only=True (unpickling can run code): {bad}"


def test_no_pickle_loading():
    bad = [f"{path}:{node.lineno}" for path, node in _calls(
        lambda n: (_attr_call(n, "load") or _attr_call(n, "loads"))
        and isinstance(n.func.value, ast.Name) and n.func.value.id in {"pickle", "cloudpickle", "dill"})]
    bad += [f"{path}:{node.lineno}" for path, node in _calls(lambda n: _attr_call(n, "load"))
            if isinstance(_keyword(node, "allow_pickle"), ast.Constant) and _keyword(node, "allow_pickle").value]
    assert not bad, f"pickle loading: {bad}"


def test_every_hf_from_pretrained_states_trust_remote_code_and_never_hardcodes_true():
    """Hugging Face `Auto*.from_pretrained` calls name the switch, so none relies on a library default."""
    calls = list(_calls(lambda n: _attr_call(n, "from_pretrained") and isinstance(n.func.value, ast.Name)
                        and n.func.value.id.startswith("Auto")))
    assert len(calls) >= 5
    missing = [f"{p}:{n.lineno}" for p, n in calls if _keyword(n, "trust_remote_code") is None]
    assert not missing, f"from_pretrained without an explicit trust_remote_code: {missing}"
    hardcoded = [f"{p}:{n.lineno}" for p, n in _calls(lambda n: True)
                 if isinstance(_keyword(n, "trust_remote_code"), ast.Constant)
                 and _keyword(n, "trust_remote_code").value is True]
    assert not hardcoded, f"trust_remote_code=True in code: {hardcoded}"


def test_trust_remote_code_defaults_to_false_everywhere():
    import inspect

    from embedkit.models import build
    from embedkit.objectives.retromae import RetroMAE

    for fn in (build.pretrained_tokenizer, build.hf_encoder, build.load_encoder,
               build._backbone_without_pooler, RetroMAE):   # the objective's arguments: its loss part's
        assert inspect.signature(fn).parameters["trust_remote_code"].default is False, fn.__qualname__


@pytest.mark.parametrize("override,expected", [([], False), (["model.trust_remote_code=true"], True)])
def test_config_switch_reaches_tokenizer_encoder_and_retromae_head(override, expected):
    cfg = _compose(["model=hf", "objective=retromae", *override])
    assert OmegaConf.select(cfg, "model.trust_remote_code") is expected
    assert cfg.model.tokenizer.trust_remote_code is expected
    assert cfg.model.encoder.trust_remote_code is expected
    assert cfg.objective.trust_remote_code is expected
    # tiny_zh has no switch: the RetroMAE head still gets a plain False
    assert _compose(["objective=retromae"]).objective.trust_remote_code is False


@pytest.mark.parametrize("flag", [False, True])
def test_hf_loaders_pass_the_switch_to_transformers(monkeypatch, flag):
    import transformers

    from embedkit.models import build

    seen = []

    class Stop(Exception):
        pass

    def record(name_or_path, *args, **kwargs):
        seen.append(kwargs.get("trust_remote_code", "missing"))
        raise Stop

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", record)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", record)
    for call in (lambda: build.hf_encoder(None, "some/model", trust_remote_code=flag),
                 lambda: build.pretrained_tokenizer("some/model", trust_remote_code=flag),
                 lambda: build.load_encoder("/nowhere", trust_remote_code=flag)):
        with pytest.raises(Stop):
            call()
    assert seen == [flag, flag, flag]


def test_a_quoted_false_is_not_taken_for_true():
    from embedkit.models.build import hf_encoder, trust_remote_code_flag

    assert trust_remote_code_flag(None) is False
    with pytest.raises(TypeError, match="trust_remote_code"):
        hf_encoder(None, "some/model", trust_remote_code="false")


# ---------------------------------------------------------------------- redaction rules


@pytest.mark.parametrize("key", ["api_key", "logger.api_key", "WANDB_API_KEY", "openai_apikey", "token",
                                 "hf_token", "HF_TOKEN", "access_token", "auth-token", "client_secret",
                                 "password", "db.passwd", "+logger.api_key"])
def test_credential_names(key):
    assert is_secret_key(key)


@pytest.mark.parametrize("key", ["tokenizer", "model.tokenizer", "pad_token", "cls_token_id", "max_tokens",
                                 "token_type_ids", "tokens", "lr", "query_instruction", "TOKENIZERS_PARALLELISM"])
def test_tokenizer_settings_are_not_credentials(key):
    assert not is_secret_key(key)


def test_redact_masks_values_of_credential_keys_and_secret_strings():
    data = {"logger": {"api_key": "abc123456", "project": "embedkit", "tags": ["mini"]},
            "auth": {"hf_token": None, "password": ""},
            "secrets": {"token": ["t1", "t2"]},
            "model": {"tokenizer": {"_target_": "x.y"}, "name": "tiny_zh"},
            "notes": f"key={WANDB_KEY} trailing",
            "overrides": ["data.batch_size=32", "+logger.api_key=abc123456", "hf_token=xyz"],
            "label": "data.batch_size=32,logger.api_key=abc123456"}
    out = redact(data, secrets=[WANDB_KEY])
    assert out["logger"] == {"api_key": MASK, "project": "embedkit", "tags": ["mini"]}
    assert out["auth"] == {"hf_token": None, "password": ""}      # nothing there to hide
    assert out["secrets"]["token"] == [MASK, MASK]
    assert out["model"] == data["model"]
    assert out["notes"] == f"key={MASK} trailing"
    assert out["overrides"] == ["data.batch_size=32", f"+logger.api_key={MASK}", f"hf_token={MASK}"]
    assert out["label"] == f"data.batch_size=32,logger.api_key={MASK}"
    assert data["logger"]["api_key"] == "abc123456"   # a copy; the input is untouched


def test_secret_environment_values():
    env = {"WANDB_API_KEY": WANDB_KEY, "HF_TOKEN": "hf_abcdefghij", "WANDB_MODE": "offline", "HOME": "/root",
           "GITHUB_TOKEN": "short"}
    assert secret_env_values(env) == [WANDB_KEY, "hf_abcdefghij"]
    assert redact_text(f"x{WANDB_KEY}y", secret_env_values(env)) == f"x{MASK}y"
    assert redact_text("a=1,+db.password='two words',b=2", []) == f"a=1,+db.password={MASK},b=2"


# ---------------------------------------------------------------------- what runs write


APP = textwrap.dedent("""
    import json, sys
    from pathlib import Path

    import hydra
    from hydra.core.hydra_config import HydraConfig

    from embedkit.config import CONFIG_DIR
    from embedkit.recipes.rows import ablation_rows


    @hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
    def main(cfg):
        # What the recipe would label this job with, dumped raw (not through the redacting writer).
        rows = ablation_rows(cfg)
        out = Path(HydraConfig.get().runtime.output_dir)
        out.joinpath("labels.json").write_text(json.dumps([r["label"] for r in rows]))
        # A finished job leaves a results.json; without one the sweep counts the job as failed.
        out.joinpath("results.json").write_text(json.dumps({"label": "job"}))


    main()
""")


def _hydra_app(tmp_path, args):
    script = tmp_path / "app.py"
    script.write_text(APP, encoding="utf-8")
    # PYTHONPATH: the app runs outside the checkout, and must import this checkout's embedkit.
    env = dict(os.environ, WANDB_API_KEY=WANDB_KEY, WANDB_MODE="offline", HYDRA_FULL_ERROR="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    flags = [a for a in args if a.startswith("-")]   # Hydra's flags go before the overrides
    overrides = [a for a in args if not a.startswith("-")]
    proc = subprocess.run([sys.executable, str(script), *flags, f"paths.log_dir={tmp_path}/logs",
                           "experiment_name=secrets", "logger=csv", *overrides],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return tmp_path / "logs" / "secrets"


SECRET_OVERRIDES = [f"+logger.api_key={OVERRIDE_KEY}", f"+wandb_token={OVERRIDE_KEY}",
                    f"+notes=by-{WANDB_KEY}"]


def _assert_clean(files):
    assert files
    for f in files:
        text = f.read_text(encoding="utf-8")
        assert OVERRIDE_KEY not in text and WANDB_KEY not in text, f"{f} holds a secret:\n{text[:3000]}"


def test_saved_hydra_configs_hold_no_secrets(tmp_path):
    import yaml

    out = _hydra_app(tmp_path, SECRET_OVERRIDES)
    (run_dir,) = (out / "runs").iterdir()
    _assert_clean([run_dir / ".hydra" / n for n in ("config.yaml", "hydra.yaml", "overrides.yaml")])
    config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    assert config["logger"]["api_key"] == MASK and config["wandb_token"] == MASK
    assert config["notes"] == f"by-{MASK}"
    assert config["model"]["tokenizer"]["_target_"].endswith("char_level_tokenizer")   # the rest is intact
    assert config["paths"]["data_dir"].startswith("${oc.env:")                       # still unresolved
    assert f"+logger.api_key={MASK}" in yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())


def test_sweep_configs_and_job_labels_hold_no_secrets(tmp_path):
    out = _hydra_app(tmp_path, ["-m", *SECRET_OVERRIDES, "data.batch_size=4,8"])
    (sweep_dir,) = (out / "multiruns").iterdir()
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    assert len(jobs) == 2
    files = [sweep_dir / "multirun.yaml"] + [j / ".hydra" / n for j in jobs
                                             for n in ("config.yaml", "hydra.yaml", "overrides.yaml")]
    _assert_clean(files + [j / "labels.json" for j in jobs] + list(sweep_dir.glob("sweep_table.*")))
    labels = json.loads((jobs[0] / "labels.json").read_text())
    assert f"+logger.api_key={MASK}" in labels[0] and "data.batch_size=4" in labels[0]


class _FakeSuite:
    name = "fake"

    def evaluate(self, encoder=None, *, model_name, revision, output_dir, **kwargs):
        return {"tasks": {"STSB": 50.0}, "categories": {"STS": 50.0}, "Avg": 50.0,
                "model": {"name": model_name, "revision": revision}}


def test_results_json_holds_no_secrets(tmp_path, monkeypatch):
    """run_row (the recipe) writes results.json; training is stubbed, the writing is real."""
    from types import SimpleNamespace

    import embedkit.recipes.train_eval as recipe

    monkeypatch.setenv("WANDB_API_KEY", WANDB_KEY)
    module = SimpleNamespace(eval_targets=lambda: {"": {"encoder": None}})
    monkeypatch.setattr(recipe, "train_stage", lambda *a, **k: {
        "module": module, "logger": False, "seconds": 0.1,
        "record": {"steps": 3, "final_train_loss": None, "training": None}})
    examples = SimpleNamespace(get=lambda data_cfg: ([], []), bad_rows=lambda data_cfg: {})
    cfg = OmegaConf.create({"experiment_name": "secrets", "scale": {"name": "mini"}, "seed": 0,
                            "model": {"init_from": None}, "data": {}, "objective": {}, "trainer": {},
                            "logger": {"project": "embedkit"}, "eval": {"query_instruction": None}})
    row = {"label": f"data.batch_size=4,logger.api_key={OVERRIDE_KEY}", "paper_row": None,
           "overrides": {"logger.api_key": OVERRIDE_KEY, "logger.notes": f"key {WANDB_KEY}",
                         "data.batch_size": 4},
           "stages": None}
    recipe.run_row(cfg, row, None, examples, _FakeSuite(), tmp_path, tmp_path)
    _assert_clean([tmp_path / "results.json"])
    results = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert results["overrides"] == {"logger.api_key": MASK, "logger.notes": f"key {MASK}", "data.batch_size": 4}
    assert results["label"] == f"data.batch_size=4,logger.api_key={MASK}"
    assert results["Avg"] == 50.0 and results["steps"] == 3


def test_hyperparameters_given_to_the_logger_are_redacted(tmp_path, monkeypatch):
    """train_stage hands the resolved config to the logger (W&B uploads it): it goes through redact."""
    import embedkit.recipes.train_eval as recipe

    monkeypatch.setenv("WANDB_API_KEY", WANDB_KEY)
    logged = {}

    class Stop(Exception):
        pass

    class Logger:
        def log_hyperparams(self, params):
            logged.update(params)
            raise Stop   # before training: only the hand-over is under test

    monkeypatch.setattr(recipe, "make_logger", lambda cfg, name, save_dir: [Logger()])   # make_logger gives a list
    monkeypatch.setattr(recipe, "instantiate", lambda node, **kwargs: _Stub())
    cfg = OmegaConf.create({"seed": 0, "data": {}, "objective": {}, "trainer": {},
                            "model": {"encoder": {}, "init_from": None},
                            "logger": {"api_key": OVERRIDE_KEY, "notes": WANDB_KEY}})
    with pytest.raises(Stop):
        recipe.train_stage(cfg, "x", None, [], tmp_path)
    assert logged["logger"] == {"api_key": MASK, "notes": MASK}


class _Stub:
    def __getattr__(self, name):
        return lambda *a, **k: None


def test_a_config_without_credentials_is_left_as_it_is():
    # Masking must not fire on names that merely look like credentials (e.g. a callback named
    # after what it does): the saved configs of an ordinary run stay exactly as composed.
    for experiment in ("bge_ablation_batchsize", "bge_ablation_recipe", "mrl_dims", "m3_ablation_selfdistill"):
        cfg = _compose([f"+experiment={experiment}"], return_hydra_config=True)
        plain = OmegaConf.to_container(cfg, resolve=False)
        assert redact(plain, secrets=[]) == plain, experiment
