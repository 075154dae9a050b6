"""How objectives are put together: one LightningModule base with the shared settings, loss parts
that wrappers compose (never a nested LightningModule), inner settings that cannot be silently
ignored, the optimizer and scheduler as partials, one docstring layout, keys beside the code that
reads them."""

import functools
import inspect
import re
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from embedkit.config import CONFIG_DIR
from embedkit.models.build import tiny_zh_encoder
from embedkit.models.vocab import build_char_vocab, save_tokenizer
from embedkit.objectives.base import SETTINGS, EmbeddingLoss, EmbeddingObjective
from embedkit.objectives.cosent import CoSENT
from embedkit.objectives.infonce import InfoNCE
from embedkit.objectives.m3 import M3
from embedkit.objectives.matryoshka import Matryoshka
from embedkit.objectives.multitask import MultiTask
from embedkit.objectives.retromae import RetroMAE

OBJECTIVES = [InfoNCE, CoSENT, M3, RetroMAE, Matryoshka, MultiTask]
TEXTS = ["今天天气很好", "我们去公园散步吧", "人民日报一九九八年新年献词", "北京是中国的首都"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return save_tokenizer(build_char_vocab(TEXTS), tmp_path_factory.mktemp("tok"))


def _encoder(tokenizer):
    torch.manual_seed(0)
    return tiny_zh_encoder(tokenizer, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                           dropout=0.0)


def _compose(overrides):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def _lightning_modules(module):
    return [m for m in module.modules() if isinstance(m, pl.LightningModule)]


# ---------------------------------------------------------------- wrappers compose loss parts

@pytest.mark.parametrize("overrides", [
    ["objective=matryoshka", "objective.dims=[16,32]"],
    ["objective=matryoshka", "objective@objective.inner=cosent", "objective.dims=[16,32]"],
    ["objective=matryoshka", "objective@objective.inner=m3", "objective.dims=[16,32]",
     "objective.truncate_keys=[query,passages]"],
    ["objective=multitask"],
    ["objective=multitask", "objective.mrl_dims=[16,32]"],
    ["objective=matryoshka", "objective.dims=[16,32]", "objective.grad_cache.mini_batch=4"],
])
def test_a_wrapper_holds_no_lightning_module_but_itself(tokenizer, overrides):
    module = instantiate(_compose(overrides).objective, encoder=_encoder(tokenizer))
    assert _lightning_modules(module) == [module]
    # The inner parts are losses; the encoder is the wrapper's own, its parameters listed once.
    inner = [m for m in module.loss.modules() if isinstance(m, EmbeddingLoss)]
    assert len(inner) >= 2
    assert len(list(module.parameters())) == len({id(p) for p in module.parameters()})
    assert not any(isinstance(m, type(module.encoder)) for m in module.loss.modules())
    if module.grad_cache is not None:   # GradCache drives the wrapper's step; it holds no module
        assert not any(isinstance(v, nn.Module) for v in vars(module.grad_cache).values())


@pytest.mark.parametrize("overrides,where", [
    (["objective=matryoshka", "objective.inner.lr=1e-3"], "inner.lr"),
    (["objective=matryoshka", "objective.inner.grad_cache={mini_batch:4}"], "inner.grad_cache"),
    (["objective=matryoshka", "objective.inner.on_nonfinite_loss=skip"], "inner.on_nonfinite_loss"),
    (["objective=matryoshka", "objective.inner.warmup_ratio=0.3"], "inner.warmup_ratio"),
    (["objective=multitask", "objective.tasks.sts.lr=1e-3"], "tasks.sts.lr"),
    (["objective=multitask", "objective.tasks.retrieval.grad_cache={mini_batch:4}"],
     "tasks.retrieval.grad_cache"),
    (["objective=multitask", "objective.tasks.retrieval.on_nonfinite_loss=skip"],
     "tasks.retrieval.on_nonfinite_loss"),
])
def test_an_inner_setting_that_differs_from_the_wrappers_is_an_error(overrides, where):
    cfg = _compose([*overrides, "objective.dims=[8]"] if "matryoshka" in overrides[0] else overrides)
    with pytest.raises(Exception) as err:
        instantiate(cfg.objective, encoder=None)
    message = str(err.value)
    assert f"{where}=" in message and "differs from the wrapper's" in message and "ignored" in message


def test_inner_settings_are_honoured_where_the_wrapper_leaves_them_unset():
    inner = functools.partial(InfoNCE, lr=1e-3, on_nonfinite_loss="skip", grad_cache={"mini_batch": 2})
    mrl = Matryoshka(None, inner, dims=[8])
    assert (mrl.lr, mrl.on_nonfinite_loss, mrl.grad_cache.mini_batch) == (1e-3, "skip", 2)
    assert mrl.automatic_optimization is False
    # the same values on both sides are no conflict
    assert Matryoshka(None, inner, dims=[8], lr=1e-3, grad_cache={"mini_batch": 2}).lr == 1e-3
    with pytest.raises(ValueError, match=r"inner\.grad_cache=\{'mini_batch': 2\} differs"):
        Matryoshka(None, inner, dims=[8], grad_cache={"mini_batch": 4})
    # two tasks that disagree while the wrapper is silent: which one would train is not clear
    tasks = {"retrieval": functools.partial(InfoNCE, lr=1e-3), "sts": functools.partial(CoSENT, lr=1e-4)}
    with pytest.raises(ValueError, match=r"tasks\.sts\.lr=0\.0001 differs from tasks\.retrieval\.lr=0\.001"):
        MultiTask(None, tasks)
    assert MultiTask(None, {"sts": functools.partial(CoSENT, lr=1e-4)}).lr == 1e-4


def test_a_built_objective_is_refused_as_an_inner_one(tokenizer):
    encoder = _encoder(tokenizer)
    with pytest.raises(TypeError, match="does not nest a LightningModule"):
        Matryoshka(encoder, InfoNCE(encoder), dims=[32])
    with pytest.raises(TypeError, match="does not nest a LightningModule"):
        MultiTask(encoder, {"retrieval": InfoNCE(encoder)})


# ---------------------------------------------------------------- the shared settings, declared once

@pytest.mark.parametrize("objective", OBJECTIVES)
def test_objectives_declare_only_their_loss_arguments(objective):
    assert issubclass(objective, EmbeddingObjective) and "__init__" not in objective.__dict__
    loss_args = set(inspect.signature(objective.loss_class).parameters)
    assert not loss_args & set(SETTINGS), objective.loss_class.__name__
    assert "train_group_size" not in loss_args and "encoder_mask_ratio" not in loss_args
    # ... and show the shared settings beside them, for inspect and the config check
    shown = inspect.signature(objective).parameters
    assert set(SETTINGS) <= set(shown) and loss_args - {"encoder"} <= set(shown)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_every_loss_docstring_has_formula_paper_arguments_and_batch(objective):
    doc = inspect.getdoc(objective.loss_class)
    headings = ["Formula:", "Paper:", "Arguments (paper defaults):", "Batch:"]
    at = [doc.find(h) for h in headings]
    assert all(i >= 0 for i in at) and at == sorted(at), (objective.__name__, at)
    arguments = doc[at[2]:at[3]]
    for name in inspect.signature(objective.loss_class).parameters:
        assert re.search(rf"^\s*{name}:", arguments, re.M), (objective.__name__, name)
    paper = doc[at[1]:at[2]]
    assert re.search(r"§|arXiv|EMNLP|NeurIPS|kexue", paper), objective.__name__


@pytest.mark.parametrize("name", ["infonce", "cosent", "m3", "retromae", "matryoshka", "multitask"])
def test_every_objective_config_takes_the_shared_settings_from_base_yaml(name):
    objective = _compose([f"objective={name}"]).objective
    assert objective.optimizer._partial_ and objective.scheduler._partial_
    assert objective.optimizer.lr == objective.lr                  # objective.lr is the one lr key
    assert {"warmup_ratio", "on_nonfinite_loss", "grad_cache"} <= set(objective)
    assert not {"weight_decay", "train_group_size", "encoder_mask_ratio"} & set(objective)


def test_the_optimizer_and_scheduler_partials_build_what_the_old_base_hard_wired(tokenizer):
    from transformers import get_linear_schedule_with_warmup

    module = instantiate(_compose(["objective=infonce"]).objective, encoder=_encoder(tokenizer))
    module._trainer = SimpleNamespace(estimated_stepping_batches=10, max_steps=-1)
    out = module.configure_optimizers()
    optimizer, scheduler = out["optimizer"], out["lr_scheduler"]["scheduler"]
    assert type(optimizer) is torch.optim.AdamW and out["lr_scheduler"]["interval"] == "step"
    decay, no_decay = optimizer.param_groups
    names = {id(p): n for n, p in module.named_parameters()}
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 and "LayerNorm" not in names[id(p)] for p in decay["params"])
    assert all(p.ndim < 2 or "LayerNorm" in names[id(p)] for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(module.parameters()))
    for group in (decay, no_decay):
        assert (group["betas"], group["eps"], group["initial_lr"]) == ((0.9, 0.999), 1e-8, 3e-4)
    # linear warm-up over 10% of the steps, then linear decay to 0
    reference = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=3e-4)
    expected = get_linear_schedule_with_warmup(reference, 1, 10)
    for _ in range(10):
        assert scheduler.get_last_lr() == pytest.approx(expected.get_last_lr() * 2)   # both groups
        optimizer.step(), scheduler.step(), reference.step(), expected.step()
    # GradCache counts optimiser steps over its own accumulation
    cached = instantiate(_compose(["objective=infonce", "objective.grad_cache.mini_batch=2"]).objective,
                         encoder=_encoder(tokenizer))
    cached.trainer_overrides({"accumulate_grad_batches": 2})
    cached._trainer = SimpleNamespace(estimated_stepping_batches=10, max_steps=-1)
    sched = cached.configure_optimizers()["lr_scheduler"]["scheduler"]
    assert sched.lr_lambdas[0](5) == pytest.approx(0.0)             # total 10 // 2 = 5 steps


