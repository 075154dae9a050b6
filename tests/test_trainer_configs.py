"""Trainer and model switches for big runs: every conf/trainer/*.yaml composes with the recipe, and
its Trainer instantiates on this CPU where Lightning allows it (accelerator swapped to cpu);
gradient checkpointing and SDPA reach the backbone, and GradCache still matches the plain step
with checkpointing on.

Not instantiated here: DeepSpeed (deepspeed is not installed: composition only) and FSDP's
Trainer (Lightning refuses FSDP on a CPU accelerator; its strategy object is built instead)."""

import functools

import pytest
from hydra.utils import instantiate

from embedkit.config import CONFIG_DIR

from _numerics import RTOL64, assert_close_scaled
from helpers import (PASSAGES, QUERIES, assert_same_grads, cached_loss_and_grads, compose, pair_batch,
                     plain_loss_and_grads, toy_encoder)
from helpers import resolve as _resolve

_compose = functools.partial(compose, return_hydra_config=True)

TRAINERS = sorted(p.stem for p in (CONFIG_DIR / "trainer").glob("*.yaml"))
EXPECTED = {   # name: (strategy, precision, num_nodes)
    "cpu": (None, "32-true", None),
    "gpu": (None, "bf16-mixed", None),
    "ddp": ("ddp", "bf16-mixed", 1),
    "deepspeed_zero1": ("deepspeed_stage_1", "16-mixed", 1),
    "fsdp": ("FSDPStrategy", "bf16-mixed", 1),
    "multi_node": ("ddp", "bf16-mixed", 2),
    "bf16": (None, "bf16-mixed", None),
    "fp16": (None, "16-mixed", None),
}


def test_every_trainer_config_is_covered():
    assert set(TRAINERS) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("grad_cache", [None, 64])
def test_trainer_composes(name, grad_cache):
    overrides = [f"trainer={name}"]
    if grad_cache:
        overrides.append(f"objective.grad_cache.mini_batch={grad_cache}")
    cfg = _resolve(_compose(overrides))
    strategy, precision, nodes = EXPECTED[name]
    t = cfg["trainer"]
    got = t.get("strategy")
    assert (got["_target_"].rsplit(".", 1)[-1] if isinstance(got, dict) else got) == strategy
    assert t["precision"] == precision
    assert t.get("num_nodes") == nodes
    assert cfg["objective"]["grad_cache"]["mini_batch"] == grad_cache


@pytest.mark.parametrize("name", [n for n in sorted(EXPECTED) if n not in ("deepspeed_zero1", "fsdp")])
def test_trainer_instantiates_on_cpu(name, tmp_path):
    import pytorch_lightning as pl

    cfg = _compose([f"trainer={name}", f"paths.output_dir={tmp_path}", "trainer.accelerator=cpu"]
                   + (["trainer.devices=2"] if name in ("ddp", "multi_node") else []))
    _resolve(cfg)
    trainer = instantiate(cfg.trainer, logger=False)
    assert isinstance(trainer, pl.Trainer)
    if name in ("ddp", "multi_node"):
        assert type(trainer.strategy).__name__ == "DDPStrategy"
        assert trainer.num_nodes == EXPECTED[name][2] and trainer.num_devices == 2
    # fp16 AMP does not exist on CPU: Lightning falls back to bf16 there (and warns).
    want = EXPECTED[name][1] if EXPECTED[name][1] != "16-mixed" else "bf16-mixed"
    assert trainer.precision == want


def test_fsdp_strategy_object_builds():
    from pytorch_lightning.strategies import FSDPStrategy

    cfg = _compose(["trainer=fsdp"])
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy)


def test_deepspeed_is_composition_only():
    pytest.importorskip("deepspeed", reason="deepspeed not installed: trainer=deepspeed_zero1 is "
                                            "tested for composition only")


def test_grad_cache_trainer_overrides_take_the_composed_clip(tmp_path):
    """What the recipe does: the composed trainer's clip moves into the objective."""
    from embedkit.objectives.gradcache import GradCache

    cfg = _compose(["objective.grad_cache.mini_batch=16"])
    gc = GradCache.from_config(cfg.objective.grad_cache)
    assert gc.trainer_overrides(cfg.trainer) == {"gradient_clip_val": None, "accumulate_grad_batches": 1}
    assert gc.gradient_clip_val == cfg.trainer.gradient_clip_val == 1.0


# ---------------------------------------------------------------------- model switches


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from embedkit.models.vocab import build_char_vocab, save_tokenizer

    return save_tokenizer(build_char_vocab(QUERIES + PASSAGES), tmp_path_factory.mktemp("tctok"))


