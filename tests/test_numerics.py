"""A NaN/Inf loss stops a real Lightning fit naming the step and batch, or is skipped and counted;
the gradient norm is logged every step."""

from __future__ import annotations

import warnings

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from embedkit.models.build import tiny_zh_encoder
from embedkit.models.vocab import build_char_vocab, save_tokenizer
from embedkit.objectives.base import NonFiniteLossError
from embedkit.objectives.infonce import InfoNCE

QUERIES = ["今天天气", "公园散步", "人民日报", "新年献词", "北京大学", "上海交通", "中文句子", "编码测试"]
PASSAGES = ["今天天气很好", "我们去公园散步吧", "人民日报一九九八年", "新年献词全文", "北京大学在海淀",
            "上海交通很方便", "一个中文句子", "编码测试通过了"]
BATCH = 4
STEPS = 5
BAD_STEP = 2


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return save_tokenizer(build_char_vocab(QUERIES + PASSAGES), tmp_path_factory.mktemp("tok"))


def _batches(tokenizer) -> list[dict]:
    out = []
    for start in range(0, len(QUERIES), BATCH):
        q = tokenizer(QUERIES[start:start + BATCH], padding=True, return_tensors="pt")
        p = tokenizer(PASSAGES[start:start + BATCH], padding=True, return_tensors="pt")
        out.append({"query": {"input_ids": q["input_ids"], "attention_mask": q["attention_mask"]},
                    "passages": {"input_ids": p["input_ids"], "attention_mask": p["attention_mask"]}})
    return out


class PoisonedInfoNCE(InfoNCE):
    """InfoNCE whose loss is NaN (or Inf) at one optimiser step: a stand-in for a diverging run."""

    def __init__(self, *args, bad_step: int = BAD_STEP, bad_value: float = float("nan"), **kwargs):
        super().__init__(*args, **kwargs)
        self.bad_step = bad_step
        self.bad_value = bad_value

    def loss_from_embeddings(self, embeddings, batch):
        loss = super().loss_from_embeddings(embeddings, batch)
        return loss * self.bad_value if self.global_step == self.bad_step else loss


class Recorder(pl.Callback):
    """Parameters around every batch, and Lightning's own gradient norm before each optimiser step."""

    def __init__(self):
        self.changed: dict[int, bool] = {}
        self.grad_norms: dict[int, float] = {}
        self.logged_norms: dict[int, float] = {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._before = [p.detach().clone() for p in module.parameters()]

    def on_before_optimizer_step(self, trainer, module, optimizer):
        from pytorch_lightning.utilities import grad_norm

        norms = grad_norm(module, norm_type=2)
        if norms:
            self.grad_norms[trainer.global_step] = float(norms["grad_2.0_norm_total"])

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        step = trainer.global_step - 1
        self.changed[step] = any(not torch.equal(a, b) for a, b in zip(self._before, module.parameters()))
        if "train/grad_norm" in trainer.callback_metrics and step in self.grad_norms:
            self.logged_norms[step] = float(trainer.callback_metrics["train/grad_norm"])


def _fit(tokenizer, clip: float = 1.0, **kwargs):
    torch.manual_seed(0)
    encoder = tiny_zh_encoder(tokenizer, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                              dropout=0.0)
    module = PoisonedInfoNCE(encoder, lr=1e-3, warmup_ratio=0.0, **kwargs)
    loader = DataLoader(_batches(tokenizer), batch_size=None, shuffle=False)
    recorder = Recorder()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=STEPS, max_epochs=10, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         gradient_clip_val=clip, callbacks=[recorder])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # Lightning's notes on few workers and a None training_step
        trainer.fit(module, train_dataloaders=loader)
    return module, trainer, recorder


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_non_finite_loss_stops_the_fit_naming_step_and_batch(tokenizer, bad_value):
    with pytest.raises(NonFiniteLossError) as info:
        _fit(tokenizer, bad_value=bad_value)
    message = str(info.value)
    # step 2 is the first batch of the second epoch (2 batches per epoch): batch index 0
    assert f"global step {BAD_STEP}" in message
    assert "batch index 0" in message and f"batch size {BATCH}" in message and "epoch 1" in message
    assert ("nan" if bad_value != bad_value else "inf") in message
    assert "on_nonfinite_loss=skip" in message


def test_skip_mode_finishes_skips_that_update_and_counts_it(tokenizer):
    module, trainer, recorder = _fit(tokenizer, on_nonfinite_loss="skip")
    assert trainer.global_step == STEPS
    assert module.skipped_nonfinite == 1
    assert float(trainer.callback_metrics["train/skipped_nonfinite"]) == 1.0
    assert recorder.changed[BAD_STEP] is False                      # no parameter moved on that batch
    assert all(recorder.changed[s] for s in range(STEPS) if s != BAD_STEP)
    assert all(p.isfinite().all() for p in module.parameters())
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_grad_norm_is_logged_every_step_before_clipping(tokenizer):
    clip = 1e-3
    _, trainer, recorder = _fit(tokenizer, clip=clip, bad_step=-1)
    assert sorted(recorder.logged_norms) == list(range(STEPS))
    for step, logged in recorder.logged_norms.items():
        # Two float32 norms of the same gradients: sums of squares (no cancellation), rounded
        # to ~log2(n)·eps32 relative; a norm after clipping is ≥ 3 orders of magnitude smaller.
        assert logged == pytest.approx(recorder.grad_norms[step], rel=1e-5)
    # clipping to 1e-3 happens after the hook: the logged norms are the larger, unclipped ones
    assert min(recorder.logged_norms.values()) > clip


def test_unknown_policy_is_rejected(tokenizer):
    encoder = tiny_zh_encoder(tokenizer, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    with pytest.raises(ValueError, match="on_nonfinite_loss"):
        InfoNCE(encoder, on_nonfinite_loss="ignore")


def test_every_objective_config_exposes_the_policy():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from embedkit.config import CONFIG_DIR

    for name in ("infonce", "cosent", "m3", "matryoshka", "retromae"):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name="train", overrides=[f"objective={name}", "objective.on_nonfinite_loss=skip"])
        assert cfg.objective.on_nonfinite_loss == "skip", name


def test_retromae_has_the_same_check(tokenizer):
    """RetroMAE trains with the shared step (its own loss parts logged beside the loss); a NaN
    there stops the run the same way."""
    from embedkit.objectives.retromae import RetroMAE

    encoder = tiny_zh_encoder(tokenizer, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    module = RetroMAE(encoder)
    module.embed = lambda batch: {}
    module.loss.loss_parts = lambda emb, batch: {"loss": torch.tensor(float("nan")),
                                                 "encoder_mlm_loss": torch.tensor(1.0),
                                                 "decoder_loss": torch.tensor(float("nan"))}
    with pytest.raises(NonFiniteLossError, match=r"global step 0 .*batch index 7, batch size 3"):
        module.training_step({"input_ids": torch.zeros(3, 5, dtype=torch.long)}, 7)