def test_another_scheduler_or_optimizer_is_a_config_change(tokenizer):
    cfg = _compose(["objective=cosent", "objective.scheduler._target_=transformers.get_cosine_schedule_with_warmup",
                    "objective.optimizer._target_=torch.optim.Adam", "~objective.optimizer.weight_decay"])
    module = instantiate(cfg.objective, encoder=_encoder(tokenizer))
    module._trainer = SimpleNamespace(estimated_stepping_batches=8, max_steps=-1)
    out = module.configure_optimizers()
    scheduler = out["lr_scheduler"]["scheduler"]
    assert type(out["optimizer"]) is torch.optim.Adam and "weight_decay" not in cfg.objective.optimizer
    # int(0.1 · 8) = 0 warm-up steps, then half a cosine from cosent.yaml's lr 1e-3 down to 0
    assert scheduler.get_last_lr()[0] == pytest.approx(1e-3)
    assert scheduler.lr_lambdas[0](4) == pytest.approx(0.5) and scheduler.lr_lambdas[0](8) == pytest.approx(0.0)
    with pytest.raises(Exception, match="disagree"):
        instantiate(_compose(["objective=cosent", "objective.optimizer.lr=0.1"]).objective,
                    encoder=_encoder(tokenizer))


# ---------------------------------------------------------------- keys beside the code that reads them

@pytest.mark.parametrize("data", ["weak_pairs", "zh_mini_task", "zh_mini_mined", "sts_pairs", "pd_corpus",
                                  "multitask", "cmtp", "mined_file"])
@pytest.mark.parametrize("objective", ["cosent", "retromae"])
def test_a_data_config_resolves_whatever_the_objective(data, objective):
    # Objectives without a group size or mask ratios once broke the data's interpolations.
    cfg = _compose([f"objective={objective}", f"data={data}"])
    resolved = OmegaConf.to_container(cfg.data, resolve=True, throw_on_missing=False)
    assert resolved["_target_"]
    if data in ("weak_pairs", "zh_mini_task", "zh_mini_mined", "cmtp", "mined_file"):
        assert resolved["train_group_size"] == 1
    if data == "multitask":
        assert resolved["tasks"]["retrieval"]["train_group_size"] == 4
    if data == "pd_corpus":
        assert (resolved["encoder_mask_ratio"], resolved["decoder_mask_ratio"]) == (0.3, 0.5)