def test_model_switches_compose_and_reach_the_backbone(tok):
    cfg = _compose(["model.encoder.gradient_checkpointing=true", "model.encoder.unpad=false"])
    enc = cfg.model.encoder
    assert enc.attn_implementation == "sdpa"
    small = {**{k: enc[k] for k in enc}, "hidden_size": 32, "num_layers": 1, "num_heads": 2,
             "intermediate_size": 64}
    encoder = instantiate(small, tokenizer=tok)
    backbone = encoder.backbone
    assert (backbone.is_activation_checkpointing if hasattr(backbone, "is_activation_checkpointing")
            else backbone.is_gradient_checkpointing)
    assert encoder.backbone.config._attn_implementation == "sdpa"
    assert _compose(["model=hf"]).model.encoder.gradient_checkpointing is False
    # tiny_zh's default unpad routes attention through the unpadded path (tests/test_fast_paths.py)
    unpadded = instantiate({**small, "unpad": True}, tokenizer=tok)
    assert unpadded.unpad and unpadded.backbone.config._attn_implementation == "embedkit_unpadded"
    assert _compose([]).model.encoder.unpad is True and _compose(["model=hf"]).model.encoder.unpad is False


def test_gradient_checkpointing_gives_the_same_gradients_with_and_without_gradcache(tok):
    from embedkit.models.build import enable_gradient_checkpointing
    from embedkit.objectives.infonce import InfoNCE

    # An exactness claim: in float64 (tests/_numerics.py), equal to rounding.
    batch = pair_batch(tok)
    plain = InfoNCE(toy_encoder(tok), temperature=0.05).double()
    loss, grads = plain_loss_and_grads(plain, batch)
    ckpt = InfoNCE(toy_encoder(tok), temperature=0.05).double()
    enable_gradient_checkpointing(ckpt.encoder.backbone)
    ckpt.train()
    for run in (plain_loss_and_grads, lambda m, b: cached_loss_and_grads(m, b, 4)):
        l2, g2 = run(ckpt, batch)
        assert_close_scaled(l2, loss, RTOL64, what="loss")
        assert_same_grads(g2, grads)


def test_paper_scale_19200_row_with_gradcache_composes():
    """The GradCache row of C-Pack Table 4: 19,200 on one node, cross-device negatives on, as the
    general stage of a BGE-pretrain chain (conf/recipe/bge.yaml)."""
    cfg = _compose(["+experiment=bge_ablation_batchsize_gradcache", "scale=paper"])
    resolved = _resolve(cfg)
    rows = resolved["ablation"]["rows"]["paper"]
    gc_row = rows[-1]
    assert gc_row["stages"] == ["pretrain", "general"]
    o = gc_row["overrides"]
    assert (o["stages.general.data.batch_size"] * o["stages.general.trainer.devices"]
            * o["stages.general.trainer.num_nodes"]) == 19200
    assert o["stages.general.objective.grad_cache"] == {"mini_batch": 128}
    from embedkit.recipes.rows import row_config, stage_config

    stage = stage_config(row_config(cfg, o), "general", None)   # as the recipe builds the row's stage
    assert stage.objective.negatives_cross_device is True
    assert stage.trainer.devices == 8 and stage.trainer.num_nodes == 1
    objective = instantiate(stage.objective, encoder=None, _partial_=True)
    assert objective.keywords["grad_cache"]["mini_batch"] == 128
    # The mini rows are bge_ablation_batchsize's (the full mini run stays within its budget).
    base = _resolve(_compose(["+experiment=bge_ablation_batchsize"]))
    assert resolved["ablation"]["rows"]["mini"] == base["ablation"]["rows"]["mini"]


@pytest.mark.parametrize("objective", ["infonce", "cosent", "matryoshka", "m3"])
def test_every_embedding_objective_takes_the_grad_cache_switch(tok, objective):
    extra = ["objective.dims=[16,32]"] if objective == "matryoshka" else []
    cfg = _compose([f"objective={objective}", "objective.grad_cache.mini_batch=16", *extra])
    module = instantiate(cfg.objective, encoder=toy_encoder(tok))
    assert module.grad_cache.mini_batch == 16 and module.automatic_optimization is False
    if objective == "matryoshka":   # the wrapper caches; its inner objective is a loss part
        import pytorch_lightning as pl

        assert [m for m in module.modules() if isinstance(m, pl.LightningModule)] == [module]
    off = instantiate(_compose([f"objective={objective}", *extra]).objective, encoder=toy_encoder(tok))
    assert off.grad_cache is None and off.automatic_optimization is True
